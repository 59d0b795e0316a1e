"""How one member reduces a part in an all-reduce round and sends its averages.

A layer of :class:`~gossamer.comm.round_state.RoundState` (see :mod:`gossamer.comm.round_base`):
a part's reducer, its deadline, and the averages sent to every member, or round the ring with
the members known to hold them (and sent directly once the ring is given up).
"""

from __future__ import annotations

import asyncio
import logging
import time

from gossamer.comm.reduction import PartReducer, pack_contributors, values_finite
from gossamer.comm.round_sending import RoundSending
from gossamer.comm.transport import (
    FLAG_REASSIGNED,
    FLAG_RING,
    FRAME_NBYTES,
    Frame,
    FrameKind,
    Message,
    message_bytes,
    pack_frame,
    wait_for_event,
)

__all__ = ["RoundReducing"]

_log = logging.getLogger(__name__)


class RoundReducing(RoundSending):
    """A round's reducing: a part's reducer and the sends of its averages (round the ring too)."""

    # ---- reducing ------------------------------------------------------------------------------

    def _start_reducer(self, part: int, expected: set[int], deadline_s: float) -> None:
        # (its own weight as the first reference: alike weights sum the values as they are)
        expected_now = expected - set(self.failed)
        reducer = PartReducer(part, self.chunks[part], expected_now, self.weight)
        self.reducers[part] = reducer
        self.spawn(self._add_own(reducer))
        self.spawn(self._reduce_deadline(reducer, deadline_s))

    async def _add_own(self, reducer: PartReducer) -> None:
        # A contribution already encoded with error feedback for the part's failed owner spent
        # the residual: its decoded values are what this member adds as the part's backup, as
        # any other member's resend is, or what the residual carried would reach nobody.
        fed = {
            chunk: self._fed[(reducer.part, chunk)]
            for chunk in range(len(reducer.chunks))
            if (reducer.part, chunk) in self._fed
        }
        if fed:
            await asyncio.wait(fed.values())

        def add() -> list[int]:
            non_finite = []
            for chunk, (a, b) in enumerate(reducer.chunks):
                spent = fed.get(chunk)
                if spent is None or spent.cancelled() or spent.exception() is not None:
                    values = self.local[a:b]
                else:
                    body = memoryview(message_bytes(spent.result()))[FRAME_NBYTES:]
                    values = self.codec.decode(body, a, b)
                weight = self.weight
                if weight != 0.0 and not values_finite(values):
                    # As a member's received chunk is: left out of the sum (counted as
                    # arrived, weight 0). Summed in, it made every member's average NaN.
                    weight = 0.0
                    non_finite.append(chunk)
                reducer.add(chunk, self.me, weight, values)
            return non_finite

        non_finite = await self.offload(add)
        if non_finite and self.own_non_finite is None:
            self.own_non_finite = (
                f"sent NaN or infinite values (chunk {non_finite[0]} of part {reducer.part}, "
                "its own: left out of the average)"
            )
            _log.warning(
                "peer %s: its own values of chunk %d of part %d in round %s are NaN or "
                "infinite: left out of the average",
                self.plan.members[self.me][:12],
                non_finite[0],
                reducer.part,
                self.round_id.hex()[:12],
            )
        for chunk in range(len(reducer.chunks)):
            self._check_chunk(reducer, chunk)

    async def _reduce_deadline(self, reducer: PartReducer, deadline_s: float) -> None:
        await self.clock.sleep_async(max(0.0, deadline_s - self.clock.monotonic()))
        for chunk in reducer.pending_chunks():
            self.spawn(self._finalize(reducer, chunk))

    def _check_chunk(self, reducer: PartReducer, chunk: int) -> None:
        if not reducer.finalized[chunk] and reducer.is_complete(chunk):
            self.spawn(self._finalize(reducer, chunk))

    async def _finalize(self, reducer: PartReducer, chunk: int) -> None:
        a, b = reducer.chunks[chunk]
        part = reducer.part
        own = part == self.me
        flags = 0 if own else FLAG_REASSIGNED
        if own and self._ring_intact():
            flags = FLAG_RING
        frame = Frame(FrameKind.RESULT, self.round_id, part, chunk, self.me, 0.0, flags)

        def work(land: bool) -> tuple[Message, list[int]] | None:
            got = reducer.finalize(chunk)
            if got is None:
                return None
            average, contributors = got
            prefix = pack_frame(frame) + pack_contributors(contributors)
            if average is None:  # no weighted contribution: no values, each keeps its own
                message: Message = prefix
                decoded = self.local[a:b]
            else:
                # (feedback only for an average the others take, a backup's too: a failed
                # owner's is not. Without it a part reassigned round after round, its owner
                # gone or slow, gathered every round's rounding error: 0.22 after 30 rounds
                # where the owner's own stayed at 0.017)
                feedback = self._average_feedback if land else None
                message, decoded = self.codec.encode(average, a, b, feedback, base=a, prefix=prefix)
            if land:
                self.output[a:b] = decoded  # what every receiver decodes, so all members agree
                self.has_output[part][chunk] = True
            return message, contributors

        started = time.perf_counter()
        # One write into a chunk's output at a time, as for the averages that come in
        # (:meth:`_take_result`): an owner's average still landing when the owner was declared
        # failed ends (and is dropped) before its backup's own lands, and this member's own
        # average does not land over a backup's once the others took its part from one.
        async with self._landing.setdefault((part, chunk), asyncio.Lock()):
            land = self.reducer_of[part] == self.me
            finished = await self._writing(lambda: work(land))
        self.encode_s += time.perf_counter() - started
        if finished is None:
            return
        message, contributors = finished
        if self.reducer_of[part] == self.me:
            self.result_from[part][chunk] = self.me
            self.result_contributors[part][chunk] = contributors
        fp32_nbytes = 4 * (b - a) if contributors else 0
        if flags & FLAG_RING and self._ring_intact():
            behind = self.steps.behind
            self._ring_results[chunk] = (message, fp32_nbytes)
            self._unconfirmed[chunk] = {
                m for m in range(self.plan.num_parts) if m != self.me and m not in self.failed
            }
            self._num_pending_result_sends += 1
            self.spawn(self._send_result(behind, message, fp32_nbytes, own=True, chunk=chunk))
        else:  # (a member that failed while this was encoded leaves the ring's flag on it: the
            # member behind may pass it on before it hears of the failure; repeats are dropped)
            if own and self.steps.ring:
                self._ring_left = self._ring_left or self._ring_broken_by
            for dest in range(self.plan.num_parts):
                if dest != self.me and dest not in self.failed:
                    self._num_pending_result_sends += 1
                    held = chunk if own else None  # (counts dest as holder, see _own_held)
                    self.spawn(self._send_result(dest, message, fp32_nbytes, own=own, chunk=held))
        self._check_done()

    def _ring_intact(self) -> bool:
        """Whether this member's averages go round the ring: it sends in steps round the ring,
        no member failed (it would take what it was to pass on along), none of its averages
        stalled on the way, and the result deadline has not passed."""
        return self.steps.ring and self._ring_broken_by is None

    def _go_direct(self, *, given_up: bool) -> None:
        """From now on send this member's averages directly: those round the ring and not
        known held go to every member not known to hold them, and every member is told to pass
        none of them on any more (``given_up``: the result deadline passed, and this member
        passes on no other owner's either)."""
        ring = self._ring_intact()
        if given_up:
            self._ring_given_up = True
        if ring:
            self._ring_broken_by = "result deadline" if given_up else "stalled"
        self._send_unconfirmed()
        if not ring or not self._unconfirmed:
            return  # nothing of this member's is (or will be) passed on round the ring
        # A word, not waited for: once every member holds the averages the round may end
        # without it (members then pass on what they still have, to no harm).
        off = pack_frame(Frame(FrameKind.RING_OFF, self.round_id, self.me, 0, self.me, 0.0))
        for dest in range(self.plan.num_parts):
            if dest != self.me and dest not in self.failed:
                self.spawn(self._notify(dest, off, word=True))

    def _send_unconfirmed(self) -> None:
        """Send this member's averages that went round the ring directly to every live member
        not known to hold them (but the member just behind: the ring's own send to it either
        arrives or fails it)."""
        for chunk, waiting in self._unconfirmed.items():
            message, fp32_nbytes = self._ring_results[chunk]
            for dest in sorted(waiting - {self.steps.behind}):
                if (chunk, dest) not in self._sent_directly and dest not in self.failed:
                    self._ring_left = self._ring_left or self._ring_broken_by
                    self._sent_directly.add((chunk, dest))
                    self._num_pending_result_sends += 1
                    self.spawn(self._send_result(dest, message, fp32_nbytes, own=True, chunk=chunk))

    def _held_by(self, chunk: int | None, member: int) -> None:
        """``member`` holds this member's average of ``chunk``."""
        if chunk is None:
            return
        if self.reducer_of[self.me] == self.me:
            self._own_held[chunk].add(member)
        if self._waits_no_more(chunk, member):
            self._check_done()

    def _waits_no_more(self, chunk: int, member: int) -> bool:
        """Stop waiting for ``member`` to hold this member's average of ``chunk``; once no live
        member is waited for, the average need not be kept. True if it was waited for."""
        waiting = self._unconfirmed.get(chunk)
        if waiting is None or member not in waiting:
            return False
        waiting.discard(member)
        if not waiting:
            del self._unconfirmed[chunk], self._ring_results[chunk]
            self._ring_progress.pop(chunk, None)
        elif chunk in self._ring_progress:
            self._ring_progress[chunk] = self.clock.monotonic()
        return True

    async def _send_result(
        self,
        dest: int,
        message: Message,
        fp32_nbytes: int,
        *,
        own: bool,
        chunk: int | None = None,
    ) -> None:
        """Send an average to ``dest`` (``own``: of this member's part; ``chunk``: the chunk of
        this member's part it is, of which ``dest`` then counts as holder, and whose time round
        the ring starts now if it goes round the ring)."""
        step = self.steps.result_step(dest) if own else None  # a backup's sends are unscheduled
        try:
            if step is not None:
                await self._step_turn(step)
            if chunk is not None and chunk in self._unconfirmed:
                # Round the ring its clock starts now: until its step began it waited for this
                # member's own sends (a slow uplink is no stall of the ring's)
                now = self.clock.monotonic()
                self._ring_progress.setdefault(chunk, now)
                if self._first_ring_at is None:
                    self._first_ring_at = now
            if own and not self.steps.in_steps:
                # All at once, this member's averages wait for its contributions to be sent:
                # sharing the uplink they would slow the contributions the other owners'
                # averages wait on (see steps.py).
                await wait_for_event(self._contributions_sent, self.reduce_deadline_s, self.clock)
            async with self.slots[dest]:
                if await self._transmit(dest, message):
                    self.fp32_bytes_sent += fp32_nbytes
                    self._held_by(chunk, dest)
        finally:
            if step is not None:
                self._step_sent(step)
            self._num_pending_result_sends -= 1
            self._check_done()
