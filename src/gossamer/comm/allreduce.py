"""Fault-tolerant all-reduce: reduce-scatter then all-gather, chunk by chunk, under a deadline.

Each member owns one part of the flat buffer (sized by bandwidth, see :class:`PartPlan`; the
round's own sends are timed to measure it, see :mod:`gossamer.comm.bandwidth`). Every
member streams its values for each part to the part's owner, several chunks in flight per peer;
an owner averages a chunk as soon as every awaited member's copy arrived and sends the average
back to everyone. Long rounds send in pairwise steps, one destination at a time, so that no two
flows share a link (:mod:`gossamer.comm.steps`); short ones send to everyone at once.

Faults: a member whose send fails is marked failed and every other member is told (a
``PEER_FAILED`` frame), so owners stop waiting for it. So is a member whose contribution holds
NaN or infinite values (with a weight above 0), by the owner that receives it: the others
average without it instead of every member getting NaN. A part whose owner failed is reassigned
to the next live member in order, which averages it among the survivors; the report says so.
Owners stop waiting for contributions at the reduce deadline and average what arrived (weights
renormalised per chunk). At the round deadline everything still running is cancelled and parts
that never came back keep this member's own values. Numeric work runs in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from gossamer.comm.bandwidth import (
    DEFAULT_BYTES_PER_S,
    BandwidthMeter,
    BandwidthMeterConfig,
    SendRates,
    SendTally,
)
from gossamer.comm.codecs import CodecPolicy, ErrorFeedback, FloatArray, codec_by_name
from gossamer.comm.plan import FlatLayout, PartPlan, chunk_elements_for, round_id_of
from gossamer.comm.reduction import ChunkCodec
from gossamer.comm.report import AllReduceReport, AllReduceResult
from gossamer.comm.round_failures import failure_report
from gossamer.comm.round_state import RoundState
from gossamer.comm.transport import (
    CHUNK_ELEMENTS_LIMIT,
    WEIGHT_RANGE,
    CommMailbox,
    FinishedRound,
    wait_for_event,
    weight_in_range,
)
from gossamer.comm.wire import WireLimits
from gossamer.core.clock import Clock, SystemClock

__all__ = ["AllReduceConfig", "Offload", "all_reduce", "decline_round"]

_log = logging.getLogger(__name__)
T = TypeVar("T")
_DEFAULT_METER_CONFIG = BandwidthMeterConfig()
Offload = Callable[[Callable[[], Any]], Awaitable[Any]]
"""Runs a function off the event loop (``asyncio.to_thread`` unless a test swaps it)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class AllReduceConfig:
    """One averaging round."""

    timeout_s: float = 60.0
    """Deadline of the round: nothing waits past it."""
    reduce_deadline_share: float = 0.7
    """Share of the deadline after which owners average whatever contributions arrived."""
    send_timeout_s: float = 30.0
    """Deadline of one chunk message beyond its transfer; a peer that misses it is treated as
    failed. A data message is given this plus the share of ``timeout_s`` that its bytes, and
    those under way before it, are of the whole buffer encoded, so a link fast enough for the
    round never trips it (see :meth:`RoundSending._send_allowance_s
    <gossamer.comm.round_sending.RoundSending._send_allowance_s>`)."""
    chunk_elements: int | None = None
    """Values per chunk message; None: by the round's size
    (:func:`~gossamer.comm.plan.chunk_elements_for`: 2 MiB of float32 up to a 32 MiB round,
    4 MiB from 64 MiB, each one bulk chunk, one unary call). Every member of a round must use
    the same (the round's id covers it)."""
    max_in_flight_per_peer: int = 3
    """Chunk messages in flight to one peer at once."""
    min_step_s: float = 0.15
    """Send in pairwise steps (one destination at a time, see :mod:`gossamer.comm.steps`) when
    a step is expected to take at least this long: the largest part, encoded, over this peer's
    measured send rate. Shorter rounds (loopback, small tensors) send to everyone at once."""
    order: str = "auto"
    """How a member orders its sends: ``auto`` (by ``min_step_s`` and ``queue_s``), or always
    ``steps`` (pairwise, each waiting for its receiver's word), ``ordered`` (pairwise, no word)
    or ``open`` (all at once); see :mod:`gossamer.comm.steps`."""
    ring_all_gather: bool = True
    """In steps with the receiver's word (``steps``), send the averages round the ring (each
    owner to the member just behind, each member passing on what it gets from the member just
    ahead; see :mod:`gossamer.comm.steps`): after the reduce-scatter no member changes
    destination again. False: each owner sends its averages to every member itself."""
    ring_stall_s: float = 1.0
    """Round the ring, an owner whose average gained no holder for this long, or for as long
    as this member's reduce-scatter took if that is longer, sends its averages not yet known
    held directly to every member, and from then on sends what it averages directly: a member
    slow to receive or to pass on then holds the members behind it up for about that long,
    not until the result deadline. A healthy ring carries an average one hop a step, well
    within the reduce-scatter's time."""
    queue_s: float = 0.05
    """How much of a member's send rate the path is taken to queue (lab links: 50 ms, a common
    buffer size). A round of short steps whose messages all at once would be more than that,
    while one is not, sends one destination at a time (pairwise steps without the receiver's
    word): sent together, the tail of the burst is dropped at the queue and comes only after a
    retransmission timeout. Measured 2026-12-03, 4 peers, 20 Mbit/s lab links, 9 rounds each,
    medians, one destination at a time against all at once: 0.75 MB in 8 bits (48 KB parts)
    0.166 s against 0.317 s (gloo fp32 0.50 s); 0.3 MB fp32 (75 KB parts) 0.275 s against
    0.365 s; 2 MB in 8 bits (128 KB parts, just over the queue, so all at once by this rule)
    0.426 s against 0.515 s; but 0.75 MB fp32 (187 KB parts, more than the queue) 0.948 s
    against 0.645 s. At 50 Mbit/s 0.75 MB in 8 bits fits the queue all at once: 0.078 s
    against 0.079 s."""
    liveness_poll_s: float = 0.1
    """How often the round asks the caller's failure detector (``alive``) about the members."""
    codec: CodecPolicy = field(default_factory=CodecPolicy)
    """Codec of each tensor."""
    limits: WireLimits = field(default_factory=WireLimits)
    """What a received piece may announce."""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if not 0 < self.reduce_deadline_share < 1:
            raise ValueError("reduce_deadline_share must be between 0 and 1 (exclusive)")
        if self.send_timeout_s <= 0:
            raise ValueError(f"send_timeout_s must be positive, got {self.send_timeout_s}")
        if not self.min_step_s >= 0:
            raise ValueError(f"min_step_s must be >= 0, got {self.min_step_s}")
        if not self.ring_stall_s > 0:
            raise ValueError(f"ring_stall_s must be positive, got {self.ring_stall_s}")
        if not self.liveness_poll_s > 0:
            raise ValueError(f"liveness_poll_s must be positive, got {self.liveness_poll_s}")
        if not self.queue_s >= 0:
            raise ValueError(f"queue_s must be >= 0, got {self.queue_s}")
        if self.order not in ("auto", "steps", "ordered", "open"):
            raise ValueError(f"order must be auto, steps, ordered or open, got {self.order!r}")
        if (
            self.chunk_elements is not None and self.chunk_elements < 1
        ) or self.max_in_flight_per_peer < 1:
            raise ValueError("chunk_elements and max_in_flight_per_peer must be at least 1")
        if self.chunk_elements is not None and self.chunk_elements > CHUNK_ELEMENTS_LIMIT:
            raise ValueError(
                f"chunk_elements is at most {CHUNK_ELEMENTS_LIMIT} (a peer refuses larger "
                f"messages), got {self.chunk_elements}"
            )


