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
behind; in all-gather step ``s`` it sends its part's averages to the member ``s`` places ahead
and receives the averages of the part ``s`` places behind. So in every step each uplink carries
one flow and each downlink receives one, like a ring's, and a step's chunks stream back to back
on one connection. A member starts a step once it finished sending the previous one and either
received the messages of the step before that (members stay within a step of each other), or
the member sending them failed, or it waited ``patience`` (a quarter of the previous step's
length) for them (a slow member holds the others up by at most that per step), or the reduce
deadline passed (then every step is open and the round runs as a free-for-all).

Between steps the link waits for the last message's reply (its receiver's queue, handling and
the way back): on 100 Mbit/s links a tenth of a second or so. Against a 2 s step that is little
(100 MB over 4 peers: 13.4-13.9 s against 15.5-16.7 s all at once, gloo 13.0-13.4 s); against a
0.5 s step it costs more than the contention it avoids (the same with the 8-bit codec: 4.3 s
against 4.0 s). So a round goes in steps only when a step is expected to take at least
``AllReduceConfig.min_step_s``; else every step is open from the start.
"""

from __future__ import annotations

import asyncio

__all__ = ["PairwiseSteps"]


class PairwiseSteps:
    """Which step each of one member's messages belongs to, and when each step may start.

    Args:
        num_members: members of the round (parts of the plan).
        me: this member's index.
        chunk_counts: chunks of each part (the plan's).
    """

    def __init__(self, num_members: int, me: int, chunk_counts: list[int]) -> None:
        self.num_members = num_members
        self.me = me
        n = num_members
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
        for shift in range(1, n):  # all-gather: this member's averages to the member ahead
            self.sends_to.append((me + shift) % n)
            self.receives_from.append((me - shift) % n)
            outgoing.append(chunk_counts[me])
            incoming.append(chunk_counts[(me - shift) % n])
        self._to_send = outgoing
        self._to_receive = incoming
        self._received: list[set[int]] = [set() for _ in range(self.num_steps)]
        self._gave_up_waiting = [False] * self.num_steps
        self.opened = [asyncio.Event() for _ in range(self.num_steps)]
        """Set when a step may start (the first at once)."""
        self.sends_done = [asyncio.Event() for _ in range(self.num_steps)]
        """Set when this member sent (or gave up) every message of a step."""
        self.failed: set[int] = set()
        for step, count in enumerate(outgoing):
            if count == 0:
                self.sends_done[step].set()
        if self.num_steps:
            self.opened[0].set()
            self._advance(0)

    def contribution_step(self, part: int) -> int:
        """The step that sends this member's values for ``part`` to its owner."""
        return (part - self.me) % self.num_members - 1

    def result_step(self, dest: int) -> int:
        """The step that sends this member's averages to ``dest``."""
        return self.num_members - 2 + (dest - self.me) % self.num_members

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
        self._received_in(self.num_members - 2 + (self.me - owner) % self.num_members, chunk)

    def _received_in(self, step: int, chunk: int) -> None:
        if 0 <= step < self.num_steps:
            self._received[step].add(chunk)
            self._advance(step + 1)

    def stop_waiting(self, step: int) -> None:
        """Let the steps after ``step`` start without the rest of ``step``'s messages."""
        self._gave_up_waiting[step] = True
        self._advance(step + 1)

    def member_failed(self, member: int) -> None:
        """Nothing more comes from or goes to ``member``."""
        self.failed.add(member)
        for step in range(self.num_steps):
            if self.sends_to[step] == member:
                self.sends_done[step].set()
        self._advance(0)

    def open_all(self) -> None:
        """Let every step start at once (messages then go out all together)."""
        for event in self.opened:
            event.set()

    def _may_follow(self, step: int) -> bool:
        """Whether the step after ``step`` may start (``step`` itself has started).

        This member sent every message of ``step`` (starting the next step with the last one
        still going measured slower: the two flows compete), and the step before ``step``
        arrived in full (members stay within a step of each other).
        """
        if not (self._to_send[step] <= 0 or self.sends_to[step] in self.failed):
            return False
        if step == 0:
            return True
        before = step - 1
        return (
            len(self._received[before]) >= self._to_receive[before]
            or self.receives_from[before] in self.failed
            or self._gave_up_waiting[before]
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
