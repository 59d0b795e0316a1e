"""One member's state in one all-reduce round: what it sends, reduces, receives and who failed.

Driven by :func:`gossamer.comm.allreduce.all_reduce`, which owns the task group every task here
runs in and the deadlines. Messages arrive through :meth:`RoundState.handle` (the mailbox calls
it); numeric work goes through ``offload``.

Built in layers, a module each (state and tasks, sending, reducing, failures, receiving): see
:mod:`gossamer.comm.round_base`. This one holds the round's course and its report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from gossamer.comm.report import AllReduceReport, PartOutcome, PartReport
from gossamer.comm.round_receiving import RoundReceiving
from gossamer.comm.transport import Frame, FrameKind, pack_frame

__all__ = ["RoundState"]

_log = logging.getLogger(__name__)


class RoundState(RoundReceiving):
    """Everything one member tracks during a round (see the module docstring of allreduce).

    Round the ring (``ring``, in steps: see :mod:`gossamer.comm.steps`) an owner sends its
    averages only to the member just behind it, and each member passes on what it gets from the
    member just ahead, up to the member just ahead of the owner; each member that got an
    average passed on tells its owner (a ``RESULT_HELD`` frame). An owner keeps its averages
    and does not end the round before every live member is known to hold them: it sends them
    directly to every member not known to hold them once a member fails (which may have taken
    what it was to pass on along), once one of them gained no holder for a while (a member
    slow to receive or to pass on: see ``ring_stall_s``) and at its result deadline (a word
    lost), and from then on sends what it averages directly to everyone.
    """

    # ---- lifecycle ---------------------------------------------------------------------------

    def begin(self) -> None:
        """Start reducing this member's part and sending its values for every other part."""
        self._started = time.perf_counter()
        self._begun_at = self.clock.monotonic()
        if self.chunks[self.me]:
            self._start_reducer(self.me, set(range(self.plan.num_parts)), self.reduce_deadline_s)
        n = self.plan.num_parts
        for step in range(1, n):
            part = (self.me + step) % n
            if self.chunks[part]:
                self._num_contribution_senders += 1
                self.spawn(self._send_part(part, part, flags=0, counted=True))
        if self._num_contribution_senders == 0:
            self._contributions_finished()
        if self.result_deadline_s:
            self.spawn(self._watch_results())
        if self.steps.ring:
            self.spawn(self._watch_ring())
        if self.steps.in_steps and self.steps.asks:
            self.spawn(self._ask_ahead())
        if self.alive is not None:
            self.spawn(self._watch_liveness(self.alive))
        if self.announce:
            present = pack_frame(Frame(FrameKind.PRESENT, self.round_id, 0, 0, self.me, 0.0))
            for dest in range(n):
                if dest != self.me:
                    self.spawn(self._present(dest, present))
        self._check_done()

    async def _watch_results(self) -> None:
        """At the result deadline send this member's averages held up round the ring directly,
        and declare failed an owner that is alive but sent no average (round the ring, only
        halfway from there to the deadline: its averages may have been held up on the way).

        Its part then goes to a backup like a dead owner's (the others follow the report, the
        owner is told), instead of being kept local everywhere. Only when at least half the other
        owners' averages did arrive: if they did not either, this member's own link is what is slow,
        and declaring everyone failed would wreck the round for all.
        """
        await self.clock.sleep_async(max(0.0, self.result_deadline_s - self.clock.monotonic()))
        if self.done.is_set() or self.excluded is not None:
            return
        # Averages held up round the ring (by a member slow to pass them on) come directly
        # now; round the ring, an owner is silent only if none came by half the time left.
        self._go_direct(given_up=True)
        if self.steps.ring:
            until = self.result_deadline_s + 0.5 * (self.deadline_s - self.result_deadline_s)
            await self.clock.sleep_async(max(0.0, until - self.clock.monotonic()))
            if self.done.is_set() or self.excluded is not None:
                return
        owners = [
            p
            for p in range(self.plan.num_parts)
            if p != self.me and self.chunks[p] and self.reducer_of[p] == p and p not in self.failed
        ]
        silent = [p for p in owners if all(s is None for s in self.result_from[p])]
        if 2 * len(silent) > len(owners):
            return
        for part in silent:
            self.peer_failed(
                part, "sent no average of its part by the result deadline", notify=True
            )

    def _ring_allowance(self) -> float:
        """How long an average may gain no holder round the ring: ``ring_stall_s``, or as long
        as this member's reduce-scatter took if that is longer (until its last contribution is
        sent: until its first average went round the ring). The all-gather moves as many bytes
        as the reduce-scatter, and round the ring an average moves one hop a step."""
        end = self._contributions_sent_at
        if end is None:
            end = self._first_ring_at if self._first_ring_at is not None else self._begun_at
        return max(self.ring_stall_s, end - self._begun_at)

    async def _watch_ring(self) -> None:
        """Round the ring: once one of this member's averages gained no holder for the stall
        allowance, send those not known held directly (a member slow to receive or to pass
        them on would hold up every member behind it until the result deadline)."""
        while not self.done.is_set() and self._ring_intact():
            now = self.clock.monotonic()
            allowance = self._ring_allowance()
            since = [at for c, at in self._ring_progress.items() if c in self._unconfirmed]
            if since and now - min(since) >= allowance:
                _log.info(
                    "peer %s: an average made no progress round the ring for %.1f s in round "
                    "%s; sending the %d not known held directly",
                    self.plan.members[self.me][:12],
                    now - min(since),
                    self.round_id.hex()[:12],
                    len(self._unconfirmed),
                )
                self._go_direct(given_up=False)
                return
            wait = allowance if not since else min(since) + allowance - now
            await self.clock.sleep_async(max(0.01, min(wait, allowance / 4)))

    async def _watch_liveness(self, alive: Callable[[str], bool]) -> None:
        """Declare failed, at once, a member the failure detector reports gone.

        Without it a member that died without closing its connections (a frozen or powered-off
        machine) is noticed only when a send to it misses its deadline or at the reduce deadline,
        and the round waits that long; the detector reports it within its timeout.
        """
        while not self.done.is_set():
            for member, peer in enumerate(self.plan.members):
                if member != self.me and member not in self.failed and not alive(peer):
                    self.peer_failed(member, "reported gone by the failure detector", notify=True)
            await self.clock.sleep_async(self.liveness_poll_s)

    # ---- report --------------------------------------------------------------------------------

    def fill_report(self, report: AllReduceReport, started_wall: float) -> None:
        """Write what this member saw into ``report``."""
        members = self.plan.members
        ended = time.perf_counter()
        report.failed = {members[i]: why for i, why in sorted(self.failed.items())}
        report.own_non_finite = self.own_non_finite
        report.excluded = self.excluded
        report.round_the_ring = self.steps.ring
        report.ring_left = self._ring_left
        report.bytes_sent = self.bytes_sent
        report.bytes_received = self.bytes_received
        report.fp32_bytes_sent = self.fp32_bytes_sent
        report.total_s = ended - started_wall
        reduced = max(self._contributions_done_at or ended, self._own_part_done_at or ended)
        report.reduce_scatter_s = reduced - started_wall
        report.all_gather_s = max(0.0, ended - reduced)
        report.encode_s, report.decode_s = self.encode_s, self.decode_s
        for part in range(self.plan.num_parts):
            sources = [  # (a chunk without contributors had no average: its own values)
                s if self._authoritative(part, c) and self.result_contributors[part][c] else None
                for c, s in enumerate(self.result_from[part])
            ]
            reducer = self.reducer_of[part]
            if all(s == reducer for s in sources):
                outcome = PartOutcome.AVERAGED if reducer == part else PartOutcome.REASSIGNED
            elif any(s is not None for s in sources):
                outcome = PartOutcome.PARTIAL
            else:
                outcome = PartOutcome.KEPT_LOCAL
            sets = [
                set(c)
                for c, s in zip(self.result_contributors[part], sources, strict=True)
                if s is not None
            ]
            full = set.intersection(*sets) if sets else set()
            some = set.union(*sets) if sets else set()
            start, end = self.plan.part_range(part)
            report.parts.append(
                PartReport(
                    index=part,
                    owner=members[part],
                    reducer=members[reducer],
                    num_elements=end - start,
                    outcome=outcome,
                    contributors=[members[i] for i in sorted(full)],
                    partial_contributors=[members[i] for i in sorted(some - full)],
                )
            )