def _send_order(
    plan: PartPlan, config: AllReduceConfig, rates: BandwidthMeter | SendRates | None
) -> str:
    """How this member orders its sends (see :mod:`gossamer.comm.steps`), by ``rates``: the
    round's agreed send rates, or this member's meter (None: it measured nothing).

    ``steps``: pairwise steps, each waiting for its receiver's word, when a step is expected to
    take at least ``min_step_s`` (the largest part, encoded, over the send rate). ``ordered``:
    pairwise steps without the word, when a step is shorter but all of them at once would be
    more than the path queues (``queue_s`` of the send rate) while one fits.
    ``open``: everything at once. Steps only when the parts are of about one size (within 2x:
    steps keep links to one flow when members move alike; with parts sized for links 10x apart
    the fast members would wait on the slow ones at every step, and sending all at once
    measured faster).
    """
    if config.order != "auto":
        return config.order
    sizes = [b - a for a, b in zip(plan.bounds, plan.bounds[1:], strict=False)]
    if not sizes or max(sizes) > 2 * min(sizes):
        return "open"
    step_bytes = codec_by_name(config.codec.codec).encoded_nbytes(
        max(sizes), config.codec.block_size
    )
    send_rate = rates.estimate_bytes_per_s if rates is not None else DEFAULT_BYTES_PER_S
    step_s = step_bytes / send_rate
    if step_s >= config.min_step_s:
        return "steps"
    # Small rounds do not measure the send rate (latency sets their messages' time); the floor
    # that they do measure errs low. Too low, a burst that fits the queue is taken for one that
    # does not (in order: a few ms where it was not needed, loopback and fast links), or a part
    # that fits for one that does not (all at once, as before this rule).
    floor = rates.floor_bytes_per_s if rates is not None else DEFAULT_BYTES_PER_S
    step_s = step_bytes / floor
    if step_s <= config.queue_s < (plan.num_parts - 1) * step_s:
        return "ordered"
    return "open"


