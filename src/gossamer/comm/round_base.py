"""The state one member keeps in an all-reduce round, and the round's tasks and writes.

The lowest of the layers :class:`~gossamer.comm.round_state.RoundState` is built from, each
a class of its own module over the one before: :class:`RoundBase` (here: the state and the
tasks), :class:`~gossamer.comm.round_sending.RoundSending` (steps and sends),
:class:`~gossamer.comm.round_reducing.RoundReducing` (reducing a part, sending its averages),
:class:`~gossamer.comm.round_failures.RoundFailures` (members that fail),
:class:`~gossamer.comm.round_receiving.RoundReceiving` (what arrives), then
:class:`~gossamer.comm.round_state.RoundState` (the round's course and its report).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from gossamer.comm.codecs import ErrorFeedback, FloatArray
from gossamer.comm.plan import FlatLayout, PartPlan
from gossamer.comm.reduction import ChunkCodec, PartReducer
from gossamer.comm.steps import PairwiseSteps
from gossamer.comm.transport import CommTransport, Frame, Message
from gossamer.core.clock import Clock

__all__ = ["RoundBase"]

_T = TypeVar("_T")


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


class RoundBase:
    """What one member tracks during a round, the round's tasks and the writes into ``output``
    (see :class:`~gossamer.comm.round_state.RoundState`, the round built on it)."""

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
        self._bytes_in_flight = 0
        """Bytes of this member's data messages under way (see :meth:`_send_allowance_s`)."""
        layout = chunk_codec.layout
        self._round_nbytes = sum(
            choice.codec.encoded_nbytes(numel, choice.block_size)
            for choice, numel in zip(layout.choices, layout.numels, strict=True)
        )
        """The whole buffer encoded: about the least a member sends in a round."""
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

    # ---- writing into output ------------------------------------------------------------------

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
