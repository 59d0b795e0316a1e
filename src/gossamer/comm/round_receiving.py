"""What one member does with the messages of an all-reduce round that reach it.

A layer of :class:`~gossamer.comm.round_state.RoundState` (see :mod:`gossamer.comm.round_base`):
contributions to the parts it reduces, averages it lands (and passes on round the ring), and
the words (steps, failures, the ring given up, a round closed elsewhere).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gossamer.comm.reduction import unpack_contributors, values_finite
from gossamer.comm.round_failures import RoundFailures
from gossamer.comm.transport import (
    FLAG_DELIVERED,
    FLAG_ELSEWHERE,
    FLAG_REASSIGNED,
    FLAG_RING,
    FRAME_NBYTES,
    FinishedRound,
    Frame,
    FrameKind,
    Message,
    pack_frame,
    wait_for_event,
)
from gossamer.core.errors import ProtocolError

__all__ = ["RoundReceiving"]


class RoundReceiving(RoundFailures):
    """A round's receiving: :meth:`handle` takes each message the mailbox passes on."""

    # ---- receiving -----------------------------------------------------------------------------

    async def handle(self, sender: str, frame: Frame, body: Any) -> None:
        """Process one message of this round (called by the mailbox)."""
        member = self.index.get(sender)
        if member is None:
            raise ProtocolError(f"peer {sender[:12]} is not a member of this round")
        if frame.kind in (FrameKind.CONTRIBUTION, FrameKind.RESULT):
            # (as the bytes sent count: the header-only words are not)
            self.bytes_received += FRAME_NBYTES + len(body)
        n = self.plan.num_parts
        if frame.kind is FrameKind.STEP_ASK:
            # The sender of a step asks to start it: answer once everything before arrived.
            if self.steps.ring and n - 1 <= frame.chunk < self.steps.num_steps:
                # It sends its averages directly (its config has no ring), this member takes
                # them as they come: nothing to wait for.
                return
            self.steps.check_asker(frame.chunk, member)
            until = min(self.reduce_deadline_s, self.clock.monotonic() + 0.5 * self.send_timeout_s)
            await wait_for_event(self.steps.downlink_free[frame.chunk], until, self.clock)
            return
        if frame.kind is FrameKind.PEER_FAILED:
            if frame.peer_index >= n:
                raise ProtocolError(f"failure report for member {frame.peer_index} of {n}")
            if frame.peer_index == self.me and not self.done.is_set():
                self._on_excluded(f"declared failed by {sender[:12]}")
                return  # (finished: answered below, as the mailbox would once it is closed)
        if frame.kind is FrameKind.PRESENT:
            return  # only a member that is not in the round answers it
        if frame.kind is FrameKind.RESULT_HELD:
            if frame.part != self.me or frame.chunk >= len(self.chunks[self.me]):
                raise ProtocolError(
                    f"member {member} holds chunk {frame.chunk} of part {frame.part}, which is "
                    "not this member's to know"
                )
            self._held_by(frame.chunk, member)
            return
        if frame.kind is FrameKind.RING_OFF:
            if frame.part != member:
                raise ProtocolError(
                    f"member {member} took part {frame.part} off the ring, which is not its own"
                )
            self._ring_off.add(member)
            for send in list(self._passes.get(member, ())):
                send.cancel()
            return
        if frame.kind is FrameKind.ROUND_CLOSED:
            if frame.flags & FLAG_ELSEWHERE:  # it averaged the round another way: no part here
                if not self.done.is_set():
                    self._on_excluded(f"{sender[:12]} averaged this round by other means")
                return
            self._on_finished_elsewhere(member)
            return
        if self.done.is_set():  # finished, not yet closed: what the mailbox answers then
            finished = self.finished()
            answer = self.answer_closed
            if finished is not None and answer is not None and finished.answers(sender, frame):
                answer(sender, frame)
            if frame.kind is FrameKind.PEER_FAILED or frame.flags & FLAG_REASSIGNED:
                return  # nothing to start in a round that is over
        if frame.kind is FrameKind.PEER_FAILED:
            # Passed on once (this member knows of it from now on): a member that finished with
            # the failed owner's averages before the reporter could tell it answers that it had
            # (ROUND_CLOSED), so this one, maybe the part's backup, does not average it again
            # without it and end the round with a part the finished member does not hold.
            itself = frame.peer_index == member
            reason = "left the round" if itself else f"reported by {sender[:12]}"
            # (it says whether every member holds its averages; passed on, so does the report)
            delivered = bool(frame.flags & FLAG_DELIVERED)
            self.peer_failed(
                frame.peer_index, reason, notify=True, told_by=member, delivered=delivered
            )
            return
        if frame.part >= n or frame.chunk >= len(self.chunks[frame.part]):
            raise ProtocolError(f"chunk {frame.chunk} of part {frame.part} is not in the plan")
        if frame.kind is FrameKind.CONTRIBUTION:
            await self._on_contribution(member, frame, body)
        else:
            await self._on_result(member, frame, body)

    def finished(self) -> FinishedRound | None:
        """What to keep of this round once over, if it ended with every part's average here."""
        if not self.done.is_set() or self.excluded is not None:
            return None
        owned = frozenset(p for p in range(self.plan.num_parts) if self.reducer_of[p] == p)
        return FinishedRound(frozenset(self.plan.members), owned)

    def _on_finished_elsewhere(self, member: int) -> None:
        """``member`` had finished the round, with every part's average, when this member
        reported a failure to it or asked it to take a part over.

        Its averages of the failed owner's part came from that owner, before the owner failed
        here; nobody will send them to this member now, and what a backup would average
        instead differs from what ``member`` holds. So, once a part was reassigned here, this
        member leaves the round as if the others had dropped it: the caller takes their state
        (a swarm peer does, as after a missed round) instead of waiting for the deadline.
        """
        if self.done.is_set() or member in self.failed:
            return
        reassigned = [
            p for p in range(self.plan.num_parts) if self.chunks[p] and self.reducer_of[p] != p
        ]
        if reassigned:
            self._on_excluded(
                f"{self.plan.members[member][:12]} had finished the round before part "
                f"{reassigned[0]} was reassigned"
            )

    async def _on_contribution(self, member: int, frame: Frame, body: Any) -> None:
        part, chunk = frame.part, frame.chunk
        reducer = self.reducers.get(part)
        if reducer is None and frame.flags & FLAG_REASSIGNED and part != self.me:
            # The sender takes this member for the part's backup: every member before it in
            # the part's backup order (the owner first) failed in the sender's view. Its reports
            # of them may still be on their way (other calls): taken now, not dropped, this
            # contribution is averaged instead of waited for to the reduce deadline.
            n = self.plan.num_parts
            chain = [(part + step) % n for step in range((self.me - part) % n)]
            if member not in chain:  # (else its view is behind this one's: dropped below)
                sender = self.plan.members[member][:12]
                for gone in chain:
                    self.peer_failed(gone, f"reported by {sender}", notify=True, told_by=member)
                reducer = self.reducers.get(part)
        if part == self.me and not frame.flags & FLAG_REASSIGNED:
            self.steps.received_contribution(member, chunk)
        if reducer is None or reducer.finalized[chunk]:
            return  # not ours to reduce, or it came too late
        a, b = self.chunks[part][chunk]

        def work() -> bool:
            values = self.codec.decode(body, a, b)
            if frame.weight != 0.0 and not values_finite(values):
                return False  # (a weight-0 member's values are in no sum: NaN there is fine)
            reducer.add(chunk, member, frame.weight, values)
            return True

        started = time.perf_counter()
        usable = await self.offload(work)
        self.decode_s += time.perf_counter() - started
        if not usable:
            # One such member made every average NaN, every round, on every member (a peer
            # that skips the sender's own check: another build, a bug, a hostile peer). It is
            # dropped like a member that failed: the chunks it delivered finite still count,
            # the rest are averaged over the others, and everyone is told.
            self.peer_failed(
                member,
                f"sent NaN or infinite values (chunk {chunk} of part {part})",
                notify=True,
            )
            return
        self._check_chunk(reducer, chunk)

    async def _on_result(self, member: int, frame: Frame, body: Any) -> None:
        part, chunk = frame.part, frame.chunk
        passed_on = bool(frame.flags & FLAG_RING) and member != part
        if passed_on:  # the owner's average, round the ring: only from the member just ahead
            if member != self.steps.ahead or part == self.me:
                raise ProtocolError(
                    f"member {member} passed on an average of part {part} out of the ring's order"
                )
            await self._take_result(part, part, chunk, body, via=member, ring=True)
            return
        if member != self.reducer_of[part] and frame.flags & FLAG_REASSIGNED:
            if self.reducer_of[part] == part:  # we had not heard that the owner failed
                self.peer_failed(
                    part, f"reassigned by {self.plan.members[member][:12]}", notify=False
                )
            if part == self.me:  # others think this member failed: take the backup's average
                # The sender takes itself for this part's backup: every member between this
                # one and it failed in its view. So they do here too, and the others are told,
                # as for a reassigned contribution: without it any member could put its values
                # in place of this part's average here alone, and hold this member to its
                # deadline waiting for the rest.
                n = self.plan.num_parts
                sender = self.plan.members[member][:12]
                for gone in [(part + step) % n for step in range(1, (member - part) % n)]:
                    self.peer_failed(gone, f"reported by {sender}", notify=True, told_by=member)
                if self.plan.backup_of(part, set(self.failed) | {part}) != member:
                    return  # (the sender failed here)
                self.reducer_of[part] = member
                self._unconfirmed.clear()  # nobody waits for this member's own averages
                self._ring_results.clear()
        ring = bool(frame.flags & FLAG_RING)
        await self._take_result(member, part, chunk, body, via=member, ring=ring)

    async def _take_result(
        self, source: int, part: int, chunk: int, body: Any, *, via: int, ring: bool
    ) -> None:
        """Land the average of ``chunk`` of ``part`` that ``source`` reduced, sent here by
        ``via`` (``source`` itself, or round the ring the member just ahead; ``ring``: it goes
        round the ring), unless it is not the one to take."""
        if source == part:
            self.steps.received_result(part, chunk)
        # One average of a chunk lands at a time: two decodes into the same output would mix,
        # and one of an owner declared failed meanwhile must not end over its backup's.
        async with self._landing.setdefault((part, chunk), asyncio.Lock()):
            await self._land(source, part, chunk, body, via=via, ring=ring)

    async def _land(
        self, source: int, part: int, chunk: int, body: Any, *, via: int, ring: bool
    ) -> None:
        if source != self.reducer_of[part] or self.result_from[part][chunk] == source:
            return  # not the reducer's, or it came already (round the ring and directly)
        contributors, rest = unpack_contributors(body, self.plan.num_parts)
        a, b = self.chunks[part][chunk]
        if not contributors and len(rest):
            raise ProtocolError("an average without contributors carries values")

        def work() -> None:
            if contributors:
                self.output[a:b] = self.codec.decode(rest, a, b)
            else:  # no weighted contribution reached the reducer: this member keeps its own
                self.output[a:b] = self.local[a:b]

        if self._settled:
            return  # the round is over: its output is the caller's now
        started = time.perf_counter()
        await self._writing(work)
        self.decode_s += time.perf_counter() - started
        if source != self.reducer_of[part]:
            self.has_output[part][chunk] = False  # its owner failed meanwhile: not the average
            return
        self.has_output[part][chunk] = True
        self.result_from[part][chunk] = source
        self.result_contributors[part][chunk] = contributors
        if ring and via == self.steps.ahead:
            self._pass_on(part, chunk, body, told=via == part)
        self._check_done()

    def _pass_on(self, part: int, chunk: int, body: Any, *, told: bool) -> None:
        """Round the ring: pass the owner's average on to the member just behind (unless that
        is the owner: everyone holds it then), and tell the owner this member holds it (unless
        it is ``told``: the owner sent it here itself, and knows once its send returns).

        Nothing is passed on once this member knows a member failed or its result deadline
        passed: the owner then sends its averages directly to every member not known to hold
        them. A member that does not send round the ring itself (its own measure of its link
        put it out of steps) still passes on what comes round it, unscheduled.
        """
        behind = self.steps.behind
        if behind != part and self._passes_on(part):
            passed = Frame(FrameKind.RESULT, self.round_id, part, chunk, self.me, 0.0, FLAG_RING)
            a, b = self.chunks[part][chunk]
            fp32_nbytes = 4 * (b - a) if self.result_contributors[part][chunk] else 0
            self._num_pending_result_sends += 1
            self.spawn(self._pass(behind, (pack_frame(passed), body), fp32_nbytes, part))
        if not told:
            held = Frame(FrameKind.RESULT_HELD, self.round_id, part, chunk, self.me, 0.0, 0)
            self._num_pending_result_sends += 1
            self.spawn(self._tell_held(part, pack_frame(held)))

    def _passes_on(self, part: int) -> bool:
        """Whether this member still passes ``part``'s averages on round the ring: not once a
        member failed, its result deadline passed, or the owner said it sends them directly."""
        return not self.failed and not self._ring_given_up and part not in self._ring_off

    async def _pass(self, dest: int, message: Message, fp32_nbytes: int, part: int) -> None:
        """Pass an average on to ``dest``, the member just behind. Round the ring that waits
        only for the all-gather to open here (with the last reduce-scatter step, to the same
        member: one flow), not for the step before to be all sent: a chunk that is not passed
        on (it came directly, or after a failure) would never let that happen."""
        step = self.steps.forward_step(part) if self.steps.ring else None
        task = asyncio.current_task()
        under_way = self._passes.setdefault(part, set())
        if task is not None:
            under_way.add(task)  # cancelled if the owner says it sends directly (RING_OFF)
        try:
            if step is not None:
                await wait_for_event(self.steps.opened[step], self.reduce_deadline_s, self.clock)
            async with self.slots[dest]:
                if not self._passes_on(part):  # RING_OFF came as this was spawned
                    return
                if await self._transmit(dest, message):
                    self.fp32_bytes_sent += fp32_nbytes
        finally:
            under_way.discard(task)
            if step is not None:
                self._step_sent(step)
            self._num_pending_result_sends -= 1
            self._check_done()

    async def _tell_held(self, owner: int, message: bytes) -> None:
        """Tell ``owner`` this member holds an average of its (a word: if it is lost, the owner
        sends the average directly at its result deadline). Cancelled once ``owner`` is
        declared failed, like a data send to it."""
        try:
            await self._transmit(owner, message, word=True)
        finally:
            self._num_pending_result_sends -= 1
            self._check_done()

    def fill_missing(self) -> None:
        """Give every chunk that got no average this member's own values (in a thread).

        A member the others dropped keeps only the averages it received from their reducers.
        """
        for part, chunks in enumerate(self.chunks):
            for chunk, (a, b) in enumerate(chunks):
                if not self._authoritative(part, chunk):
                    self.output[a:b] = self.local[a:b]