def _flat_view(tensors: Sequence[torch.Tensor]) -> FloatArray | None:
    """The tensors' own memory as a flat float32 array, when one CPU fp32 tensor makes it up."""
    if len(tensors) != 1:
        return None
    only = tensors[0].detach()
    if only.dtype != torch.float32 or only.device.type != "cpu" or not only.is_contiguous():
        return None
    view: FloatArray = only.reshape(-1).numpy()
    return view


def _flatten(tensors: Sequence[torch.Tensor], layout: FlatLayout) -> FloatArray:
    view = _flat_view(tensors)
    if view is not None:  # read only from here on: no copy needed
        return view
    flat = np.empty(layout.total, dtype=np.float32)
    for tensor, lo, hi in zip(tensors, layout.offsets, layout.offsets[1:], strict=False):
        flat[lo:hi] = tensor.detach().to("cpu", torch.float32).reshape(-1).numpy()
    return flat


def _unflatten(flat: FloatArray, layout: FlatLayout, fresh: bool) -> list[torch.Tensor]:
    if fresh and len(layout.shapes) == 1 and layout.dtypes[0] == torch.float32:
        return [torch.from_numpy(flat).reshape(layout.shapes[0])]  # the buffer is the result's
    out = []
    for shape, dtype, lo, hi in zip(
        layout.shapes, layout.dtypes, layout.offsets, layout.offsets[1:], strict=False
    ):
        out.append(torch.from_numpy(flat[lo:hi].copy()).reshape(shape).to(dtype))
    return out


def _part_plan(
    members: Sequence[str],
    layout: FlatLayout,
    config: AllReduceConfig,
    bandwidth_weights: Sequence[float] | None,
) -> PartPlan:
    """The round's parts and chunks: what every member computes alike, so that a declined
    round names the same round id as the members who run it."""
    block_size = config.codec.block_size
    return PartPlan.create(
        members,
        layout.total,
        bandwidth_weights=bandwidth_weights,
        chunk_elements=config.chunk_elements or chunk_elements_for(layout.total, block_size),
        align=block_size,
    )


async def _to_its_end(work: Awaitable[T]) -> T:
    """Await ``work`` to its end even when the caller is cancelled meanwhile (the cancel is
    raised after it): its threads write into the caller's tensors, and no cancel stops a
    thread, so returning early would let them write on after the caller has its tensors back.
    """
    future = asyncio.ensure_future(work)
    cancelled = False
    while not future.done():
        try:
            with contextlib.suppress(Exception):  # the work's own error: raised below
                await asyncio.shield(future)
        except asyncio.CancelledError:  # (the work's own cancel is raised by result() below)
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return future.result()


def _check_8_bit_values_finite(tensors: Sequence[torch.Tensor], layout: FlatLayout) -> None:
    """Refuse NaN or infinite values where the 8-bit codec would send them: a block's scale
    would be NaN or infinite, every value of the block lost for every member.

    Raises:
        ValueError: so it is.
    """
    lossy = [
        # as sent, in float32: a float64 value beyond its range is inf there
        t.detach().to(torch.float32) if t.dtype == torch.float64 else t.detach()
        for t, c in zip(tensors, layout.choices, strict=True)
        if c.codec.name == "int8"
    ]
    # A sum is finite where every value is (and a tenth of the time of isfinite on 100 MB):
    # only a sum that overflowed from finite values needs the value by value check.
    sums = [t.sum() for t in lossy]
    if not sums or bool(torch.isfinite(torch.stack(sums)).all()):  # one sync, not one per tensor
        return
    if not all(bool(torch.isfinite(t).all()) for t in lossy):
        raise ValueError(
            "a tensor sent with the 8-bit codec holds NaN or infinite values, which would spoil "
            "its whole block for every member: withhold such values (weight 0, as the swarm "
            "does) or send them uncompressed"
        )


def _leave_unopened_round(mailbox: CommMailbox, plan: PartPlan, round_id: bytes) -> None:
    """Tell the others that this member, which never opened round ``round_id``, is not in it."""
    me = plan.members.index(mailbox.peer_id)
    others = [m for i, m in enumerate(plan.members) if i != me]
    mailbox.leave_round(round_id, failure_report(round_id, me), others, refuse=True)


