"""One member's state in one all-reduce round: what it sends, reduces, receives and who failed.

Driven by :func:`gossamer.comm.allreduce.all_reduce`, which owns the task group every task here
runs in and the deadlines. Messages arrive through :meth:`RoundState.handle` (the mailbox calls
it); numeric work goes through ``offload``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from gossamer.comm.codecs import ErrorFeedback, FloatArray
from gossamer.comm.plan import FlatLayout, PartPlan
from gossamer.comm.reduction import (
    ChunkCodec,
    PartReducer,
    pack_contributors,
    unpack_contributors,
    values_finite,
)
from gossamer.comm.report import AllReduceReport, PartOutcome, PartReport
from gossamer.comm.steps import PairwiseSteps
from gossamer.comm.transport import (
    FLAG_DELIVERED,
    FLAG_ELSEWHERE,
    FLAG_REASSIGNED,
    FLAG_RING,
    FRAME_NBYTES,
    CommTransport,
    FinishedRound,
    Frame,
    FrameKind,
    Message,
    message_bytes,
    message_nbytes,
    pack_frame,
    refused_for_room,
    wait_for_event,
)
from gossamer.core.clock import Clock
from gossamer.core.errors import GossamerError, ProtocolError

__all__ = ["RoundState", "failure_report"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")
_ROOM_RETRY_S = 0.05
"""First wait before a message refused for lack of room goes again (doubling, jittered)."""
_ROOM_RETRY_MAX_S = 1.0
"""Longest wait between its tries."""


def failure_report(round_id: bytes, member: int, *, delivered: bool = False) -> bytes:
    """A PEER_FAILED frame naming ``member`` (``delivered``: every member holds its averages,
    see ``FLAG_DELIVERED``)."""
    flags = FLAG_DELIVERED if delivered else 0
    return pack_frame(Frame(FrameKind.PEER_FAILED, round_id, 0, 0, member, 0.0, flags))


def _owner_feedback(feedback: ErrorFeedback, layout: FlatLayout) -> ErrorFeedback:
    """The residuals of the averages this member sends as an owner, dropped where the layout
    changed. Not where the part it owns moved (parts follow the members' bandwidth figures,
    which move from round to round): a residual of values another member sends now is paid
    back once this member owns them again, and the error of the run's averages summed over
    the rounds stays within about a round's all the same."""
    averages = feedback.of_averages()
    signature = layout.signature()
    if averages.layout != signature:
        averages.clear()
        averages.layout = signature
    return averages


def _with_frame(message: Message, prefix: bytes) -> Message:
    """``message`` behind another frame: ``prefix`` in place of its first ``len(prefix)`` bytes."""
    if isinstance(message, tuple):
        first, *rest = message
        return (prefix + bytes(first[len(prefix) :]), *rest)
    return prefix + bytes(message[len(prefix) :])


