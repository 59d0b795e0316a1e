"""Pairwise steps: the order a round's messages take so that no two flows share a link.

Every member of a round sends to every other. Sent all at once, those flows compete: each
uplink carries N-1 of them and each downlink receives N-1, and TCP shares neither fairly. On
100 Mbit/s lab links one flow got a sixth of its share for seconds while others ran ahead; the
part it fed was averaged last and the whole round waited for it, its links idle for a fifth of
the time (gloo's ring, one flow per link, kept them full). Traffic with nothing to wait on (every
member sending its share to every other, no averaging) did fill every link, so the contention is
what costs.

:class:`PairwiseSteps` orders the traffic as 2(N-1) steps, each a perfect matching: in
reduce-scatter step ``s`` (1 .. N-1) every member sends its values for the part ``s`` places
ahead to that part's owner and receives its own part's values from the member ``s`` places
behind; in all-gather step ``s`` it sends its part's averages to the member ``s`` places behind
and receives the averages of the part ``s`` places ahead. So in every step each uplink carries
one flow and each downlink receives one, like a ring's, and a step's chunks stream back to back
on one connection. The all-gather runs backwards so that its first step goes where the last
reduce-scatter step went (the member just behind): the two are one flow on one connection, and
the next step follows at once, with no wait for the last message's reply or the receiver's word
(on 100 Mbit/s lab links such a wait leaves the link idle 40-80 ms). Measured 2026-12-04, 100 MB,
4 peers, alternating with the all-gather run forwards, medians of 3 rounds: 12.94 / 12.97 s
against 12.97 / 13.03 s with cubic congestion control (gloo 12.81 s), and 13.22 / 13.37 s against
13.31 / 13.17 s with bbr, whose 200 ms bandwidth probes (ProbeRTT) stall single flows at random
(gloo 12.86-12.97 s).

Round the ring (``ring``, the default in steps: ``AllReduceConfig.ring_all_gather``) the
all-gather changes destination no more at all. In all-gather step ``t`` every member sends to the
member just behind it the averages of the part ``t - 1`` places ahead: its own in step 1, then
what the member just ahead passed on to it in the step before (the classic ring all-gather). Every
member's whole all-gather is then one flow on the connection its last reduce-scatter step
used, and the two changes of destination it had (four members) and their waits are gone.
Passing on costs each average a hop per member, so a member slow to receive or to pass on
delays every part behind it; the owner therefore keeps its averages until every live member
is known to hold them (each member that got them passed on says so, a header-only frame) and
sends them directly to every member not known to hold them once a member fails, once one of
them gained no holder for a while (``AllReduceConfig.ring_stall_s``) or at its result deadline
(see :class:`gossamer.comm.round_state.RoundState`). Measured 2026-12-04, 100
MB, 4 peers, 100 Mbit/s lab links with cubic, alternating with the direct all-gather, medians
of 3 rounds: 12.88 / 12.91 s (93.2% / 93.0% of the ring bound) against 12.98 / 12.95 s (gloo
12.82 s). Where gloo runs, a link's payload can hardly go faster: the uplink also carries the
TCP acknowledgements of the downlink's flow (a 66-byte frame per two 1514-byte segments, 2.2%)
besides the framing (1448 payload bytes per 1514, 4.4%), so 100 Mbit/s carries at most about
11.7 MB/s of payload each way while both directions are busy, 93.6% of the ring bound.

That holds only while the members move together. A member starts a step once it sent the
previous one (its uplink is free) and the step's receiver said that it received everything of
the steps before (its downlink is free). The member asks as soon as the step before opens (a
``STEP_ASK`` frame on its own connection to the receiver), and the receiver handles the question
once the last message of its current step arrived, so the answer comes back as the reply on
that connection. It never queues behind the receiver's own bulk data: a word sent on the
receiver's connection would, whenever the receiver's next destination is also its next sender
(the middle step of four members), and it then came half a second late. Without the word a
member that runs ahead starts feeding a downlink that still drains a late sender; the two flows
share it, the late one falls further behind, and the lag spreads: on 100 Mbit/s lab links a
step that took 2.2 s while the members were in line took 2.7-3.5 s once they were not, with the
earlier rule that a step waits only until the step before the previous one arrived. In one
run alternating the two rules (100 MB, 4 peers), rounds took 13.9-14.6 s with the word and
15.9-17.7 s without (gloo 12.8-13.1 s). A member waits for the word at most ``patience`` (a
quarter of its previous step's length) after it sent the previous step, so a slow member holds
the others up by at most that per step; a failed receiver needs no word, and past the reduce
deadline every step is open (the round runs as a free-for-all).

Between steps the sender's link waits for the receiver's answer, which costs little against a
step of 0.2 s or more but more than it saves on loopback, where a step takes milliseconds. So a
round goes in steps only when a step is expected to take at least ``AllReduceConfig.min_step_s``
(0.15 s); else every step is open from the start. Measured 2026-12-03 on lab links, 4 peers,
alternating in one session: 100 MB at 100 Mbit/s with the 8-bit codec (0.5 s steps) 3.44-3.82 s
in steps against 3.88-4.06 s all at once; 20 MB at 50 Mbit/s, 8-bit (0.2 s steps) 1.50-1.64 s
against 1.67-1.75 s; the same uncompressed (0.8 s steps) 6.05-6.17 s against 5.87-6.00 s. Before
the receiver's answer and the unary bulk call the 8-bit codec's 0.5 s steps had lost (4.3 s
against 4.0 s), hence the earlier threshold of 1 s.

Short steps can still be too many bytes at once. All at once, a member puts N-1 parts on its
uplink together; where that is more than the path queues (``AllReduceConfig.queue_s`` of its
send rate) but one part is not, the burst's tail is dropped at the queue and TCP recovers it
only after a retransmission timeout, a fifth of a second or more. Such rounds go in steps
without the word (:meth:`PairwiseSteps.without_words`): one destination at a time, each step
as soon as the one before is sent. On 20 Mbit/s lab links (4 members, 0.75 MB in 8 bits, 48 KB
parts) that took rounds from 0.16-0.65 s (median 0.32 s) to 0.13-0.19 s (median 0.17 s); with
a 1 MiB queue instead of the lab's 128 KiB, all at once took 0.15-0.19 s, so the drops were the
cost.
"""