def decline_round(
    tensors: Sequence[torch.Tensor],
    *,
    mailbox: CommMailbox,
    members: Sequence[str],
    round_key: str,
    config: AllReduceConfig | None = None,
    bandwidth_weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
) -> None:
    """Say, to any member that runs round ``round_key`` (the same arguments as its
    :func:`all_reduce`), that this peer averaged those tensors by other means and never joins
    it: such a member leaves the round as dropped at its first message here, instead of
    waiting to its deadline for this peer (a torch.distributed collective that succeeded here
    and failed on it, say, the last message lost with a killed member)."""
    config = config or AllReduceConfig()
    layout = FlatLayout(tensors, config.codec, names)
    plan = _part_plan(members, layout, config, bandwidth_weights)
    finished = FinishedRound(frozenset(plan.members), frozenset(), elsewhere=True)
    mailbox.close_round(round_id_of(round_key, plan, layout), finished=finished)


async def all_reduce(
    tensors: Sequence[torch.Tensor],
    *,
    mailbox: CommMailbox,
    members: Sequence[str],
    round_key: str,
    config: AllReduceConfig | None = None,
    weight: float = 1.0,
    bandwidth_weights: Sequence[float] | None = None,
    meter: BandwidthMeter | None = None,
    send_rates: SendRates | None = None,
    feedback: ErrorFeedback | None = None,
    names: Sequence[str] | None = None,
    clock: Clock | None = None,
    offload: Offload | None = None,
    out: Sequence[torch.Tensor] | None = None,
    alive: Callable[[str], bool] | None = None,
    announce: bool = False,
) -> AllReduceResult:
    """Average ``tensors`` across ``members`` (this peer among them) within the deadline.

    Args:
        tensors: this member's float tensors (CPU); the same shapes on every member. They are
            averaged in float32: a float64 tensor comes back with float32's precision, and a
            value beyond float32's range as infinite.
        mailbox: this peer's comm mailbox (over its transport).
        members: the agreed member list, in the agreed order.
        round_key: names the round (e.g. run id and step); the same on every member.
        config: deadline, chunking and codecs.
        weight: this member's weight in the average (e.g. its number of samples).
        bandwidth_weights: relative bandwidth of each member, the same on every member (e.g.
            :func:`~gossamer.comm.bandwidth.plan_weights` of the figures the group agreed on);
            parts are sized by it (equal parts when omitted).
        meter: this peer's bandwidth meter; the round's own traffic updates it (the figure is
            also in the report either way).
        send_rates: the send rates the members agreed on, the same on every member (e.g.
            :func:`~gossamer.comm.bandwidth.agreed_send_rates` of the figures they published),
            so that every member picks the same send order (see ``AllReduceConfig.order``).
            Omitted, each member picks by its own ``meter``: where the members' figures
            straddle ``min_step_s``'s rule, some then send in pairwise steps and others all at
            once, and one uplink can carry up to a third more than the others.
        feedback: error-feedback state kept by the caller across rounds (lossy codecs).
        names: stable tensor names for the error feedback (positions by default).
        clock: time source for deadlines.
        offload: runs numeric work off the event loop.
        out: tensors to write the averages into (shapes of ``tensors``; they may be
            ``tensors`` themselves); re-using them across rounds spares an allocation per
            round. The result's tensors are then ``out``. A round cancelled or failed part
            way may have written some averages into ``out`` already (where ``out`` is
            ``tensors``, the rest keeps this member's own values).
        alive: whether a member is alive, by the caller's failure detector; a member it reports
            gone is treated as failed at once (asked every ``config.liveness_poll_s``) instead
            of when a send to it misses its deadline.
        announce: tell every member at the start that this one is in the round, so one that
            averaged these tensors by other means (see :func:`decline_round`), or runs no
            round of this key or another group's (see :meth:`CommMailbox.settle_key`), says so
            at once, even to a member that would send it nothing before the reduce deadline.

    Returns:
        The averages and the round's report. Never raises for a failed peer: failures are in
        the report.
    """
    config = config or AllReduceConfig()
    clock = clock or SystemClock()
    offload = offload or asyncio.to_thread
    if mailbox.peer_id not in members:
        raise ValueError("this peer is not in the member list")
    layout = FlatLayout(tensors, config.codec, names)
    plan = _part_plan(members, layout, config, bandwidth_weights)
    round_id = round_id_of(round_key, plan, layout)
    try:  # (until the round opens, an error or a cancel here is told to the others below)
        if not weight_in_range(weight):
            raise ValueError(
                f"weight must be 0 or within {WEIGHT_RANGE} (the average is summed in "
                f"float32), got {weight}: scale the members' weights alike"
            )
        if out is not None and [tuple(t.shape) for t in out] != layout.shapes:
            raise ValueError("out must hold tensors of the same shapes as tensors")
        if weight != 0.0:  # (a weight-0 member's values are in no average)
            _check_8_bit_values_finite(tensors, layout)
        order = _send_order(plan, config, send_rates if send_rates is not None else meter)
        in_steps = order != "open"
        flat = await offload(lambda: _flatten(tensors, layout))
        target = _flat_view(out) if out is not None else None
        if target is not None and np.shares_memory(target, flat):
            flat = flat.copy()  # averaging in place: keep our own values while results land
    except BaseException:
        # The others would wait for this member's messages to their send timeouts.
        _leave_unopened_round(mailbox, plan, round_id)
        raise
    output = target if target is not None else np.empty(layout.total, dtype=np.float32)
    tally = SendTally(mailbox.transport, clock)
    state = RoundState(
        round_id=round_id,
        plan=plan,
        me=plan.members.index(mailbox.peer_id),
        local=flat,
        output=output,
        weight=weight,
        chunk_codec=ChunkCodec(layout, config.limits),
        transport=tally,
        untimed_transport=mailbox.transport,
        clock=clock,
        offload=offload,
        feedback=feedback,
        send_timeout_s=config.send_timeout_s,
        max_in_flight_per_peer=config.max_in_flight_per_peer,
        in_steps=in_steps,
        words=order == "steps",
        ring=config.ring_all_gather and order == "steps",
        ring_stall_s=config.ring_stall_s,
        alive=alive,
        liveness_poll_s=config.liveness_poll_s,
        answer_closed=mailbox.answer_closed,
        announce=announce,
    )
    report = AllReduceReport(
        round_id=round_id.hex(),
        peer_id=mailbox.peer_id,
        members=list(plan.members),
        codec=config.codec.codec,
        in_steps=in_steps,
    )
    started_wall = time.perf_counter()
    start = clock.monotonic()
    deadline = start + config.timeout_s
    state.reduce_deadline_s = start + config.timeout_s * config.reduce_deadline_share
    # A third of the time left after the reduce deadline for the owners' first averages to
    # arrive; a backup then still has the rest to reduce a silent owner's part again.
    share = config.reduce_deadline_share
    state.result_deadline_s = start + config.timeout_s * (share + (1 - share) / 3)
    state.deadline_s = deadline
    mailbox.open_round(round_id, state)
    finished = False
    leaving: tuple[bytes, list[str], bool] | None = None  # (its caller cancelled it)
    try:
        async with asyncio.TaskGroup() as group:
            state.group = group
            try:
                state.begin()
                finished = await wait_for_event(state.done, deadline, clock)
                report.deadline_hit = not finished
            except BaseException:
                if state.done.is_set():  # it ended; the cancel came before this task resumed
                    finished = True
                else:
                    leaving = state.leaving()  # (before its sends are cancelled)
                raise
            finally:  # the round's end, or its caller cancelled: a message still being
                state.cancel_all()  # handled then starts nothing in the closing task group
    finally:
        if leaving is None:
            mailbox.close_round(round_id, finished=state.finished() if finished else None)
        else:  # the others stop waiting for it now, not at their deadlines
            notice, members_left, delivered = leaving
            mailbox.leave_round(round_id, notice, members_left, refuse=not delivered)
        # A decode cut short by the deadline or a cancel writes on in its thread: the caller
        # gets its tensors back only once it ended.
        await _to_its_end(state.settle())
    state.fill_report(report, started_wall)
    for member in report.failed:
        tally.peer_failed(member)
    if meter is not None:
        report.send_bytes_per_s = meter.update(tally)
    else:
        report.send_bytes_per_s = tally.throughput_bytes_per_s(_DEFAULT_METER_CONFIG)
    if report.deadline_hit:
        _log.warning(
            "peer %s: round %s hit its deadline: %s",
            mailbox.peer_id[:12],
            round_key,
            report.outcome_counts(),
        )
    await _to_its_end(offload(state.fill_missing))
    if out is None:
        result = await offload(lambda: _unflatten(output, layout, fresh=True))
        return AllReduceResult(result, report)
    if target is None:
        averaged = await offload(lambda: _unflatten(output, layout, fresh=True))
        with torch.no_grad():
            for dest, value in zip(out, averaged, strict=True):
                dest.copy_(value)
    return AllReduceResult(list(out), report)