class RoundState:
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

    def __init__(
        self,
        *,
        round_id: bytes,
        plan: PartPlan,
        me: int,
        local: FloatArray,
        output: FloatArray,
        weight: float,
        chunk_codec: ChunkCodec,
        transport: CommTransport,
        clock: Clock,
        offload: Any,
        feedback: ErrorFeedback | None,
        send_timeout_s: float,
        max_in_flight_per_peer: int,
        in_steps: bool = True,
        words: bool = True,
        ring: bool = False,
        ring_stall_s: float = 1.0,
        untimed_transport: CommTransport | None = None,
        alive: Callable[[str], bool] | None = None,
        liveness_poll_s: float = 0.1,
        answer_closed: Callable[[str, Frame], None] | None = None,
        announce: bool = False,
    ) -> None:
        self.round_id = round_id
        self.plan = plan
        self.me = me
        self.local = local
        self.output = output
        """Where averages land; chunks that never got one are filled from ``local`` at the end."""
        self.weight = weight
        self.codec = chunk_codec
        self.transport = transport
        self.untimed_transport = untimed_transport or transport
        """Sends that are no data (a step's question): around the send tally."""
        self.clock = clock
        self.offload = offload
        self.feedback = feedback
        self._average_feedback = (
            _owner_feedback(feedback, chunk_codec.layout) if feedback is not None else None
        )
        """Feedback for the averages this member sends (its own part's, and a part it
        reduces as a backup)."""
        self.send_timeout_s = send_timeout_s
        self.alive = alive
        """Whether a member is alive by the caller's failure detector (None: no detector)."""
        self.liveness_poll_s = liveness_poll_s
        self.answer_closed = answer_closed
        self.announce = announce
        """Tell every member at the start that this one is in the round (a PRESENT frame)."""
        """Tells a member that this round finished here (the mailbox's, after it closed)."""
        n = plan.num_parts
        self.index = {peer: i for i, peer in enumerate(plan.members)}
        self.failed: dict[int, str] = {}
        self.excluded: str | None = None
        """Why the others dropped this member from the round (None while they have not)."""
        self.own_non_finite: str | None = None
        """Set when this member's own values of a part it reduces were NaN or infinite (with
        a weight above 0): they were left out, as a member's received ones are, and the report
        says so (:attr:`AllReduceReport.own_non_finite`)."""
        self.reducer_of = list(range(n))
        self.reducers: dict[int, PartReducer] = {}
        self.chunks = [plan.chunks(p) for p in range(n)]
        self.result_from: list[list[int | None]] = [[None] * len(c) for c in self.chunks]
        self.has_output: list[list[bool]] = [[False] * len(c) for c in self.chunks]
        self.result_contributors: list[list[list[int]]] = [[[] for _ in c] for c in self.chunks]
        self.slots = [asyncio.Semaphore(max_in_flight_per_peer) for _ in range(n)]
        self._sends_to: list[set[asyncio.Future[Any]]] = [set() for _ in range(n)]
        """Sends under way to each member (cancelled when it is declared failed)."""
        self.steps = PairwiseSteps(n, me, [len(c) for c in self.chunks], ring=in_steps and ring)
        self._ring_given_up = False
        """Set at the result deadline: from then on this member's averages go directly, and it
        passes on no other owner's."""
        self.ring_stall_s = ring_stall_s
        self._ring_progress: dict[int, float] = {}
        """For each chunk in ``_unconfirmed`` whose step began, when it last gained a holder
        (or its step began: it may still wait for a slot to the member just behind)."""
        self._ring_broken_by: str | None = None
        """What ended this member's averages going round the ring, once something did: a
        member failed (``member failed``), its result deadline passed (``result deadline``), or
        one of its averages gained no holder for the stall allowance (``stalled``,
        :meth:`_ring_allowance`)."""
        self._ring_left: str | None = None
        """``_ring_broken_by`` once one of this member's averages went directly because of it
        (the report's ``ring_left``)."""
        self._first_ring_at: float | None = None
        """When this member's first average went to be sent round the ring (round's clock)."""
        self._ring_off: set[int] = set()
        """Parts whose owners said they send their averages directly now (``RING_OFF``)."""
        self._passes: dict[int, set[asyncio.Future[Any]]] = {}
        """Passes on under way, by part: dropped, on the wire or not, when the part's owner
        says ``RING_OFF`` (a pass to a member slow to receive would hold this one to the end
        of the round for nothing; the send tally keeps the dropped send's time, as for one the
        deadline cut, and takes the round's figure from the fastest destination anyway)."""
        self._ring_results: dict[int, tuple[Message, int]] = {}
        """This member's averages sent round the ring, by chunk (message, fp32 bytes), kept
        until every live member is known to hold them: what a failure or the result deadline
        sends directly."""
        self._unconfirmed: dict[int, set[int]] = {}
        """For each chunk in ``_ring_results``, the live members not yet known to hold it."""
        self._sent_directly: set[tuple[int, int]] = set()
        """(chunk, member) of the ring's averages sent to a member directly."""
        self._writers: set[asyncio.Future[Any]] = set()
        """Work under way in threads that writes into ``output`` or the error feedback (see
        :meth:`settle`)."""
        self._fed: dict[tuple[int, int], asyncio.Future[Message]] = {}
        """This member's contributions encoded with error feedback, by (part, chunk): what a
        resend to the part's backup sends again (:meth:`_contribution`)."""
        self._settled = False
        """Set by :meth:`settle`: no more averages land."""
        self._landing: dict[tuple[int, int], asyncio.Lock] = {}
        """(part, chunk) -> held while an average of it is decoded into the output."""
        if not in_steps:
            self.steps.open_all()
        elif not words:
            self.steps.without_words()
        self._step_began: list[float | None] = [None] * self.steps.num_steps
        self._sends_done_at: list[float | None] = [None] * self.steps.num_steps
        self.done = asyncio.Event()
        self.group: asyncio.TaskGroup | None = None
        self.reduce_deadline_s = 0.0
        self.result_deadline_s = 0.0
        """When this member's averages held up round the ring go directly, and from which an
        owner that sends no average of its part soon counts as failed (see
        :meth:`_watch_results`)."""
        self.deadline_s = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._cancelled = False
        self._num_pending_result_sends = 0
        self._num_contribution_senders = 0
        self._own_held: list[set[int]] = [set() for _ in self.chunks[me]]
        """For each chunk of this member's part, the members known to hold its average."""
        self._started = time.perf_counter()
        self._begun_at = 0.0
        """When the round began, on the round's clock."""
        self._contributions_done_at: float | None = None
        self._contributions_sent_at: float | None = None
        """When this member's contributions were all sent, on the round's clock."""
        self._contributions_sent = asyncio.Event()
        self._own_part_done_at: float | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.fp32_bytes_sent = 0
        self.encode_s = 0.0
        self.decode_s = 0.0

    # ---- lifecycle ---------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the round's task group (cancelled when the round ends; after that,
        not run at all)."""
        if self._cancelled:
            coro.close()
            return
        assert self.group is not None
        task = self.group.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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

    def _contributions_finished(self) -> None:
        self._contributions_done_at = time.perf_counter()
        self._contributions_sent_at = self.clock.monotonic()
        self._contributions_sent.set()

    def cancel_all(self) -> None:
        """Cancel every task of the round (the task group then awaits them)."""
        self._cancelled = True
        self.steps.release()
        for task in list(self._tasks):
            task.cancel()

    def _check_done(self) -> None:
        if any(r.pending_chunks() for r in self.reducers.values()):
            return
        if self._own_part_done_at is None:
            self._own_part_done_at = time.perf_counter()
        if self._num_pending_result_sends or any(self._unconfirmed.values()):
            return
        for part, sources in enumerate(self.result_from):
            if any(source != self.reducer_of[part] for source in sources):
                return
        self.done.set()

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
        give_up_at = self.clock.monotonic() + self.send_timeout_s
        while True:
            now = self.clock.monotonic()
            remaining = self.deadline_s - now
            if remaining <= 0:
                return False
            try:
                await transport.send(
                    self.plan.members[dest],
                    message,
                    timeout_s=min(self.send_timeout_s, remaining, max(give_up_at - now, 0.01)),
                )
                return True
            except GossamerError as exc:
                if not refused_for_room(exc) or self.clock.monotonic() >= give_up_at:
                    raise
                _log.debug(
                    "peer %s: member %s has no room for an early message of round %s; again "
                    "in %.2f s",
                    self.plan.members[self.me][:12],
                    self.plan.members[dest][:12],
                    self.round_id.hex()[:12],
                    backoff_s,
                )
            left_s = min(self.deadline_s, give_up_at) - self.clock.monotonic()
            await self.clock.sleep_async(
                max(0.0, min(backoff_s * random.uniform(0.5, 1.0), left_s))
            )
            backoff_s = min(2 * backoff_s, _ROOM_RETRY_MAX_S)

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

    # ---- failures ------------------------------------------------------------------------------

    def peer_failed(
        self,
        member: int,
        reason: str,
        *,
        notify: bool,
        told_by: int | None = None,
        delivered: bool = False,
    ) -> None:
        """Stop waiting for ``member``, reassign what it reduced, and (optionally) tell the rest
        (but ``told_by``, the member that reported it here). With ``delivered`` (it left the
        round saying every member holds its averages) its own part is not reassigned.

        ``member`` itself is told too: if it is alive (wrongly declared failed, or cut off from
        one member only) it stops at once instead of at its deadline, and does not take its own
        averages for the ones the others take from a backup.
        """
        if member == self.me or member in self.failed:
            return
        ring = self._ring_intact()
        if ring:
            self._ring_broken_by = "member failed"
        self.failed[member] = reason
        self.steps.member_failed(member)
        for chunk in list(self._unconfirmed):
            self._waits_no_more(chunk, member)
        if ring:
            self._send_unconfirmed()
        for send in list(self._sends_to[member]):
            send.cancel()
        _log.info(
            "peer %s: member %s failed in round %s: %s",
            self.plan.members[self.me][:12],
            self.plan.members[member][:12],
            self.round_id.hex()[:12],
            reason,
        )
        for reducer in self.reducers.values():
            reducer.expected.discard(member)
            for chunk in reducer.pending_chunks():
                self._check_chunk(reducer, chunk)
        for part in range(self.plan.num_parts):
            held = delivered and part == member  # (every member holds its averages)
            if self.reducer_of[part] == member and self.chunks[part] and not held:
                self._reassign(part)
        message = self._failure_report(member, delivered=delivered)
        if notify:
            for dest in range(self.plan.num_parts):
                if dest not in (self.me, told_by) and dest not in self.failed:
                    self.spawn(self._notify(dest, message))
        self.spawn(self._tell_excluded(member, message))
        self._check_done()

    def leaving(self) -> tuple[bytes, list[str], bool]:
        """What this member tells the others when it leaves the round before its end (its
        caller cancelled it): a failure report naming itself, the members to tell, and whether
        every one of them holds its averages already (the report says so: they do not average
        its part again, which a member whose part's backup had finished would leave the round
        over).
        """
        n = self.plan.num_parts
        live = {m for m in range(n) if m != self.me and m not in self.failed}
        # (a member that reduces a failed owner's part too says nothing of its own: both are
        # reassigned, as after any failure of a backup)
        backup = any(self.reducer_of[p] == self.me for p in range(n) if p != self.me)
        delivered = (
            not backup
            and self.reducer_of[self.me] == self.me
            and all(live <= held for held in self._own_held)
        )
        notice = self._failure_report(self.me, delivered=delivered)
        return notice, [self.plan.members[m] for m in sorted(live)], delivered

    def _failure_report(self, member: int, *, delivered: bool) -> bytes:
        return failure_report(self.round_id, member, delivered=delivered)

    async def _present(self, dest: int, message: bytes) -> None:
        """Tell ``dest`` that this member is in the round (see ``announce``).

        A refusal (it runs no round of this key, or another group's) drops it at once; any
        other failure is left to the data sends and their deadlines: a member still forming
        holds the message until its round opens, and a late answer is no fault of its own.
        """
        if dest in self.failed:
            return
        send = asyncio.ensure_future(self._send(dest, message, word=True))
        self._sends_to[dest].add(send)
        try:
            await send
        except ProtocolError as exc:
            self.peer_failed(dest, f"{type(exc).__name__}: {exc}", notify=True)
        except GossamerError:
            pass
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if dest in self.failed and not (current is not None and current.cancelling()):
                return  # cut short by peer_failed, not by the round's end
            raise
        finally:
            self._sends_to[dest].discard(send)

    async def _notify(self, dest: int, message: bytes, *, word: bool = False) -> None:
        """Send a notice nothing waits for (``word``: no data, and a failed send declares
        nobody failed; lost, it costs only what it would save)."""
        await self._transmit(dest, message, word=word, counted=False)

    async def _tell_excluded(self, member: int, message: bytes) -> None:
        # Best effort: the member is probably gone, and the round never waits for this send.
        with contextlib.suppress(GossamerError):
            await self._send(member, message)

    def _on_excluded(self, reason: str) -> None:
        # The others take a backup's averages for what this member reduced; its own would
        # differ, so they are dropped at the end (fill_missing) and the round ends now.
        if self.excluded is None:
            self.excluded = reason
            _log.info(
                "peer %s: the others dropped it from round %s: %s",
                self.plan.members[self.me][:12],
                self.round_id.hex()[:12],
                reason,
            )
        self.done.set()

    def _authoritative(self, part: int, chunk: int) -> bool:
        """Whether this member's output for the chunk is what the others hold (or will)."""
        if self.excluded is None:
            return self.has_output[part][chunk]
        source = self.result_from[part][chunk]
        return source is not None and source != self.me and self.reducer_of[part] != self.me

    def _reassign(self, part: int) -> None:
        backup = self.plan.backup_of(part, set(self.failed))
        if backup is None:
            return
        self.reducer_of[part] = backup
        if backup == self.me:
            # The survivors resend this part now: give them at least half the time left.
            now = self.clock.monotonic()
            deadline_s = max(self.reduce_deadline_s, now + 0.5 * (self.deadline_s - now))
            self._start_reducer(part, set(range(self.plan.num_parts)), deadline_s)
        else:
            self.spawn(self._send_part(part, backup, flags=FLAG_REASSIGNED, counted=False))

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

    async def _writing(self, work: Callable[[], _T]) -> _T:
        """Run ``work``, which writes into ``output``, in a thread (``offload``). If the caller
        is cancelled (a dropped message, the round's end) the thread writes on: the caller
        still waits for it, however often it is cancelled (an average's landing lock is held
        until it is done, so no other average of the chunk lands into the same values
        meanwhile), and :meth:`settle` waits for it too."""
        job: asyncio.Future[_T] = asyncio.ensure_future(self.offload(work))
        self._writers.add(job)
        job.add_done_callback(self._writers.discard)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            while not job.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({job})
            if not job.cancelled():
                job.exception()  # (retrieved: the round goes on without this work)
            raise

    async def settle(self) -> None:
        """Let no more averages land, and wait for the writes into ``output`` and the error
        feedback under way: once this returns both are the caller's (called when the round is
        over)."""
        self._settled = True
        while self._writers:
            await asyncio.wait(set(self._writers))

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
