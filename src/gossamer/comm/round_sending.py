"""How one member sends in an all-reduce round: its steps, sends and contributions.

A layer of :class:`~gossamer.comm.round_state.RoundState` (see :mod:`gossamer.comm.round_base`):
the pairwise steps (see :mod:`gossamer.comm.steps`), sends within the round's deadline (again
when the receiver had no room yet), and this member's contributions to the parts others reduce.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from gossamer.comm.round_base import RoundBase
from gossamer.comm.transport import (
    Frame,
    FrameKind,
    Message,
    message_nbytes,
    pack_frame,
    refused_for_room,
    wait_for_event,
)
from gossamer.core.errors import GossamerError

__all__ = ["RoundSending"]

_log = logging.getLogger(__name__)
_ROOM_RETRY_S = 0.05
"""First wait before a message refused for lack of room goes again (doubling, jittered)."""
_ROOM_RETRY_MAX_S = 1.0
"""Longest wait between its tries."""


def _with_frame(message: Message, prefix: bytes) -> Message:
    """``message`` behind another frame: ``prefix`` in place of its first ``len(prefix)`` bytes."""
    if isinstance(message, tuple):
        first, *rest = message
        return (prefix + bytes(first[len(prefix) :]), *rest)
    return prefix + bytes(message[len(prefix) :])


class RoundSending(RoundBase):
    """A round's sends: pairwise steps, sends within the deadline, this member's contributions."""

    def _contributions_finished(self) -> None:
        self._contributions_done_at = time.perf_counter()
        self._contributions_sent_at = self.clock.monotonic()
        self._contributions_sent.set()

    # ---- pairwise steps (see comm.steps) -------------------------------------------------------

    async def _step_turn(self, step: int) -> None:
        """Wait until ``step`` may start: see :mod:`gossamer.comm.steps`.

        Never past the reduce deadline; and once this member sent the previous step, at most
        ``patience`` (a quarter of the time it sent to that step's receiver, at least 50 ms)
        for the word of the step's receiver.
        """
        opened = self.steps.opened[step]
        if step > 0 and not opened.is_set():
            # A step opens only once the one before is all sent: wait for that first, then
            # at most the patience for the receiver's word.
            before = step - 1
            sent = self.steps.sends_done[before]
            await wait_for_event(sent, self.reduce_deadline_s, self.clock)
            if sent.is_set() and not opened.is_set():
                done_at = self._sends_done_at[before]
                if done_at is None:
                    done_at = self.clock.monotonic()
                began = self._step_began[self.steps.flow_start(before)]
                if began is None:  # (a fake clock starts at 0.0: no ``or`` here)
                    began = done_at
                patience_s = max(0.05, 0.25 * (done_at - began))
                until = min(done_at + patience_s, self.reduce_deadline_s)
                if not await wait_for_event(opened, until, self.clock):
                    self.steps.stop_waiting(step)
        await wait_for_event(opened, self.reduce_deadline_s, self.clock)
        if self._step_began[step] is None:
            self._step_began[step] = self.clock.monotonic()

    def _step_sent(self, step: int) -> None:
        if self.steps.sent(step):
            self._sends_done_at[step] = self.clock.monotonic()

    async def _ask_ahead(self) -> None:
        """Once a step opens, ask the next step's receiver to answer when its downlink is free.

        A step that continues the flow of the one before (see :meth:`PairwiseSteps.flow_start`)
        opens with it; the question for the step after it waits until the earlier steps of that
        flow are sent, so the receiver waits about one step for its answer, as for the others.
        """
        steps = self.steps
        for step in range(1, steps.num_steps):
            before = step - 1
            if steps.sends_to[step] == steps.sends_to[before]:
                continue  # the same flow goes on (round the ring, all of the all-gather)
            waits = [steps.opened[before]]
            waits += [steps.sends_done[b] for b in range(steps.flow_start(before), before)]
            for event in waits:
                if not await wait_for_event(event, self.reduce_deadline_s, self.clock):
                    return
            self.spawn(self._ask_ready(step))

    async def _ask_ready(self, step: int) -> None:
        """Ask the receiver of ``step`` whether this member may start it; the answer comes when
        the receiver got everything of the steps before (see :mod:`gossamer.comm.steps`).

        The question travels on this member's connection to the receiver, and the answer as
        the reply on that connection, never behind the receiver's own bulk data. It goes around
        the round's send tally, which would count the wait as time spent sending.
        """
        dest = self.steps.sends_to[step]
        remaining = self.reduce_deadline_s - self.clock.monotonic()
        if dest in self.failed or self.steps.opened[step].is_set() or remaining <= 0:
            return
        frame = Frame(FrameKind.STEP_ASK, self.round_id, 0, step, self.me, 0.0, 0)
        try:
            await self.untimed_transport.send(
                self.plan.members[dest],
                pack_frame(frame),
                timeout_s=min(self.send_timeout_s, remaining),
            )
        except GossamerError:
            return  # no word: the patience applies, and a dead peer shows in the data sends
        self.steps.receiver_ready(step, dest)

    # ---- sending -------------------------------------------------------------------------------

    async def _send(self, dest: int, message: Message, *, word: bool = False) -> bool:
        """Send within the round's deadline; False if none of it is left. A ``word`` (no data)
        goes around the send tally.

        A data message may take :meth:`_send_allowance_s` (a word: the send timeout).

        A refusal for lack of room (``dest`` has not opened the round yet, and others' early
        messages fill its waiting room: see :func:`refused_for_room`) is no failure of
        ``dest``'s: the message goes again, with backoff, within its send timeout (counted
        from the first try). Taken for a failure at once, it made this member drop a healthy
        one whenever a few identities flooded that one's room.

        Raises:
            GossamerError: the send failed.
        """
        transport = self.untimed_transport if word else self.transport
        backoff_s = _ROOM_RETRY_S
        # (refusals for room count against the message's own send timeout: a receiver that
        # answers every try so, hostile or under a flood it cannot shed, is failed as one
        # that does not take the message, not at the round's deadline after dozens of uploads)
        started = self.clock.monotonic()
        refusals_until = started + self.send_timeout_s
        nbytes = 0 if word else message_nbytes(message)
        give_up_at = started + (self._send_allowance_s(nbytes) if nbytes else self.send_timeout_s)
        self._bytes_in_flight += nbytes
        try:
            while True:
                now = self.clock.monotonic()
                remaining = self.deadline_s - now
                if remaining <= 0:
                    return False
                try:
                    await transport.send(
                        self.plan.members[dest],
                        message,
                        timeout_s=min(remaining, max(give_up_at - now, 0.01)),
                    )
                    return True
                except GossamerError as exc:
                    if not refused_for_room(exc) or self.clock.monotonic() >= refusals_until:
                        raise
                    _log.debug(
                        "peer %s: member %s has no room for an early message of round %s; "
                        "again in %.2f s",
                        self.plan.members[self.me][:12],
                        self.plan.members[dest][:12],
                        self.round_id.hex()[:12],
                        backoff_s,
                    )
                left_s = min(self.deadline_s, refusals_until) - self.clock.monotonic()
                await self.clock.sleep_async(
                    max(0.0, min(backoff_s * random.uniform(0.5, 1.0), left_s))
                )
                backoff_s = min(2 * backoff_s, _ROOM_RETRY_MAX_S)
        finally:
            self._bytes_in_flight -= nbytes

    def _send_allowance_s(self, nbytes: int) -> float:
        """How long a data message of ``nbytes`` may take before its receiver counts as failed:
        the send timeout (latency, the receiver's answer), plus the share of the round's time
        that the message and the bytes this member has under way before it are of the whole
        buffer encoded (:attr:`_round_nbytes`, about the least a member sends in a round).

        A link fast enough for the round to finish in its deadline carries that share within
        it, so a slow link never trips a send, however large the message; only a member that
        takes its bytes slower than the round can use is failed this way. A fixed timeout
        failed every member on links under about 3 Mbit/s: three 4 MiB messages under way to
        one member take 34 s at 3 Mbit/s, past the 30 s default, and the round averaged
        nothing (a 16 MB round between 2 peers at 1 Mbit/s: each member kept its own values).
        """
        round_s = max(0.0, self.deadline_s - self._begun_at)
        share = min(1.0, (self._bytes_in_flight + nbytes) / max(1, self._round_nbytes))
        return self.send_timeout_s + round_s * share

    async def _transmit(
        self, dest: int, message: Message, *, word: bool = False, counted: bool = True
    ) -> bool:
        """Send ``message`` to ``dest``; False if it did not go (``dest`` failed, no time left).

        A send still waiting when ``dest`` is declared failed is cancelled (see
        :meth:`peer_failed`): a member that hangs holds nothing up past that. A failed send
        declares ``dest`` failed, unless it is a ``word`` (no data, not counted in the bytes
        sent), whose loss costs only what the word would have saved. Only data is counted in
        the bytes sent (``counted``: a notice is not), as only data is in the bytes received.
        """
        if dest in self.failed:
            return False
        send = asyncio.ensure_future(self._send(dest, message, word=word))
        self._sends_to[dest].add(send)
        try:
            if not await send:
                return False
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if dest in self.failed and not (current is not None and current.cancelling()):
                return False  # cut short by peer_failed, not by the round's end
            raise
        except GossamerError as exc:
            if not word:
                self.peer_failed(dest, f"{type(exc).__name__}: {exc}", notify=True)
            return False
        finally:
            self._sends_to[dest].discard(send)
        if counted and not word:
            self.bytes_sent += message_nbytes(message)
        return True

    async def _send_part(self, part: int, dest: int, *, flags: int, counted: bool) -> None:
        step = self.steps.contribution_step(part) if flags == 0 else None

        async def one(chunk: int, a: int, b: int) -> None:
            try:
                if step is not None:
                    await self._step_turn(step)
                await send(chunk, a, b)
            finally:
                if step is not None:
                    self._step_sent(step)

        async def send(chunk: int, a: int, b: int) -> None:
            async with self.slots[dest]:
                if dest in self.failed or self.reducer_of[part] != dest:
                    return
                started = time.perf_counter()
                frame = Frame(
                    FrameKind.CONTRIBUTION, self.round_id, part, chunk, self.me, self.weight, flags
                )
                prefix = pack_frame(frame)
                message = await self._contribution(part, chunk, a, b, prefix)
                self.encode_s += time.perf_counter() - started
                if await self._transmit(dest, message):
                    self.fp32_bytes_sent += 4 * (b - a)

        try:
            async with asyncio.TaskGroup() as group:
                for chunk, (a, b) in enumerate(self.chunks[part]):
                    group.create_task(one(chunk, a, b))
        finally:
            if counted:
                self._num_contribution_senders -= 1
                if self._num_contribution_senders == 0:
                    self._contributions_finished()

    async def _contribution(self, part: int, chunk: int, a: int, b: int, prefix: bytes) -> Message:
        """The message of this member's values ``a..b`` (``chunk`` of ``part``) behind ``prefix``.

        With error feedback, the first encoding adds the residual kept from earlier rounds and
        keeps the new one: the feedback is spent on it. A resend (to the part's backup, its
        owner having failed) sends the same values again, under its own frame; encoded afresh
        without the residual, what the residual carried would reach nobody. Where the owner
        failed before any encoding, the resend is the first (before, it went without the
        residual, which then waited for the next round: a part reassigned round after round
        carried the same rounding error every round). Encodings with feedback change the
        caller's :class:`ErrorFeedback`, so the round's end waits for them (:meth:`settle`).
        """
        if self.feedback is None:
            fresh: Message = await self.offload(
                lambda: self.codec.encode_message(self.local, a, b, None, prefix=prefix)
            )
            return fresh
        spent = self._fed.get((part, chunk))
        if spent is None:
            feedback = self.feedback
            spent = asyncio.ensure_future(
                self._writing(
                    lambda: self.codec.encode_message(self.local, a, b, feedback, prefix=prefix)
                )
            )
            self._fed[(part, chunk)] = spent
            return await asyncio.shield(spent)  # a resend may wait for it too
        await asyncio.wait({spent})
        if spent.cancelled() or spent.exception() is not None:
            del self._fed[(part, chunk)]
            return await self._contribution(part, chunk, a, b, prefix)
        return _with_frame(spent.result(), prefix)

    async def _notify(self, dest: int, message: bytes, *, word: bool = False) -> None:
        """Send a notice nothing waits for (``word``: no data, and a failed send declares
        nobody failed; lost, it costs only what it would save)."""
        await self._transmit(dest, message, word=word, counted=False)

    def peer_failed(
        self,
        member: int,
        reason: str,
        *,
        notify: bool,
        told_by: int | None = None,
        delivered: bool = False,
    ) -> None:
        """Declare ``member`` failed: see :meth:`RoundFailures.peer_failed
        <gossamer.comm.round_failures.RoundFailures.peer_failed>`, which does it (a failed send
        calls it from here)."""
        raise NotImplementedError