from __future__ import annotations

import asyncio

from gossamer.core.errors import ProtocolError

__all__ = ["PairwiseSteps"]


class PairwiseSteps:
    """Which step each of one member's messages belongs to, and when each step may start.

    Args:
        num_members: members of the round (parts of the plan).
        me: this member's index.
        chunk_counts: chunks of each part (the plan's).
        ring: the all-gather goes round the ring (every step to the member behind, forwarding
            the averages of the part one further ahead each step) instead of each owner sending
            its averages to every member itself.
    """

    def __init__(
        self, num_members: int, me: int, chunk_counts: list[int], *, ring: bool = False
    ) -> None:
        self.num_members = num_members
        self.me = me
        n = num_members
        self.ring = ring and n >= 3
        """Whether the all-gather goes round the ring (two members have no ring to go round)."""
        self.num_steps = 2 * (n - 1)
        self.sends_to: list[int] = []
        """The member each step sends to."""
        self.receives_from: list[int] = []
        """The member each step receives from."""
        outgoing: list[int] = []
        incoming: list[int] = []
        for shift in range(1, n):  # reduce-scatter: values for the owner ahead
            self.sends_to.append((me + shift) % n)
            self.receives_from.append((me - shift) % n)
            outgoing.append(chunk_counts[(me + shift) % n])
            incoming.append(chunk_counts[me])
        for t, shift in enumerate(range(n - 1, 0, -1), start=1):  # all-gather: averages out
            if self.ring:
                # step t: the averages of the part t - 1 places ahead to the member behind
                self.sends_to.append(self.behind)
                self.receives_from.append(self.ahead)
                outgoing.append(chunk_counts[(me + t - 1) % n])
                incoming.append(chunk_counts[(me + t) % n])
            else:  # step t: this member's averages to the member t places behind
                self.sends_to.append((me + shift) % n)
                self.receives_from.append((me - shift) % n)
                outgoing.append(chunk_counts[me])
                incoming.append(chunk_counts[(me - shift) % n])
        self.in_steps = True
        """False once every step was opened at once (then nobody waits for a word)."""
        self.asks = True
        """Whether a step waits for its receiver's word (see :meth:`without_words`)."""
        self._to_send = outgoing
        self._to_receive = incoming
        self._received: list[set[int]] = [set() for _ in range(self.num_steps)]
        self._receiver_ready = [False] * self.num_steps
        self._gave_up_waiting = [False] * self.num_steps
        self.opened = [asyncio.Event() for _ in range(self.num_steps)]
        """Set when a step may start (the first at once)."""
        self.sends_done = [asyncio.Event() for _ in range(self.num_steps)]
        """Set when this member sent (or gave up) every message of a step."""
        self.downlink_free = [asyncio.Event() for _ in range(self.num_steps)]
        """Set for a step once this member received everything of the steps before it: the
        member that sends it that step may start."""
        self.failed: set[int] = set()
        for step, count in enumerate(outgoing):
            if count == 0:
                self.sends_done[step].set()
        if self.num_steps:
            self.opened[0].set()
            self.downlink_free[0].set()
            self._advance(0)
            self._update_downlink()

    def contribution_step(self, part: int) -> int:
        """The step that sends this member's values for ``part`` to its owner."""
        return (part - self.me) % self.num_members - 1

    def result_step(self, dest: int) -> int | None:
        """The step that sends this member's averages to ``dest`` (None: no step does; round
        the ring only the member behind gets them from this one)."""
        n = self.num_members
        if self.ring:
            return n - 1 if dest == self.behind else None
        return 2 * n - 2 - (dest - self.me) % n

    def forward_step(self, part: int) -> int:
        """Round the ring, the step that passes ``part``'s averages on to the member behind."""
        return self.num_members - 1 + (part - self.me) % self.num_members

    @property
    def behind(self) -> int:
        """The member just behind this one: round the ring, all it sends in the all-gather
        goes there."""
        return (self.me - 1) % self.num_members

    @property
    def ahead(self) -> int:
        """The member just ahead of this one: round the ring, all it receives in the
        all-gather comes from there."""
        return (self.me + 1) % self.num_members

    def flow_start(self, step: int) -> int:
        """The first of the steps up to ``step`` that send to its destination without a break
        (the last reduce-scatter step for the first all-gather step, else ``step``)."""
        while step > 0 and self.sends_to[step - 1] == self.sends_to[step]:
            step -= 1
        return step

    def sent(self, step: int) -> bool:
        """Count one message of ``step`` as sent (or given up); True once the step's are all."""
        self._to_send[step] -= 1
        done = self._to_send[step] <= 0
        if done:
            self.sends_done[step].set()
        self._advance(step)
        return done

    def received_contribution(self, sender: int, chunk: int) -> None:
        """A contribution to this member's part arrived from ``sender``."""
        self._received_in((self.me - sender) % self.num_members - 1, chunk)

    def received_result(self, owner: int, chunk: int) -> None:
        """The average of ``owner``'s part arrived from ``owner``."""
        self._received_in(self.num_members - 2 + (owner - self.me) % self.num_members, chunk)

    def _received_in(self, step: int, chunk: int) -> None:
        if 0 <= step < self.num_steps:
            self._received[step].add(chunk)
            self._update_downlink()

    def receiver_ready(self, step: int, member: int) -> None:
        """``member`` answered: it received everything before ``step``, this member may send it.

        Raises:
            ProtocolError: ``member`` does not receive from this member in ``step``.
        """
        if not 0 <= step < self.num_steps or self.sends_to[step] != member:
            raise ProtocolError(f"member {member} does not receive step {step} from this member")
        self._receiver_ready[step] = True
        self._advance(step - 1)

    def check_asker(self, step: int, member: int) -> None:
        """Check that ``member`` sends this member ``step`` (it asks whether it may start).

        Raises:
            ProtocolError: it does not.
        """
        if not 0 <= step < self.num_steps or self.receives_from[step] != member:
            raise ProtocolError(f"member {member} does not send step {step} to this member")

    def release(self) -> None:
        """The round ended: nobody waits for this member's downlink any more."""
        for event in self.downlink_free:
            event.set()

    def _update_downlink(self) -> None:
        for step in range(1, self.num_steps):
            if not self._incoming_done(step - 1):
                return
            self.downlink_free[step].set()

    def _incoming_done(self, step: int) -> bool:
        return (
            len(self._received[step]) >= self._to_receive[step]
            or self.receives_from[step] in self.failed
        )

    def stop_waiting(self, step: int) -> None:
        """Let ``step`` start without its receiver's word."""
        self._gave_up_waiting[step] = True
        self._advance(step - 1)

    def member_failed(self, member: int) -> None:
        """Nothing more comes from or goes to ``member``."""
        self.failed.add(member)
        for step in range(self.num_steps):
            if self.sends_to[step] == member:
                self.sends_done[step].set()
        self._advance(0)
        self._update_downlink()

    def without_words(self) -> None:
        """Let each step start as soon as this member sent the one before, without waiting for
        the receiver's word (nobody asks for it)."""
        self.asks = False
        self._gave_up_waiting = [True] * self.num_steps
        self._advance(0)

    def open_all(self) -> None:
        """Let every step start at once (messages then go out all together)."""
        self.in_steps = False
        for event in self.opened:
            event.set()
        self.release()

    def _may_follow(self, step: int) -> bool:
        """Whether the step after ``step`` may start (``step`` itself has started).

        At once where the next step goes to the same member (the first all-gather step after
        the last reduce-scatter step: one flow, nothing competes). Otherwise once this member
        sent every message of ``step`` (starting the next step with the last one still going
        measured slower: the two flows compete) and the next step's receiver said its downlink
        is free (or there is nothing to send it, or it failed, or this member waited long
        enough for its word).
        """
        after = step + 1
        if self.sends_to[after] == self.sends_to[step]:
            return True  # the same flow goes on: nothing to wait for
        if not (self._to_send[step] <= 0 or self.sends_to[step] in self.failed):
            return False
        return (
            self._receiver_ready[after]
            or self._to_send[after] <= 0
            or self.sends_to[after] in self.failed
            or self._gave_up_waiting[after]
        )

    def _advance(self, step: int) -> None:
        """Open the steps that may follow open ones, in order."""
        step = max(0, step)
        while step + 1 < self.num_steps and self.opened[step].is_set():
            if not self.opened[step + 1].is_set():
                if not self._may_follow(step):
                    return
                self.opened[step + 1].set()
            step += 1
