"""All-reduce on the in-memory fake: exact means, weights, codecs, faults and deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import itertools
import time
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from comm_fakes import IdleJumpClock, RateLimitedTransport, inline_offload

from comm_leaving import CancelsAfterItsFirstAverage
from gossamer.comm import allreduce as allreduce_module
from gossamer.comm.allreduce import AllReduceConfig, all_reduce
from gossamer.comm.codecs import CodecPolicy, ErrorFeedback, codec_by_name
from gossamer.comm.early_room import NO_ROOM
from gossamer.comm.fake_transport import FakeNetwork, FakeTransport, FaultScript, FaultyTransport
from gossamer.comm.plan import FlatLayout, PartPlan
from gossamer.comm.reduction import ChunkCodec, pack_contributors
from gossamer.comm.report import AllReduceResult, PartOutcome
from gossamer.comm.round_sending import _ROOM_RETRY_MAX_S
from gossamer.comm.round_state import RoundState
from gossamer.comm.transport import (
    CHUNK_ELEMENTS_LIMIT,
    FLAG_DELIVERED,
    FLAG_REASSIGNED,
    FLAG_RING,
    CommMailbox,
    FinishedRound,
    Frame,
    FrameKind,
    Message,
    message_bytes,
    message_nbytes,
    pack_frame,
    refused_for_room,
    sender_host,
    unpack_frame,
)
from gossamer.comm.wire import WireLimits
from gossamer.core.clock import SystemClock
from gossamer.core.errors import (
    DeadlineExceededError,
    GossamerError,
    PeerUnavailableError,
    ProtocolError,
)

TIMEOUT_S = 30.0
CONFIG = AllReduceConfig(
    timeout_s=TIMEOUT_S,
    send_timeout_s=5.0,
    chunk_elements=500,
    max_in_flight_per_peer=2,
    codec=CodecPolicy(codec="none", block_size=64, min_compressed_numel=0),
)
SCHEDULES = ("ring", "steps", "ordered", "open")
"""Each way a round may send (see comm.steps; ``ring``: in steps, the all-gather round the
ring); every test runs with each."""
_schedule = {"name": "ring"}


@pytest.fixture(autouse=True, params=SCHEDULES)
def schedule(request: pytest.FixtureRequest) -> str:
    _schedule["name"] = str(request.param)
    return str(request.param)


def _scheduled(config: AllReduceConfig) -> AllReduceConfig:
    """``config`` sending the way of the test's schedule."""
    name = _schedule["name"]
    order = "steps" if name == "ring" else name
    return dataclasses.replace(config, order=order, ring_all_gather=name == "ring")


SHAPES = [(40, 50), (7,), (3, 300), (1,)]


def _inputs(num_members: int, seed: int = 0) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(num_members)]


def _mean(inputs: Sequence[Sequence[torch.Tensor]], members: Sequence[int]) -> list[torch.Tensor]:
    return [
        torch.stack([inputs[m][t].double() for m in members]).mean(0) for t in range(len(SHAPES))
    ]


def _run(
    inputs: list[list[torch.Tensor]],
    *,
    scripts: dict[int, FaultScript] | None = None,
    absent: Sequence[int] = (),
    config: AllReduceConfig | None = None,
    weights: Sequence[float] | None = None,
    bandwidths: Sequence[float] | None = None,
    gone_at: dict[str, float] | None = None,
    finished_at: dict[int, float] | None = None,
    made: dict[int, Callable[[FakeNetwork, str], FakeTransport]] | None = None,
) -> tuple[dict[int, AllReduceResult], IdleJumpClock]:
    """Run one round of ``len(inputs)`` members on a fake network; member i's transport
    follows ``scripts[i]``, or is ``made[i](network, peer_id)``."""
    clock = IdleJumpClock()
    scripts = scripts or {}
    made = made or {}
    config = _scheduled(config or CONFIG)
    members = [f"peer-{i}" for i in range(len(inputs))]

    def transport(network: FakeNetwork, i: int) -> FakeTransport:
        if i not in made:
            return network.transport(members[i], scripts.get(i))
        network.transports[members[i]] = made[i](network, members[i])
        return network.transports[members[i]]

    async def main() -> dict[int, AllReduceResult]:
        network = FakeNetwork(clock)
        mailboxes = {
            i: CommMailbox(transport(network, i), clock)
            for i in range(len(members))
            if i not in absent  # an absent peer refuses connections
        }

        async def one(i: int) -> AllReduceResult:
            result = await all_reduce(
                inputs[i],
                mailbox=mailboxes[i],
                members=members,
                round_key="run/7",
                config=config,
                weight=1.0 if weights is None else weights[i],
                bandwidth_weights=bandwidths,
                clock=clock,
                offload=inline_offload,
                alive=None
                if gone_at is None
                else lambda peer: clock.monotonic() < gone_at.get(peer, float("inf")),
            )
            if finished_at is not None:
                finished_at[i] = clock.monotonic()
            return result

        async with asyncio.TaskGroup() as group:
            tasks = {i: group.create_task(one(i)) for i in range(len(inputs)) if i not in absent}
        return {i: t.result() for i, t in tasks.items()}

    return asyncio.run(clock.run(main())), clock


def _assert_close(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], atol: float) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g.double(), w, atol=atol, rtol=0)


def _assert_everyones_mean(
    results: dict[int, AllReduceResult], inputs: list[list[torch.Tensor]]
) -> None:
    """Every member has every member's mean, every part averaged by its owner, nobody failed."""
    for i, result in results.items():
        assert result.report.failed == {}, (i, result.report.failed)
        assert all(p.outcome is PartOutcome.AVERAGED for p in result.report.parts), i
        _assert_close(result.tensors, _mean(inputs, range(len(inputs))), atol=1e-6)


def _assert_agree(results: dict[int, AllReduceResult]) -> None:
    first = next(iter(results.values())).tensors
    for result in results.values():
        for a, b in zip(result.tensors, first, strict=True):
            assert torch.equal(a, b)


def test_exact_mean_without_faults() -> None:
    inputs = _inputs(4)
    results, clock = _run(inputs)
    want = _mean(inputs, range(4))
    for result in results.values():
        _assert_close(result.tensors, want, atol=1e-6)
        report = result.report
        assert not report.failed
        assert not report.deadline_hit
        assert [p.outcome for p in report.parts] == [PartOutcome.AVERAGED] * 4
        assert all(len(p.contributors) == 4 for p in report.parts)
        assert report.bytes_sent > 0
        assert report.bytes_received > 0
        assert 0.9 < report.compression_ratio < 1.0  # headers cost a little
        assert report.round_the_ring == (_schedule["name"] == "ring")
        assert report.ring_left is None
    _assert_agree(results)
    assert clock.monotonic() == 0.0  # no deadline was needed


def test_matches_torch_mean_with_dtypes_kept() -> None:
    inputs = [[torch.randn(100, 30).to(torch.float16), torch.randn(64)] for _ in range(3)]
    clock = IdleJumpClock()
    del clock
    results, _ = _run(inputs)
    for result in results.values():
        assert result.tensors[0].dtype == torch.float16
        want = torch.stack([i[1] for i in inputs]).mean(0)
        torch.testing.assert_close(result.tensors[1], want, atol=1e-6, rtol=1e-6)


def test_weights_make_a_weighted_mean() -> None:
    inputs = _inputs(3)
    results, _ = _run(inputs, weights=[1.0, 2.0, 0.0])
    want = [(inputs[0][t].double() + 2 * inputs[1][t].double()) / 3 for t in range(len(SHAPES))]
    for result in results.values():
        _assert_close(result.tensors, want, atol=1e-6)


def test_where_only_weight_0_values_reached_a_reducer_every_member_keeps_its_own() -> None:
    # Peer 1 (weight 0: it withheld its values, zeros) reduces part 1; peer 0's values for it
    # arrive only after the reduce deadline (a slow uplink). Before, peer 1 sent its own
    # values as part 1's average and peer 0, the only member with weight, took the zeros.

    class _SlowContributions(FakeTransport):
        async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
            frame, _ = unpack_frame(memoryview(message_bytes(message)))
            if frame.kind is FrameKind.CONTRIBUTION:
                await self.network.clock.sleep_async(TIMEOUT_S * 0.75)
            await super().send(peer_id, message, timeout_s=timeout_s)

    inputs = [_inputs(1)[0], [torch.zeros(shape) for shape in SHAPES]]
    config = dataclasses.replace(CONFIG, send_timeout_s=TIMEOUT_S)
    results, _ = _run(inputs, config=config, weights=[1.0, 0.0], made={0: _SlowContributions})
    for i, result in results.items():
        assert result.report.parts[1].outcome is PartOutcome.KEPT_LOCAL, i
        assert result.report.parts[1].contributors == []
    start = results[0].report.parts[0].num_elements
    for i in (0, 1):
        kept = torch.cat([t.reshape(-1) for t in results[i].tensors])[start:]
        own = torch.cat([t.reshape(-1) for t in inputs[i]])[start:]
        assert torch.equal(kept, own), i


def _start_alone(
    tensors: list[torch.Tensor], *, weight: float = 1.0, config: AllReduceConfig = CONFIG
) -> None:
    """Start a round of two members as the first (raises what the call refuses up front)."""
    clock = IdleJumpClock()

    async def main() -> None:
        mailbox = CommMailbox(FakeNetwork(clock).transport("peer-0"), clock)
        await all_reduce(
            tensors,
            mailbox=mailbox,
            members=["peer-0", "peer-1"],
            round_key="run/alone",
            config=dataclasses.replace(config, timeout_s=1.0),
            weight=weight,
            clock=clock,
            offload=inline_offload,
        )

    asyncio.run(clock.run(main()))


@pytest.mark.parametrize("weight", [1e39, 1e13, 1e-46, -1.0, float("nan"), float("inf")])
def test_a_weight_the_float32_sums_cannot_hold_is_refused(weight: float) -> None:
    # (1e39 is infinite in float32 and turned every average to NaN; 1e-46 is 0 there, and
    # members whose weights were all that small divided 0 by 0)
    with pytest.raises(ValueError, match="weight must be 0 or within"):
        _start_alone(_inputs(1)[0], weight=weight)
    header = pack_frame(Frame(FrameKind.CONTRIBUTION, bytes(16), 0, 0, 0, weight))
    with pytest.raises(ProtocolError, match="weights are 0 or within"):
        unpack_frame(memoryview(header))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on the overflow itself
def test_an_average_that_overflows_in_8_bits_is_sent_at_the_largest_scale() -> None:
    # Finite values and weights whose float32 sum overflows: the owner's average is inf, its
    # 8-bit scale was inf, every receiver refused it as no encoder's and the owner declared
    # them all failed. The average goes at the largest scale a receiver takes, as FLT_MAX.
    inputs = [[torch.full(shape, 1e27) for shape in SHAPES] for _ in range(3)]
    config = dataclasses.replace(
        CONFIG, codec=CodecPolicy(codec="int8", block_size=64, min_compressed_numel=1)
    )
    results, _ = _run(inputs, config=config, weights=[1e12, 1e12, 1e12])
    for result in results.values():
        assert result.report.failed == {}
        assert all(p.outcome is PartOutcome.AVERAGED for p in result.report.parts)
        assert all(bool(torch.isfinite(t).all()) for t in result.tensors)


def test_nan_values_are_refused_before_the_8_bit_codec_spoils_their_block() -> None:
    inputs = _inputs(2)
    inputs[0][0].view(-1)[3] = float("nan")
    config = dataclasses.replace(
        CONFIG, codec=CodecPolicy(codec="int8", block_size=64, min_compressed_numel=1)
    )
    with pytest.raises(ValueError, match="NaN or infinite"):
        _start_alone(inputs[0], config=config)
    _start_alone(inputs[1], config=config)  # (finite: starts, and ends alone at its deadline)
    _start_alone([torch.full((1000,), 3e38)], config=config)  # finite values whose sum is inf
    # Finite in float64, inf in the float32 it is sent in: its block came out as zeros.
    beyond = torch.zeros(1000, dtype=torch.float64)
    beyond[5] = 1e39
    with pytest.raises(ValueError, match="NaN or infinite"):
        _start_alone([beyond], config=config)


def test_an_8_bit_average_of_an_overflowing_sum_goes_to_every_member_finite() -> None:
    # Finite values whose float32 sum overflows in one element: the owner's average is inf
    # there, sent at the largest scale. (Weights 1e12 and values +-1e30 made it NaN, its
    # block's scale NaN: every receiver refused it and the owner declared them all failed.
    # Weights no longer scale values up, see PartReducer; values near float32's largest still
    # overflow.)
    inputs = [[torch.ones(shape) for shape in SHAPES] for _ in range(3)]
    inputs[0][0].view(-1)[5] = 3e38
    inputs[1][0].view(-1)[5] = 3e38
    config = dataclasses.replace(
        CONFIG, codec=CodecPolicy(codec="int8", block_size=64, min_compressed_numel=1)
    )
    results, _ = _run(inputs, config=config)
    for result in results.values():
        assert result.report.failed == {}
        assert all(p.outcome is PartOutcome.AVERAGED for p in result.report.parts)
        assert torch.equal(result.tensors[0], results[0].tensors[0])  # (every member alike)


@pytest.mark.parametrize("weights", [(1e12, 1e12, 1e12), (1e12, 1.0, 1e12), (1e-12, 1e-12, 1.0)])
def test_a_finite_average_of_large_weights_times_large_values_stays_finite(
    weights: tuple[float, float, float],
) -> None:
    # The owners summed values times weights in float32: 1e30 with weight 1e12 everywhere (each
    # within its range) summed to inf, and every member's average was inf. Summed times each
    # weight over the owner's own, they stay within float32 wherever the weights are alike.
    inputs = [[torch.full(shape, 1e30) for shape in SHAPES] for _ in range(3)]
    if weights[1] == 1.0:  # (the weights differ: the values too, the average still finite)
        for tensor in inputs[1]:
            tensor.fill_(-5.0)
    results, _ = _run(inputs, weights=list(weights))
    total = sum(weights)
    want = [
        sum(w * inputs[m][t].double() for m, w in enumerate(weights)) / total
        for t in range(len(SHAPES))
    ]
    for result in results.values():
        assert result.report.failed == {}
        for got, expected in zip(result.tensors, want, strict=True):
            torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    _assert_agree(results)


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_a_weight_0_member_s_nan_values_spoil_no_average(codec: str) -> None:
    # The way to withhold values the error message names (weight 0): the owner summed 0 x NaN
    # into every member's average (codec none), and the 8-bit check refused the call.
    inputs = _inputs(3)
    inputs[2][0].view(-1)[5] = float("nan")
    inputs[2][2].view(-1)[7] = float("inf")
    config = dataclasses.replace(
        CONFIG, codec=CodecPolicy(codec=codec, block_size=64, min_compressed_numel=1)
    )
    results, _ = _run(inputs, config=config, weights=[1.0, 1.0, 0.0])
    want = _mean(inputs, [0, 1])
    for result in results.values():
        assert result.report.failed == {}
        _assert_close(result.tensors, want, atol=0.05 if codec == "int8" else 1e-6)
        # (and it is named in no part's average)
        assert all("peer-2" not in p.contributors for p in result.report.parts)


@pytest.mark.parametrize("bad", ["nan", "inf", "one chunk"])
def test_a_member_sending_non_finite_values_is_dropped_and_the_others_average(bad: str) -> None:
    # A peer that skips the sender's own check (another build, a hostile peer) sent NaN with
    # weight 1: every member's average was NaN, in every round. Its owners drop it as failed.
    inputs = _inputs(4)
    if bad == "one chunk":
        inputs[2][0].view(-1)[5] = float("nan")
    else:
        for tensor in inputs[2]:
            tensor.fill_(float(bad))
    results, clock = _run(inputs)
    honest = {i: r for i, r in results.items() if i != 2}
    want = _mean(inputs, [0, 1, 3])
    # (the members it sent them to say why; the rest, who reported it)
    assert any("NaN or infinite" in r.report.failed["peer-2"] for r in honest.values())
    for result in honest.values():
        assert "peer-2" in result.report.failed
        assert all(bool(torch.isfinite(t).all()) for t in result.tensors)
        assert result.report.parts[2].outcome is PartOutcome.REASSIGNED
        if bad != "one chunk":  # (else the chunks it sent finite count, as for a failed member)
            _assert_close(result.tensors, want, atol=1e-6)
            assert all("peer-2" not in p.contributors for p in result.report.parts)
    _assert_agree(honest)
    assert clock.monotonic() <= TIMEOUT_S


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_a_member_s_non_finite_values_of_its_own_part_reach_nobody(bad: str) -> None:
    # A received chunk is checked before it is summed; the owner's own values of its part
    # were not: one NaN there made that element NaN on every member. Left out like a received
    # one (weight 0), the others' average stands there, and the owner names itself.
    config = _scheduled(CONFIG)
    inputs = [[torch.randn(3000, generator=torch.Generator().manual_seed(i))] for i in range(3)]
    layout = FlatLayout(inputs[0], config.codec)
    members = [f"peer-{i}" for i in range(3)]
    start, end = allreduce_module._part_plan(members, layout, config, None).part_range(2)
    inputs[2][0][start + 3] = float(bad)
    results, _ = _run(inputs, config=config)
    values = torch.stack([inputs[i][0].double() for i in range(3)])
    want = values.mean(0)
    chunk = slice(start, min(end, start + config.chunk_elements))  # (the NaN's chunk alone)
    want[chunk] = values[:2, chunk].mean(0)
    for i, result in results.items():
        _assert_close(result.tensors, [want], atol=1e-6)
        assert result.report.failed == {}  # (nobody was dropped: callers count failures)
        if i == 2:
            assert result.report.own_non_finite is not None
            assert "NaN or infinite" in result.report.own_non_finite
        else:
            assert result.report.own_non_finite is None
        assert result.report.parts[2].partial_contributors == ["peer-2"]
        assert result.report.parts[2].outcome is PartOutcome.AVERAGED
    _assert_agree(results)


@pytest.mark.parametrize("codec", ["fp16", "bf16"])
def test_an_infinity_sent_in_half_precision_drops_its_sender_as_in_fp32(codec: str) -> None:
    # The half-precision codecs clipped an inf to their largest finite value: the owner took
    # it for a value and every member averaged 65504 (or 3.4e38) in. Sent as inf, the owner
    # drops its sender as for NaN or inf in fp32, and the others average without it.
    config = dataclasses.replace(
        CONFIG, codec=CodecPolicy(codec=codec, block_size=64, min_compressed_numel=1)
    )
    inputs = _inputs(3)
    inputs[2][0].view(-1)[5] = float("inf")  # (part 0's, owned by peer-0)
    results, _ = _run(inputs, config=config)
    honest = {i: r for i, r in results.items() if i != 2}
    for result in honest.values():
        assert "peer-2" in result.report.failed
        assert all(bool(torch.isfinite(t).all()) for t in result.tensors)
        assert abs(result.tensors[0].view(-1)[5].item()) < 100.0
    assert "NaN or infinite" in honest[0].report.failed["peer-2"]
    _assert_agree(honest)


def test_an_8_bit_piece_holding_minus_128_is_refused() -> None:
    # No encoder makes it; at the largest scale it decodes to -inf, which made an owner's
    # sum NaN (see above).
    codec = codec_by_name("int8")
    good = codec.encode(np.linspace(-1, 1, 100, dtype=np.float32), 64)
    codec.check_payload(memoryview(good), 100, 64)
    bad = bytearray(good)
    bad[8 + 50] = 0x80  # (after the two blocks' scales)
    with pytest.raises(ProtocolError, match="-128"):
        codec.check_payload(memoryview(bytes(bad)), 100, 64)


def test_a_round_its_member_leaves_before_opening_it_ends_for_the_others_at_once() -> None:
    # A member whose call raised (an 8-bit NaN, a wrong ``out``) or was cancelled before it
    # opened the round told nobody: the others waited for it to their send timeouts (30 s).
    inputs = _inputs(3)
    inputs[2][0].view(-1)[3] = float("nan")
    config = _scheduled(
        dataclasses.replace(
            CONFIG,
            send_timeout_s=TIMEOUT_S,
            codec=CodecPolicy(codec="int8", block_size=64, min_compressed_numel=1),
        )
    )
    clock = IdleJumpClock()
    members = [f"peer-{i}" for i in range(3)]

    async def main() -> list[AllReduceResult | BaseException]:
        network = FakeNetwork(clock)
        mailboxes = [CommMailbox(network.transport(m), clock) for m in members]
        return await asyncio.gather(
            *(
                all_reduce(
                    inputs[i],
                    mailbox=mailboxes[i],
                    members=members,
                    round_key="run/7",
                    config=config,
                    clock=clock,
                    offload=inline_offload,
                )
                for i in range(3)
            ),
            return_exceptions=True,
        )

    started = clock.monotonic()
    outcomes = asyncio.run(clock.run(main()))
    assert isinstance(outcomes[2], ValueError)
    assert clock.monotonic() - started < 1.0
    for result in outcomes[:2]:
        assert isinstance(result, AllReduceResult)
        assert list(result.report.failed) == ["peer-2"]
        _assert_close(result.tensors, _mean(inputs, [0, 1]), atol=0.05)


def test_members_whose_weights_are_all_0_keep_their_own_values() -> None:
    inputs = _inputs(3)
    results, _ = _run(inputs, weights=[0.0, 0.0, 0.0])
    for i, result in results.items():
        _assert_close(result.tensors, [t.double() for t in inputs[i]], atol=0.0)
        assert all(p.outcome is PartOutcome.KEPT_LOCAL for p in result.report.parts)


def test_a_member_with_bandwidth_weight_0_owns_nothing_even_last() -> None:
    # The values left over the blocks went to the last member whatever its weight: a
    # weight-0 last member reduced them, and all of a tensor under one block.
    assert PartPlan.create(
        ["a", "b", "c"], 10_000, bandwidth_weights=[1, 1, 0], align=4096
    ).bounds == (
        0,
        4096,
        10_000,
        10_000,
    )
    assert PartPlan.create(["a", "b"], 100, bandwidth_weights=[1, 0], align=4096).bounds == (
        0,
        100,
        100,
    )
    plan = PartPlan.create(["a", "b", "c"], 100, bandwidth_weights=[0, 1, 0], align=64)
    assert plan.bounds == (0, 0, 100, 100)


def test_every_byte_one_member_sends_another_counts_as_received() -> None:
    # The bytes received counted the header-only words (steps' asks, ring notices), the bytes
    # sent did not.
    for absent in ((), (2,)):  # (a member gone: the others tell each other, in notices)
        results, _ = _run(_inputs(4), absent=absent)
        sent = sum(r.report.bytes_sent for r in results.values())
        assert sent > 0
        assert sum(r.report.bytes_received for r in results.values()) == sent, absent


def test_parts_follow_bandwidth() -> None:
    inputs = _inputs(3)
    results, _ = _run(inputs, bandwidths=[1.0, 4.0, 5.0])
    sizes = [p.num_elements for p in results[0].report.parts]
    total = sum(sizes)
    assert sizes[0] < sizes[1] < sizes[2]
    assert abs(sizes[2] / total - 0.5) < 0.05
    _assert_close(results[0].tensors, _mean(inputs, range(3)), atol=1e-6)


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8"])
def test_codecs_keep_members_identical_and_close(codec: str) -> None:
    config = AllReduceConfig(
        timeout_s=TIMEOUT_S,
        chunk_elements=700,
        codec=CodecPolicy(codec=codec, block_size=64, min_compressed_numel=100),
    )
    inputs = _inputs(4, seed=3)
    results, _ = _run(inputs, config=config)
    _assert_agree(results)
    atol = {"fp16": 5e-3, "bf16": 5e-2, "int8": 8e-2}[codec]
    _assert_close(results[0].tensors, _mean(inputs, range(4)), atol=atol)
    # the one-element and seven-element tensors travel uncompressed: exact
    _assert_close(results[0].tensors[1:2], _mean(inputs, range(4))[1:2], atol=1e-6)
    assert results[0].report.compression_ratio > (1.5 if codec != "int8" else 2.5)


def test_absent_member_is_dropped_and_its_part_reassigned() -> None:
    inputs = _inputs(4)
    results, clock = _run(inputs, absent=[2])
    want = _mean(inputs, [0, 1, 3])
    for result in results.values():
        _assert_close(result.tensors, want, atol=1e-6)
        report = result.report
        assert "peer-2" in report.failed
        part = report.parts[2]
        assert part.outcome is PartOutcome.REASSIGNED
        assert part.reducer == "peer-3"
        assert part.contributors == ["peer-0", "peer-1", "peer-3"]
    _assert_agree(results)
    assert clock.monotonic() <= TIMEOUT_S


@pytest.mark.parametrize("crash_after", [1, 3, 6, 9])
def test_member_crashing_mid_round(crash_after: int) -> None:
    inputs = _inputs(4, seed=crash_after)
    results, clock = _run(inputs, scripts={1: FaultScript(crash_after_sends=crash_after)})
    survivors = {i: r for i, r in results.items() if i != 1}
    _assert_agree(survivors)
    everyone, without = _mean(inputs, range(4)), _mean(inputs, [0, 2, 3])
    flat_got = torch.cat([t.double().reshape(-1) for t in survivors[0].tensors])
    flat_all = torch.cat([t.reshape(-1) for t in everyone])
    flat_without = torch.cat([t.reshape(-1) for t in without])
    # every element is the mean over everyone or over the survivors, never anything else
    ok = ((flat_got - flat_all).abs() < 1e-6) | ((flat_got - flat_without).abs() < 1e-6)
    assert bool(ok.all())
    for result in survivors.values():
        assert "peer-1" in result.report.failed
        assert result.report.parts[1].outcome is PartOutcome.REASSIGNED
    assert clock.monotonic() <= TIMEOUT_S


def test_member_failing_while_reducing_has_its_part_reassigned() -> None:
    inputs = _inputs(4)
    results, clock = _run(inputs, scripts={0: FaultScript(fail_receiving_after=2)})
    survivors = {i: r for i, r in results.items() if i != 0}
    _assert_agree(survivors)
    for result in survivors.values():
        assert result.report.parts[0].outcome is PartOutcome.REASSIGNED
        assert result.report.parts[0].reducer == "peer-1"
    assert clock.monotonic() <= TIMEOUT_S


def test_slow_owner_is_dropped_and_its_part_averaged_by_a_backup() -> None:
    inputs = _inputs(3)
    slow = FaultScript(send_delay_s=TIMEOUT_S * 10)
    results, clock = _run(inputs, scripts={2: slow})
    # Peer 2 is alive but none of its sends arrive in time: the others average parts 0 and 1
    # without it at the reduce deadline; at the result deadline (24 s; round the ring halfway
    # from there to the round's deadline, 27 s) it has sent no average of its part, so peer 0
    # declares it failed and, as the backup, averages part 2 again from what the two resend.
    # The round completes before its deadline.
    assert clock.monotonic() < TIMEOUT_S
    want = torch.cat([t.reshape(-1) for t in _mean(inputs, [0, 1])])
    for i in (0, 1):
        report = results[i].report
        assert not report.deadline_hit
        assert "peer-2" in report.failed
        assert [p.contributors for p in report.parts] == [["peer-0", "peer-1"]] * 3
        assert report.parts[2].outcome is PartOutcome.REASSIGNED
        got = torch.cat([t.double().reshape(-1) for t in results[i].tensors])
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    _assert_agree({i: results[i] for i in (0, 1)})
    # Peer 2 is told, ends too, and keeps its own values for the part it did not get to own.
    dropped = results[2].report
    assert dropped.excluded == "declared failed by peer-0"
    assert dropped.parts[2].outcome is PartOutcome.KEPT_LOCAL


def test_a_member_on_a_slow_downlink_does_not_declare_the_owners_failed() -> None:
    # Every message to peer 0 takes 20 s (under the send timeout, so nobody drops it for
    # that): at its result deadline (24 s) it has no average from any owner. That is its own
    # link, not theirs, so it declares nobody failed; the others get everyone's mean (their
    # sends to peer 0 still run to the deadline).
    inputs = _inputs(4)
    config = dataclasses.replace(CONFIG, send_timeout_s=25.0)
    results, clock = _run(inputs, scripts={0: FaultScript(receive_delay_s=20.0)}, config=config)
    assert clock.monotonic() <= TIMEOUT_S
    for i, result in results.items():
        assert result.report.failed == {}, (i, result.report.failed)
        assert result.report.excluded is None
    for i in (1, 2, 3):
        assert all(p.outcome is PartOutcome.AVERAGED for p in results[i].report.parts)
        _assert_close(results[i].tensors, _mean(inputs, [0, 1, 2, 3]), atol=1e-6)
    assert results[0].report.deadline_hit


class _PassesOn(FakeTransport):
    """A member that, round the ring, passes averages on ``delay_s`` late (its uplink crawls
    for them; its own messages go at once), or dies as it starts to pass the first one on."""

    def __init__(self, network: FakeNetwork, peer_id: str, *, delay_s: float = 0.0) -> None:
        super().__init__(network, peer_id)
        self.delay_s = delay_s
        self.dead = False

    def is_down(self) -> bool:
        return self.dead

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        frame, _ = unpack_frame(memoryview(message_bytes(message)))
        me = int(self.peer_id.removeprefix("peer-"))
        if frame.kind is FrameKind.RESULT and frame.flags & FLAG_RING and frame.part != me:
            if not self.delay_s:
                self.dead = True
            await self.network.clock.sleep_async(self.delay_s)
        await super().send(peer_id, message, timeout_s=timeout_s)


only_round_the_ring = pytest.mark.parametrize("schedule", ["ring"], indirect=True)
"""Run a test in the ``ring`` schedule only (the others pass no averages on)."""


@only_round_the_ring
@pytest.mark.parametrize(("stall_s", "ends_at_s"), [(1.0, 1.0), (100.0, 24.0)])
def test_a_member_slow_to_pass_averages_on_holds_the_others_up_for_the_stall_allowance(
    stall_s: float, ends_at_s: float
) -> None:
    # Round the ring peer 1 passes the averages of parts 2 and 3 on to peer 0, and its uplink
    # takes longer than the round for them. Their owners hear of no new holder for the stall
    # allowance (ring_stall_s: the reduce-scatter took no time on the fake), send them
    # directly and tell everyone so (RING_OFF), and peer 1 drops the passes it has not made;
    # with an allowance longer than the result deadline (24 s) that happens there. Everyone
    # ends then, with everyone's mean and nobody declared failed.
    inputs = _inputs(4)
    config = dataclasses.replace(CONFIG, send_timeout_s=60.0, ring_stall_s=stall_s)
    finished: dict[int, float] = {}
    results, _ = _run(
        inputs,
        config=config,
        made={1: lambda network, peer: _PassesOn(network, peer, delay_s=100.0)},
        finished_at=finished,
    )
    _assert_everyones_mean(results, inputs)
    assert all(abs(at - ends_at_s) < 0.5 for at in finished.values()), finished
    assert not any(result.report.deadline_hit for result in results.values())
    # the owners of parts 2 and 3 (peer 1 passes those on) left the ring; 0 and 1 did not
    why = "stalled" if stall_s < 24.0 else "result deadline"
    left = {i: result.report.ring_left for i, result in results.items()}
    assert left == {0: None, 1: None, 2: why, 3: why}, left


class _ReceivesSlowly(FakeTransport):
    """A member whose downlink crawls once the all-gather goes round the ring: every average
    passed on to it, or sent to it round the ring, takes ``delay_s`` to arrive."""

    def __init__(self, network: FakeNetwork, peer_id: str, *, delay_s: float) -> None:
        super().__init__(network, peer_id)
        self.delay_s = delay_s

    async def accept(self, sender: str, message: Message) -> None:
        frame, _ = unpack_frame(memoryview(message_bytes(message)))
        if frame.kind is FrameKind.RESULT and frame.flags & FLAG_RING:
            await self.network.clock.sleep_async(self.delay_s)
        await super().accept(sender, message)


@only_round_the_ring
def test_a_member_slow_to_receive_holds_the_members_behind_it_up_for_the_stall_allowance() -> None:
    # Averages round the ring take 20 s to reach peer 2, and every member behind it waits for
    # peer 2 to pass them on. The owners hear of no new holder for the stall allowance (1 s),
    # send what is not known held directly (to peer 2 too: 20 s more) and tell everyone so,
    # and peer 3 drops the passes to peer 2 it has not made: everyone ends by 21 s. Without
    # the allowance the owners would wait for the result deadline (24 s) and everyone would
    # run to the round's deadline (30 s); without the word peer 3 would, its passes queued
    # behind one another on peer 2's downlink.
    inputs = _inputs(4)
    config = dataclasses.replace(CONFIG, send_timeout_s=25.0)
    finished: dict[int, float] = {}
    results, _ = _run(
        inputs,
        config=config,
        made={2: lambda network, peer: _ReceivesSlowly(network, peer, delay_s=20.0)},
        finished_at=finished,
    )
    _assert_everyones_mean(results, inputs)
    _assert_agree(results)
    assert not any(result.report.deadline_hit for result in results.values())
    assert max(finished.values()) <= 21.5, finished


@only_round_the_ring
@pytest.mark.parametrize("slower", [1.0, 4.0])
def test_a_ring_on_rate_limited_uplinks_keeps_a_slow_members_own_averages_on_it(
    slower: float,
) -> None:
    # Every uplink moves 10 KB/s (peer 0's ``slower`` times less). On equal links no average
    # leaves the ring. With peer 0 four times slower its own averages wait for its own
    # reduce-scatter to be sent: that is no stall of the ring's, and they go round it; the
    # owners whose averages peer 0 passes on may leave it.
    inputs = _inputs(4)

    def uplink(rate: float) -> Callable[[FakeNetwork, str], FakeTransport]:
        return lambda network, peer: RateLimitedTransport(network, peer, rate)

    made = {i: uplink(10_000.0 / (slower if i == 0 else 1.0)) for i in range(4)}
    results, _ = _run(inputs, made=made)
    _assert_everyones_mean(results, inputs)
    left = {i: result.report.ring_left for i, result in results.items()}
    assert left[0] is None, left
    if slower == 1.0:
        assert set(left.values()) == {None}, left


class _ThinUplink(FakeTransport):
    """A fake peer whose uplink moves ``bytes_per_s``, shared by its sends to every member one
    message at a time; a send's deadline covers its wait for the wire too, as a real
    connection's deadline covers the bytes queued ahead of its own."""

    def __init__(self, network: FakeNetwork, peer_id: str, bytes_per_s: float) -> None:
        super().__init__(network, peer_id)
        self.bytes_per_s = bytes_per_s
        self._wire = asyncio.Lock()

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        clock = self.network.clock
        deadline_s = clock.monotonic() + timeout_s

        async def over_the_wire() -> None:
            async with self._wire:
                await clock.sleep_async(message_nbytes(message) / self.bytes_per_s)

        carried = asyncio.ensure_future(over_the_wire())
        expired = asyncio.ensure_future(clock.sleep_async(timeout_s))
        try:
            await asyncio.wait({carried, expired}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (carried, expired):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        if not carried.done() or carried.cancelled():
            raise DeadlineExceededError(f"peer {peer_id} did not take the message in {timeout_s} s")
        await super().send(peer_id, message, timeout_s=max(0.001, deadline_s - clock.monotonic()))


def test_a_link_too_thin_for_the_send_timeout_but_fast_enough_for_the_round_fails_nobody() -> None:
    # Every uplink moves 600 B/s: two 2 KB messages under way to one member take 7 s, past
    # the send timeout (5 s), yet a member's whole round (about 17 KB) takes some 29 s of the
    # round's 60 s. With a fixed send timeout the members failed one another and kept their own
    # values; a message is now given the share of the round that its bytes, and those under
    # way before it, are.
    inputs = _inputs(4)
    config = dataclasses.replace(CONFIG, timeout_s=60.0)
    made = {
        i: (lambda network, peer: _ThinUplink(network, peer, 600.0)) for i in range(len(inputs))
    }
    results, clock = _run(inputs, config=config, made=made)
    _assert_everyones_mean(results, inputs)
    _assert_agree(results)
    assert not any(result.report.deadline_hit for result in results.values())
    assert clock.monotonic() > CONFIG.send_timeout_s  # (the links were that slow)


def test_a_member_that_takes_nothing_on_a_thin_link_is_still_failed_before_the_round_ends() -> None:
    # The allowance grows with the bytes under way, not without bound: a member that takes no
    # message is failed while the others still have most of the round to finish theirs.
    inputs = _inputs(4)
    config = dataclasses.replace(CONFIG, timeout_s=60.0)
    made: dict[int, Callable[[FakeNetwork, str], FakeTransport]] = {
        i: (lambda network, peer: _ThinUplink(network, peer, 600.0)) for i in range(3)
    }
    results, _ = _run(inputs, config=config, made=made, scripts={3: FaultScript(hung=True)})
    for i in range(3):
        assert "peer-3" in results[i].report.failed, (i, results[i].report.failed)
        _assert_close(results[i].tensors, _mean(inputs, range(3)), atol=1e-6)


class _SaysRingOff(FakeTransport):
    """A member that, right before its first message of the round, tells ``dest`` that the
    owner of ``part`` sends its averages directly (a RING_OFF frame; ``part`` need not be its
    own), and keeps what came of it."""

    def __init__(self, network: FakeNetwork, peer_id: str, *, part: int, dest: int) -> None:
        super().__init__(network, peer_id)
        self.part = part
        self.dest = f"peer-{dest}"
        self.answer: BaseException | None = None
        self.said = False

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        if not self.said:
            self.said = True
            frame, _ = unpack_frame(memoryview(message_bytes(message)))
            me = int(self.peer_id.removeprefix("peer-"))
            off = Frame(FrameKind.RING_OFF, frame.round_id, self.part, 0, me, 0.0)
            try:
                await super().send(self.dest, pack_frame(off), timeout_s=timeout_s)
            except Exception as exc:  # what the receiver made of it
                self.answer = exc
        await super().send(peer_id, message, timeout_s=timeout_s)


@only_round_the_ring
def test_a_ring_off_for_a_part_not_the_senders_is_refused_and_changes_nothing() -> None:
    inputs = _inputs(4)
    saying: list[_SaysRingOff] = []

    def make(network: FakeNetwork, peer: str) -> FakeTransport:
        saying.append(_SaysRingOff(network, peer, part=0, dest=1))
        return saying[0]

    finished: dict[int, float] = {}
    results, _ = _run(inputs, made={3: make}, finished_at=finished)
    assert isinstance(saying[0].answer, ProtocolError)
    assert "not its own" in str(saying[0].answer)
    _assert_everyones_mean(results, inputs)
    assert max(finished.values()) == 0.0  # the ring ran as ever: no stall, no deadline


@only_round_the_ring
def test_a_member_told_ring_off_passes_none_of_that_owners_averages_on() -> None:
    # Peer 3 tells peer 2, the member just behind it, before anything of the round moved, that
    # it sends its averages directly. Peer 2 then passes none of part 3's on (they would reach
    # peers 1 and 0 at once); peer 3's averages gain no holder past peer 2 for the stall
    # allowance (1 s), and it sends them directly then: peers 0, 1 and 3 end at 1 s, with the
    # mean (peer 2 has everything at once).
    inputs = _inputs(4)
    finished: dict[int, float] = {}
    results, _ = _run(
        inputs,
        made={3: lambda network, peer: _SaysRingOff(network, peer, part=3, dest=2)},
        finished_at=finished,
    )
    _assert_everyones_mean(results, inputs)
    _assert_agree(results)
    assert all(abs(finished[i] - 1.0) < 0.3 for i in (0, 1, 3)), finished


@only_round_the_ring
def test_a_member_that_dies_before_passing_averages_on_is_not_waited_for() -> None:
    # Round the ring peer 1 dies as it starts to pass part 2's averages on to peer 0. Once the
    # others hear it is gone (the failure detector, 0.1 s), every owner sends the averages not
    # yet known held directly, and the survivors end at once: part 1 (its owner dead)
    # averaged again among them, the rest everyone's mean (peer 1 contributed before dying).
    inputs = _inputs(4)
    dying: list[_PassesOn] = []

    def make(network: FakeNetwork, peer: str) -> FakeTransport:
        dying.append(_PassesOn(network, peer))
        return dying[0]

    finished: dict[int, float] = {}
    results, _ = _run(
        inputs,
        made={1: make},
        gone_at={},
        finished_at=finished,
    )
    del results[1]
    assert dying[0].dead
    assert all(finished[i] < 1.0 for i in results), finished
    _assert_agree(results)
    got = torch.cat([t.double().reshape(-1) for t in results[0].tensors])
    everyone = torch.cat([t.reshape(-1) for t in _mean(inputs, [0, 1, 2, 3])])
    survivors = torch.cat([t.reshape(-1) for t in _mean(inputs, [0, 2, 3])])
    parts = results[0].report.parts
    a = parts[0].num_elements
    b = a + parts[1].num_elements
    for result in results.values():
        assert list(result.report.failed) == ["peer-1"]
        assert [p.outcome for p in result.report.parts] == [
            PartOutcome.AVERAGED,
            PartOutcome.REASSIGNED,
            PartOutcome.AVERAGED,
            PartOutcome.AVERAGED,
        ]
    torch.testing.assert_close(got[:a], everyone[:a], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[a:b], survivors[a:b], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[b:], everyone[b:], atol=1e-6, rtol=0)
    # peer 1 was to pass on the averages of parts 2 and 3: their owners sent them directly
    assert results[2].report.ring_left == results[3].report.ring_left == "member failed"


class _FreezesOnceItsAveragesLeft(FakeTransport):
    """An owner that freezes (a stopped process: its connections stay open, nothing is sent or
    answered) once its first average went round the ring."""

    def __init__(self, network: FakeNetwork, peer_id: str) -> None:
        super().__init__(network, peer_id)
        self.frozen = False

    def is_hung(self) -> bool:
        return self.frozen

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        if self.frozen:
            await asyncio.Event().wait()
        frame, _ = unpack_frame(memoryview(message_bytes(message)))
        await super().send(peer_id, message, timeout_s=timeout_s)
        if frame.kind is FrameKind.RESULT and frame.flags & FLAG_RING:
            self.frozen = True


@only_round_the_ring
def test_members_that_told_a_frozen_owner_they_hold_its_average_do_not_wait_for_it() -> None:
    # Round the ring peer 3's first average goes 3 -> 2 -> 1 -> 0, and peers 1 and 0 tell
    # peer 3 they hold it; peer 3 froze meanwhile, so those words hang. Once the failure
    # detector reports it gone (1.5 s) they are cancelled with every other send to it, and the
    # survivors end then (part 3 averaged again by its backup), not when the words time out
    # (the send timeout, 5 s).
    inputs = _inputs(4)
    finished: dict[int, float] = {}
    results, _ = _run(
        inputs,
        made={3: _FreezesOnceItsAveragesLeft},
        gone_at={"peer-3": 1.5},
        finished_at=finished,
    )
    for i in (0, 1, 2):
        assert 1.5 <= finished[i] < 2.0, finished
        assert list(results[i].report.failed) == ["peer-3"]
        assert results[i].report.parts[3].outcome is PartOutcome.REASSIGNED
    _assert_agree({i: results[i] for i in (0, 1, 2)})


@pytest.mark.parametrize(
    "orders",
    [
        # peer 3 in steps with its all-gather direct (another config): it asks ring members
        # for all-gather steps they receive round the ring
        [("steps", True), ("steps", True), ("open", True), ("steps", False)],
        # peer 2 all at once: its part never comes round the ring, and the part after it
        # reaches peer 1 before peer 1's all-gather opened
        [("steps", True), ("steps", True), ("open", True), ("steps", True)],
    ],
)
@only_round_the_ring
def test_members_that_do_not_send_round_the_ring_still_pass_on_what_comes_round_it(
    orders: list[tuple[str, bool]],
) -> None:
    # Each member picks its order from its own measure of its link, so some may send round
    # the ring while others do not (all at once, or in steps with the all-gather direct).
    # Averages that come round the ring are passed on whatever the receiver's own order, as
    # soon as its all-gather opened: the round ends at once for everyone, not at the reduce
    # deadline (21 s) or the result deadline (24 s). Nobody waits for a word either.
    inputs = _inputs(4)
    results, finished = _run_orders(inputs, orders)
    assert all(t < 0.01 for t in finished.values()), finished
    for result in results:
        assert result.report.failed == {}
        _assert_close(result.tensors, _mean(inputs, [0, 1, 2, 3]), atol=1e-6)


class _SlowContributionsTo(FakeTransport):
    """A member whose contributions to ``slow_to`` take ``delay_s`` each (the rest go at once)."""

    def __init__(self, network: FakeNetwork, peer_id: str, slow_to: str, delay_s: float) -> None:
        super().__init__(network, peer_id)
        self.slow_to = slow_to
        self.delay_s = delay_s

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        frame, _ = unpack_frame(memoryview(message_bytes(message)))
        if peer_id == self.slow_to and frame.kind is FrameKind.CONTRIBUTION:
            await self.network.clock.sleep_async(self.delay_s)
        await super().send(peer_id, message, timeout_s=timeout_s)


@only_round_the_ring
def test_an_average_passed_on_before_the_all_gather_opens_goes_once_it_opens() -> None:
    # Peer 2 sends all at once (part 2 never comes round the ring, so peer 1's step that
    # would pass it on never completes) and its contributions to peer 0 crawl, so peer 0 is
    # late to tell peer 1 it may start its last reduce-scatter step. Part 3's averages come
    # round the ring (3 -> 2 -> 1) before that step, and with it the all-gather, opens at
    # peer 1: they go on to peer 0 once it opens (at its patience), not at the reduce
    # deadline (21 s) as when a pass waited for the step before to be all passed on.
    inputs = _inputs(4)
    orders = [("steps", True), ("steps", True), ("open", True), ("steps", True)]

    def slow(network: FakeNetwork, peer: str) -> FakeTransport:
        return _SlowContributionsTo(network, peer, slow_to="peer-0", delay_s=5.0)

    results, finished = _run_orders(inputs, orders, made={2: slow})
    assert all(t < 6.0 for t in finished.values()), finished
    for result in results:
        assert result.report.failed == {}
        _assert_close(result.tensors, _mean(inputs, [0, 1, 2, 3]), atol=1e-6)


def _run_orders(
    inputs: list[list[torch.Tensor]],
    orders: list[tuple[str, bool]],
    made: dict[int, Callable[[FakeNetwork, str], FakeTransport]] | None = None,
) -> tuple[list[AllReduceResult], dict[int, float]]:
    """One round where member i sends in order ``orders[i]`` = (order, round the ring); its
    transport is ``made[i](network, peer_id)`` if given. Returns the results and when each
    member finished."""
    clock = IdleJumpClock()
    members = [f"peer-{i}" for i in range(len(inputs))]
    made = made or {}
    finished: dict[int, float] = {}

    async def main() -> list[AllReduceResult]:
        network = FakeNetwork(clock)
        transports = []
        for i, m in enumerate(members):
            if i in made:
                network.transports[m] = made[i](network, m)
            transports.append(network.transports[m] if i in made else network.transport(m))
        mailboxes = [CommMailbox(t, clock) for t in transports]

        async def one(i: int) -> AllReduceResult:
            order, ring = orders[i]
            result = await all_reduce(
                inputs[i],
                mailbox=mailboxes[i],
                members=members,
                round_key="run/9",
                config=dataclasses.replace(CONFIG, order=order, ring_all_gather=ring),
                clock=clock,
                offload=inline_offload,
            )
            finished[i] = clock.monotonic()
            return result

        return list(await asyncio.gather(*(one(i) for i in range(len(members)))))

    return asyncio.run(clock.run(main())), finished


def test_paused_member_never_holds_the_round_past_its_deadline() -> None:
    inputs = _inputs(4)
    results, clock = _run(inputs, scripts={3: FaultScript(hung=True)})
    assert clock.monotonic() <= TIMEOUT_S
    for i in (0, 1, 2):
        assert "peer-3" in results[i].report.failed
        _assert_close(results[i].tensors, _mean(inputs, [0, 1, 2]), atol=1e-6)


def test_members_that_formed_different_groups_refuse_each_other_at_once() -> None:
    # peer-0 counted peer-1 (then killed) in the group, peer-2 did not: the same round key,
    # two member lists, two round ids. Each refuses the other's messages at once instead of
    # holding them until the round opens (it never does): both finish well before the send
    # timeout, each with its own values, the other reported failed.
    inputs = _inputs(3)
    clock = IdleJumpClock()
    config = _scheduled(CONFIG)
    groups = {0: ["peer-0", "peer-1", "peer-2"], 2: ["peer-0", "peer-2"]}
    finished: dict[int, float] = {}

    async def main() -> dict[int, AllReduceResult]:
        network = FakeNetwork(clock)
        mailboxes = {i: CommMailbox(network.transport(f"peer-{i}"), clock) for i in groups}

        async def one(i: int, delay_s: float) -> AllReduceResult:
            await clock.sleep_async(delay_s)  # the other's messages come before this round opens
            result = await all_reduce(
                inputs[i],
                mailbox=mailboxes[i],
                members=groups[i],
                round_key="run/7",
                config=config,
                clock=clock,
                offload=inline_offload,
            )
            finished[i] = clock.monotonic()
            return result

        async with asyncio.TaskGroup() as group:
            tasks = {i: group.create_task(one(i, 0.5 if i == 2 else 0.0)) for i in groups}
        return {i: t.result() for i, t in tasks.items()}

    results = asyncio.run(clock.run(main()))
    assert max(finished.values()) < CONFIG.send_timeout_s / 2, finished
    assert "peer-2" in results[0].report.failed
    assert "peer-1" in results[0].report.failed
    assert list(results[2].report.failed) == ["peer-0"]
    for i in groups:
        _assert_close(results[i].tensors, _mean(inputs, [i]), atol=0)


class _NeverHasRoom(FakeTransport):
    """A member that answers every message as a waiting room with no space would (hostile, or
    under a flood it cannot shed), and counts the tries."""

    def __init__(self, network: FakeNetwork, peer_id: str) -> None:
        super().__init__(network, peer_id)
        self.tries = 0

    async def accept(self, sender: str, message: Message) -> None:
        self.tries += 1
        raise PeerUnavailableError(f"{NO_ROOM} (test)")


def test_a_member_that_never_has_room_is_dropped_at_the_send_timeout() -> None:
    # Refusals for room were sent again until the round's deadline: such a member was never
    # dropped, its senders uploaded each message dozens of times, and the round ran to 30 s.
    inputs = _inputs(3)
    made: dict[int, _NeverHasRoom] = {}

    def make(network: FakeNetwork, peer: str) -> FakeTransport:
        made[2] = _NeverHasRoom(network, peer)
        return made[2]

    finished: dict[int, float] = {}
    results, _ = _run(inputs, made={2: make}, finished_at=finished)
    for i in (0, 1):
        assert "peer-2" in results[i].report.failed, results[i].report.failed
        assert finished[i] <= CONFIG.send_timeout_s + 3.0, finished
    assert made[2].tries <= 2 * 2 * (CONFIG.send_timeout_s / _ROOM_RETRY_MAX_S + 8), made[2].tries


@pytest.mark.parametrize("flood_of", ["rounds", "bytes"])
def test_an_honest_pair_averages_while_hostile_identities_flood_the_early_room(
    flood_of: str,
) -> None:
    # Eight identities hold an eighth of peer-1's table of unopened rounds each (or four a
    # quarter of its bytes), for made-up rounds, sending again whatever is refused. peer-1
    # opens the round 0.3 s after peer-0: peer-0's early messages found no room, were refused
    # as malformed, and peer-0 dropped its healthy partner (each kept its own values).
    inputs = _inputs(2)
    clock = IdleJumpClock()
    config = _scheduled(CONFIG)
    limits = {"max_waiting_bytes": 64 << 10} if flood_of == "bytes" else {}

    async def main() -> dict[int, AllReduceResult]:
        network = FakeNetwork(clock)
        mailboxes = {
            i: CommMailbox(network.transport(f"peer-{i}"), clock, **limits)  # type: ignore[arg-type]
            for i in (0, 1)
        }
        hostile = [network.transport(f"hostile-{h}") for h in range(8)]

        async def flood(sender: FakeTransport, h: int, n: int) -> None:
            round_id = bytes([0xEE, h, n]) + b"\0" * 13
            frame = Frame(FrameKind.CONTRIBUTION, round_id, 0, 0, 0, 1.0)
            body = b"\0" * ((8 << 10) - 64) if flood_of == "bytes" else b""
            while True:  # it sends again whatever is refused or dropped
                with contextlib.suppress(GossamerError):
                    await sender.send("peer-1", pack_frame(frame) + body, timeout_s=60.0)
                await clock.sleep_async(0.01)

        flooders = (
            [(h, n) for h in range(8) for n in range(8)]
            if flood_of == "rounds"
            else [(h, n) for h in range(4) for n in range(2)]
        )
        floods = [asyncio.ensure_future(flood(hostile[h], h, n)) for h, n in flooders]
        await clock.sleep_async(1.0)
        room = mailboxes[1].early_room
        if flood_of == "rounds":  # (the room is full)
            assert room.num_rounds == 64
        else:
            assert room.nbytes > (64 << 10) - (8 << 10)

        results = await _pair_amid_floods(inputs, mailboxes, config, clock, floods, late_s=0.3)
        assert room.num_rounds <= 64
        assert room.nbytes <= room.max_bytes
        return results

    results = asyncio.run(clock.run(main()))
    _assert_everyones_mean(results, inputs)


async def _pair_amid_floods(
    inputs: list[list[torch.Tensor]],
    mailboxes: dict[int, CommMailbox],
    config: AllReduceConfig,
    clock: IdleJumpClock,
    floods: list[asyncio.Future[None]],
    *,
    late_s: float,
) -> dict[int, AllReduceResult]:
    """peer-0 and peer-1 average round "run/7", peer-1 opening it ``late_s`` after peer-0,
    while ``floods`` run; they are cancelled when the round ends, however it ends."""

    async def one(i: int) -> AllReduceResult:
        await clock.sleep_async(late_s * i)
        return await all_reduce(
            inputs[i],
            mailbox=mailboxes[i],
            members=["peer-0", "peer-1"],
            round_key="run/7",
            config=config,
            clock=clock,
            offload=inline_offload,
        )

    try:
        async with asyncio.TaskGroup() as group:
            tasks = {i: group.create_task(one(i)) for i in (0, 1)}
    finally:
        for task in floods:
            task.cancel()
        await asyncio.gather(*floods, return_exceptions=True)
    return {i: t.result() for i, t in tasks.items()}


class _CountsRoomRefusals(FakeTransport):
    """A member that counts the refusals for lack of room its sends met."""

    def __init__(self, network: FakeNetwork, peer_id: str) -> None:
        super().__init__(network, peer_id)
        self.refused = 0

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        try:
            await super().send(peer_id, message, timeout_s=timeout_s)
        except PeerUnavailableError as exc:
            self.refused += refused_for_room(exc)
            raise


@pytest.mark.parametrize(
    ("flood_hosts", "member_host"),
    [
        ("one IPv4 address", "192.0.2.1"),
        ("eight IPv4 addresses", "192.0.2.1"),
        ("a /64 each of one /56", "2001:db8:bb::/64"),
    ],
)
def test_identities_made_up_on_one_host_cannot_crowd_a_member_out_of_the_early_room(
    flood_hosts: str, member_host: str
) -> None:
    # 64 identities (as many as peer-1's room has rounds) each keep one message for a made-up
    # round waiting in it, from one host (or eight; or a machine with a routed /56 sending from
    # a /64 each), and send again whatever is dropped or refused. peer-1 opens the round 2 s
    # after peer-0. Each of peer-0's early messages, holding one round like each of them, was
    # dropped for the next of them to send again, and sent again by peer-0 (up to 1 s later):
    # uploaded over and over, the round later, and had peer-1 opened near the end of peer-0's
    # send timeout, peer-1 dropped. Ranked by network and host in the full room, their
    # networks hold more than peer-0's and give way to it; the identities take room from each
    # other. (Counted by /64 alone, the /56's identities were 64 hosts: 4 refusals.)
    host_of: dict[str, Callable[[int], str]] = {
        "one IPv4 address": lambda n: "198.51.100.7",
        "eight IPv4 addresses": lambda n: f"198.51.100.{n % 8}",
        "a /64 each of one /56": lambda n: sender_host(f"2001:db8:aa:1{n:02x}::1"),
    }
    refused, late_s = _member_against_early_room_flood(
        64, host_of[flood_hosts], member_host=member_host
    )
    assert refused == 0
    assert late_s < 0.5


def test_identities_behind_the_members_own_address_cost_it_no_more_than_by_identity() -> None:
    # Behind a proxy that rewrites source addresses (a Kubernetes Service, docker-proxy, a TCP
    # load balancer) every sender comes from one address, the member too. Eight made-up
    # identities that each keep a message waiting (a sender's share of rounds apiece) had the
    # member's messages refused 12 times, where hosts were a hard cap of one sender's share:
    # counted by identity, as the senders of one host are among themselves, none.
    refused, late_s = _member_against_early_room_flood(8, lambda n: "10.96.0.1", "10.96.0.1")
    assert refused == 0
    assert late_s < 0.5


def _member_against_early_room_flood(
    num_identities: int, flood_host: Callable[[int], str], member_host: str
) -> tuple[int, float]:
    """peer-0 (at ``member_host``) and peer-1 average while ``num_identities`` made-up
    identities (the n-th at ``flood_host(n)``) each keep a message for a made-up round waiting
    in peer-1's room, sending again whatever is dropped or refused; peer-1 opens the round
    2 s after peer-0. The refusals for room peer-0's messages met, and how long after peer-1
    opened the round it ended (both averaged it right)."""
    inputs = _inputs(2)
    clock = IdleJumpClock()
    config = _scheduled(CONFIG)

    async def main() -> tuple[dict[int, AllReduceResult], int, float]:
        network = FakeNetwork(clock)
        honest = _CountsRoomRefusals(network, "peer-0")
        network.transports["peer-0"] = honest
        network.hosts["peer-0"] = member_host
        mailboxes = {
            0: CommMailbox(honest, clock),
            1: CommMailbox(network.transport("peer-1", host="192.0.2.2"), clock),
        }
        hostile = [
            network.transport(f"hostile-{n}", host=flood_host(n)) for n in range(num_identities)
        ]

        async def flood(sender: FakeTransport, n: int) -> None:
            for again in itertools.count():  # it sends again whatever is refused or dropped
                round_id = bytes([0xEE, n]) + again.to_bytes(4, "little") + b"\0" * 10
                frame = Frame(FrameKind.CONTRIBUTION, round_id, 0, 0, 0, 1.0)
                with contextlib.suppress(GossamerError):
                    await sender.send("peer-1", pack_frame(frame), timeout_s=60.0)
                await clock.sleep_async(0.01)

        floods = [asyncio.ensure_future(flood(sender, n)) for n, sender in enumerate(hostile)]
        await clock.sleep_async(1.0)
        assert mailboxes[1].early_room.num_rounds == num_identities  # (hosts cap nothing)
        opened_at = clock.monotonic() + 2.0
        results = await _pair_amid_floods(inputs, mailboxes, config, clock, floods, late_s=2.0)
        return results, honest.refused, clock.monotonic() - opened_at

    results, refused, late_s = asyncio.run(clock.run(main()))
    _assert_everyones_mean(results, inputs)
    return refused, late_s


def test_a_member_the_failure_detector_reports_gone_is_not_waited_for() -> None:
    # Peer 3 hangs (accepts messages, never answers: a frozen machine keeps its connections).
    # Without a detector the others wait for it until a send misses its deadline (5 s); told
    # it is gone at 1.5 s, they drop it then (whoever polls first tells the others) and finish
    # with the mean of the other three.
    inputs = _inputs(4)
    hung = {3: FaultScript(hung=True)}
    waited: dict[int, float] = {}
    _run(inputs, scripts=hung, finished_at=waited)
    assert min(waited[i] for i in (0, 1, 2)) >= CONFIG.send_timeout_s
    finished: dict[int, float] = {}
    results, _ = _run(inputs, scripts=hung, gone_at={"peer-3": 1.5}, finished_at=finished)
    assert all(1.5 <= finished[i] < 2.0 for i in (0, 1, 2)), finished
    for i in (0, 1, 2):
        assert list(results[i].report.failed) == ["peer-3"]
        _assert_close(results[i].tensors, _mean(inputs, [0, 1, 2]), atol=1e-6)
    _assert_agree({i: results[i] for i in (0, 1, 2)})


def test_a_member_wrongly_declared_failed_is_told_and_keeps_no_disputed_average() -> None:
    # Peer 0 cannot reach peer 2, which is alive: 0 declares it failed, the others follow and
    # take a backup's average of peer 2's part. Peer 2 is told, stops at once (not at its
    # deadline: 0 cannot tell it, the others do) and keeps its own values for what it reduced,
    # so no part holds two averages.
    inputs = _inputs(4)
    script = FaultScript(refuse_sends_to=frozenset({"peer-2"}))
    results, clock = _run(inputs, scripts={0: script})
    assert clock.monotonic() < CONFIG.send_timeout_s
    others = {i: r for i, r in results.items() if i != 2}
    _assert_agree(others)
    for result in others.values():
        assert "peer-2" in result.report.failed
        assert result.report.excluded is None
        assert result.report.parts[2].outcome is PartOutcome.REASSIGNED
        assert "peer-2" not in result.report.parts[2].contributors
    dropped = results[2].report
    assert dropped.excluded in {"declared failed by peer-1", "declared failed by peer-3"}
    assert not dropped.deadline_hit
    assert dropped.parts[2].outcome is PartOutcome.KEPT_LOCAL
    flat = torch.cat([t.reshape(-1) for t in results[2].tensors])
    own = torch.cat([t.reshape(-1) for t in inputs[2]])
    agreed = torch.cat([t.reshape(-1) for t in results[0].tensors])
    start = 0
    for part in dropped.parts:
        end = start + part.num_elements
        if part.outcome is PartOutcome.KEPT_LOCAL:
            assert torch.equal(flat[start:end], own[start:end])
        else:  # an average it received from the others' reducer: the one they hold
            assert part.reducer != "peer-2"
            assert torch.equal(flat[start:end], agreed[start:end])
        start = end
    assert all(not np.isnan(t.numpy()).any() for r in results.values() for t in r.tensors)


def test_cancelling_a_round_leaves_no_task_behind() -> None:
    clock = IdleJumpClock()
    members = ["a", "b"]

    async def main() -> None:
        network = FakeNetwork(clock)
        mailbox = CommMailbox(network.transport("a"), clock)
        network.transport("b", FaultScript(hung=True))
        task = asyncio.ensure_future(
            all_reduce(
                [torch.ones(3000)],
                mailbox=mailbox,
                members=members,
                round_key="k",
                config=CONFIG,
                clock=clock,
                offload=inline_offload,
            )
        )
        for _ in range(50):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not mailbox._rounds
        # What is left is the mailbox's notice to b that a left (b hangs), until it closes.
        await mailbox.aclose()
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(main())


class _CallerCancelsMidway(FakeTransport):
    """An owner whose caller cancels its round once its first average went out."""

    def __init__(self, network: FakeNetwork, peer_id: str) -> None:
        super().__init__(network, peer_id)
        self.leaving = CancelsAfterItsFirstAverage()

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        send = super().send
        await self.leaving.send(message, lambda: send(peer_id, message, timeout_s=timeout_s))


def test_an_owner_whose_caller_cancels_it_midway_is_dropped_and_the_others_agree() -> None:
    # Before, its mailbox dropped the others' later messages of the round without a word and
    # nobody declared it failed (it had sent some averages): each of the others waited to its
    # deadline and kept its own values for the rest of the part, so they ended apart.
    inputs = _inputs(3)
    members = ["peer-0", "peer-1", "peer-2"]
    clock = IdleJumpClock()
    config = _scheduled(CONFIG)

    async def main() -> tuple[list[AllReduceResult], float]:
        network = FakeNetwork(clock)
        leaving = _CallerCancelsMidway(network, members[2])
        network.transports[members[2]] = leaving
        mailboxes = [CommMailbox(network.transport(m), clock) for m in members[:2]]
        mailboxes.append(CommMailbox(leaving, clock))

        def one(i: int) -> asyncio.Task[AllReduceResult]:
            return asyncio.ensure_future(
                all_reduce(
                    inputs[i],
                    mailbox=mailboxes[i],
                    members=members,
                    round_key="leave/1",
                    config=config,
                    clock=clock,
                    offload=inline_offload,
                )
            )

        leaving.leaving.task = task = one(2)
        others = [one(0), one(1)]
        with pytest.raises(asyncio.CancelledError):
            await task
        results = list(await asyncio.gather(*others))
        ended = clock.monotonic()
        await mailboxes[2].aclose()
        return results, ended

    (first, second), ended = asyncio.run(clock.run(main()))
    for result in (first, second):
        assert set(result.report.failed) == {"peer-2"}, result.report.failed
        assert not result.report.deadline_hit
    assert ended < TIMEOUT_S / 10, ended
    for got, other in zip(first.tensors, second.tensors, strict=True):
        assert torch.equal(got, other)
    # Every value is the mean of peer-0's and peer-1's, or of all three where a part's
    # average was made before peer-2 left.
    both = _mean(inputs, [0, 1])
    all_three = _mean(inputs, [0, 1, 2])
    for got, two, three in zip(first.tensors, both, all_three, strict=True):
        got = got.double()
        near = torch.isclose(got, two, atol=1e-6) | torch.isclose(got, three, atol=1e-6)
        assert bool(near.all())


class _HoldsResultsTo(FakeTransport):
    """Holds its averages for ``held`` until ``release`` is set."""

    def __init__(self, network: FakeNetwork, peer_id: str, held: str) -> None:
        super().__init__(network, peer_id)
        self.held = held
        self.release = asyncio.Event()

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        frame, _ = unpack_frame(memoryview(message_bytes(message)))
        if frame.kind is FrameKind.RESULT and peer_id == self.held:
            await self.release.wait()
        await super().send(peer_id, message, timeout_s=timeout_s)


async def _peer_0_holds_its_averages_to_peer_2(
    clock: IdleJumpClock,
    inputs: list[list[torch.Tensor]],
    round_key: str,
    scripts: dict[int, FaultScript],
) -> tuple[_HoldsResultsTo, dict[int, asyncio.Future[AllReduceResult]], RoundState]:
    """A round of peer-0..2 on a fake network in which peer-0 holds its averages for peer-2
    until ``release``; peer ``i`` follows ``scripts[i]`` (one crashed from the start runs no
    round). Returns peer-0's transport, the members' rounds and peer-2's state once open."""
    members = ["peer-0", "peer-1", "peer-2"]
    network = FakeNetwork(clock)
    holding = _HoldsResultsTo(network, members[0], held=members[2])
    network.transports[members[0]] = holding
    others = [network.transport(m, scripts.get(i)) for i, m in enumerate(members) if i]
    transports = [holding, *others]
    mailboxes = [CommMailbox(t, clock) for t in transports]
    running = [i for i in range(3) if i not in scripts]
    tasks = {
        i: asyncio.ensure_future(
            all_reduce(
                inputs[i],
                mailbox=mailboxes[i],
                members=members,
                round_key=round_key,
                config=_scheduled(CONFIG),
                clock=clock,
                offload=inline_offload,
            )
        )
        for i in running
    }
    while not mailboxes[2]._rounds:
        await clock.sleep_async(0.001)
    (state,) = mailboxes[2]._rounds.values()
    assert isinstance(state, RoundState)
    return holding, tasks, state


@pytest.mark.parametrize("schedule", ["open"], indirect=True)
def test_a_member_that_left_after_its_averages_reached_everyone_is_not_averaged_again() -> None:
    # peer-2's averages reached everyone, and it waits for peer-0's (held back); its caller
    # cancels it then, and it says so. peer-1 had finished. Before, peer-0 took peer-2's part
    # over as its backup, found peer-1 (whose contribution it needed) closed, and left the
    # round as dropped; now it keeps peer-2's averages and ends with everyone's mean.
    inputs = _inputs(3)
    clock = IdleJumpClock()

    async def main() -> list[AllReduceResult]:
        holding, tasks, state = await _peer_0_holds_its_averages_to_peer_2(
            clock, inputs, "leave/2", {}
        )
        while not state.leaving()[2] or not tasks[1].done():
            await clock.sleep_async(0.01)
        tasks[2].cancel()
        with pytest.raises(asyncio.CancelledError):
            await tasks[2]
        holding.release.set()
        return list(await asyncio.gather(tasks[0], tasks[1]))

    for result in asyncio.run(clock.run(main())):
        assert result.report.excluded is None
        assert set(result.report.failed) <= {"peer-2"}
        assert not result.report.deadline_hit
        assert all(p.outcome is PartOutcome.AVERAGED for p in result.report.parts)
        _assert_close(result.tensors, _mean(inputs, range(3)), atol=1e-6)


@pytest.mark.parametrize("schedule", ["open"], indirect=True)
def test_a_leaver_that_reduces_a_failed_owners_part_does_not_say_its_averages_are_held() -> None:
    # peer-1 is dead from the start; peer-2 is its part's backup and has sent everything of
    # its own. Said held, the others would keep its own part and average peer-1's again, which
    # a member that had finished could not join (it left the others dropped); not said, both of
    # its parts go to their next backups, as after any backup's failure.
    inputs = _inputs(3)
    clock = IdleJumpClock()

    async def main() -> tuple[bool, bool]:
        holding, tasks, state = await _peer_0_holds_its_averages_to_peer_2(
            clock, inputs, "leave/3", {1: FaultScript(crash_after_sends=0)}
        )
        for _ in range(10_000):
            own_sent = all({0} <= held for held in state._own_held)
            if own_sent and state.reducer_of[1] == 2 and not state.reducers[1].pending_chunks():
                break
            await clock.sleep_async(0.01)
        said_held = state.leaving()[2]
        holding.release.set()
        await asyncio.gather(*tasks.values())
        return own_sent, said_held

    own_sent, said_held = asyncio.run(clock.run(main()))
    assert own_sent
    assert not said_held


@pytest.mark.parametrize("schedule", ["open"], indirect=True)
@pytest.mark.parametrize("slow", ["_land", "fill_missing"])
def test_nothing_writes_into_the_output_after_a_cancelled_round_raised(slow: str) -> None:
    # Landing an average (the round's deadline cuts it short) or filling in the parts that
    # never came (after the deadline) takes 0.8 s in its thread, and the caller cancels the
    # round meanwhile. Before, the cancel came back at once and the thread wrote on into the
    # caller's tensor after it.
    async def slow_work(fn: Callable[[], object]) -> object:
        def run() -> object:
            if slow in getattr(fn, "__qualname__", ""):
                time.sleep(0.8)
            return fn()

        return await asyncio.to_thread(run)

    async def main() -> torch.Tensor:
        clock = SystemClock()
        network = FakeNetwork(clock)
        members = ["peer-0", "peer-1"]
        for peer in members:
            network.transports[peer] = _Posts(network, peer)
        config = dataclasses.replace(CONFIG, timeout_s=0.5, order="open")
        out = torch.full((4000,), float("nan"))
        # peer-1's side of the round, so peer-0 has an average to land (case "_land"); with
        # "fill_missing" peer-1 never comes and peer-0 fills its own values in at the end.
        if slow == "_land":
            peer_1 = asyncio.ensure_future(
                all_reduce(
                    [torch.full((4000,), 1.0)],
                    mailbox=CommMailbox(network.transports[members[1]], clock),
                    members=members,
                    round_key="cancel/1",
                    config=config,
                    clock=clock,
                )
            )
        task = asyncio.ensure_future(
            all_reduce(
                [torch.full((4000,), 7.0)],
                mailbox=CommMailbox(network.transports[members[0]], clock),
                members=members,
                round_key="cancel/1",
                config=config,
                clock=clock,
                offload=slow_work,  # type: ignore[arg-type]
                out=[out],
            )
        )
        await asyncio.sleep(0.6 if slow == "_land" else 0.7)  # the slow work is running
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        returned = out.clone()
        await asyncio.sleep(1.0)  # any write still running would have landed by now
        if slow == "_land":
            await peer_1
        return torch.nan_to_num(out, nan=-1.0) - torch.nan_to_num(returned, nan=-1.0)

    change = asyncio.run(main())
    assert bool((change == 0).all())


def test_real_threads_and_real_clock_without_faults() -> None:
    inputs = _inputs(3, seed=9)
    members = ["x", "y", "z"]

    async def main() -> list[AllReduceResult]:
        from gossamer.core.clock import SystemClock

        clock = SystemClock()
        network = FakeNetwork(clock)
        boxes = [CommMailbox(network.transport(m), clock) for m in members]
        config = AllReduceConfig(timeout_s=60.0, chunk_elements=1000)
        return list(
            await asyncio.gather(
                *(
                    all_reduce(
                        inputs[i], mailbox=boxes[i], members=members, round_key="r", config=config
                    )
                    for i in range(3)
                )
            )
        )

    results = asyncio.run(main())
    for result in results:
        _assert_close(result.tensors, _mean(inputs, range(3)), atol=1e-6)


class _DiesBeforeItsAveragesReach(FakeTransport):
    """An owner whose averages reach every member but ``victims``: the first one for a victim
    waits until ``dies`` is set, then the peer goes dark (killed while sending them)."""

    def __init__(self, network: FakeNetwork, peer_id: str, *victims: str) -> None:
        super().__init__(network, peer_id)
        self.victims = set(victims)
        self.dies = asyncio.Event()
        self.dead = False

    def is_down(self) -> bool:
        return self.dead

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        frame, _ = unpack_frame(memoryview(message_bytes(message)))
        if peer_id in self.victims and frame.kind is FrameKind.RESULT:
            await self.dies.wait()
            self.dead = True
        await super().send(peer_id, message, timeout_s=timeout_s)


def _owner_dies_after_one_finished(
    inputs: list[list[torch.Tensor]],
    *,
    finisher: int,
    victims: Sequence[int],
    watchers: Sequence[int],
    round_key: str,
) -> tuple[dict[int, AllReduceResult], dict[int, float]]:
    """A round where the last member, the dying owner, sends its averages to every member but
    ``victims``, and dies once ``finisher`` ended its round; only ``watchers`` have a failure
    detector. Returns the results and when each member ended."""
    clock = IdleJumpClock()
    config = _scheduled(CONFIG)
    n = len(inputs)
    members = [f"peer-{i}" for i in range(n)]
    finished_at: dict[int, float] = {}

    async def main() -> dict[int, AllReduceResult]:
        network = FakeNetwork(clock)
        dying = _DiesBeforeItsAveragesReach(network, members[-1], *(members[v] for v in victims))
        network.transports[members[-1]] = dying
        transports = [network.transport(m) for m in members[:-1]] + [dying]
        mailboxes = [CommMailbox(t, clock) for t in transports]

        def alive(peer: str) -> bool:
            return not (peer == members[-1] and dying.dead)

        async def one(i: int) -> AllReduceResult:
            result = await all_reduce(
                inputs[i],
                mailbox=mailboxes[i],
                members=members,
                round_key=round_key,
                config=config,
                clock=clock,
                offload=inline_offload,
                alive=alive if i in watchers else None,
            )
            finished_at[i] = clock.monotonic()
            if i == finisher:
                dying.dies.set()
            return result

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(i)) for i in range(n)]
        return {i: t.result() for i, t in enumerate(tasks)}

    return asyncio.run(clock.run(main())), finished_at


@pytest.mark.parametrize("schedule", [s for s in SCHEDULES if s != "ring"], indirect=True)
def test_a_member_that_lost_an_average_others_finished_with_leaves_the_round_at_once() -> None:
    # Peer 2 sends its part's averages to peer 1, then dies before those for peer 0 go out
    # (in pairwise steps the all-gather goes to the member behind first). Peer 1 finishes with
    # everyone's mean. Peer 0 hears that peer 2 is gone and reassigns part 2, but the only
    # member left to average it with, peer 1, has finished and closed the round: it says so,
    # and peer 0 leaves the round as dropped (its caller takes the others' state) instead of
    # waiting to the reduce deadline for a contribution that never comes and ending with a
    # part 2 nobody else holds. (Round the ring peer 2 sends its averages to peer 1 only, and
    # peer 1 finishes only once peer 0 got them from it: this cannot happen.)
    inputs = _inputs(3)
    finisher, victim = 1, 0
    results, finished_at = _owner_dies_after_one_finished(
        inputs, finisher=finisher, victims=[victim], watchers=range(3), round_key="run/8"
    )
    first = results[finisher].report
    assert first.failed == {}
    assert first.excluded is None
    _assert_close(results[finisher].tensors, _mean(inputs, range(3)), atol=1e-6)
    dropped = results[victim].report
    assert dropped.excluded is not None
    assert "had finished the round" in dropped.excluded
    assert finished_at[victim] < 1.0, finished_at  # not the reduce deadline (21 s)
    # It keeps what it got from another reducer (part 1, what peer 1 holds) and its own
    # values elsewhere (a dropped member's own averages may not be what the others hold).
    assert [p.outcome for p in dropped.parts] == [
        PartOutcome.KEPT_LOCAL,
        PartOutcome.AVERAGED,
        PartOutcome.KEPT_LOCAL,
    ]
    kept = torch.cat([t.reshape(-1) for t in results[victim].tensors])
    held = torch.cat([t.reshape(-1) for t in results[finisher].tensors])
    own = torch.cat([t.reshape(-1) for t in inputs[victim]])
    a = dropped.parts[0].num_elements
    b = a + dropped.parts[1].num_elements
    assert torch.equal(kept[a:b], held[a:b])
    assert torch.equal(kept[:a], own[:a])
    assert torch.equal(kept[b:], own[b:])


@pytest.mark.parametrize("schedule", [s for s in SCHEDULES if s != "ring"], indirect=True)
def test_a_backup_that_heard_of_the_owner_second_hand_does_not_average_its_part_again() -> None:
    # Peer 3 sends its part's averages to peer 2, then dies before those for peers 0 and 1 go
    # out. Peer 2 finishes with everyone's mean. Only peer 1 sees peer 3 go (peer 0 has no
    # failure detector here); it reports it to the others, and peer 2 answers that it had
    # finished. Peer 0, part 3's backup, heard of the failure from peer 1 only: before, it
    # averaged part 3 again without peers 2 and 3 (waiting to the reduce deadline, 21 s, for
    # peer 2's contribution) and ended the round, not dropped, with a part 3 peer 2 does not
    # hold. It passes the report on, hears peer 2's answer, and leaves the round at once.
    inputs = _inputs(4)
    finisher = 2
    results, finished_at = _owner_dies_after_one_finished(
        inputs, finisher=finisher, victims=[0, 1], watchers=[1], round_key="run/9"
    )
    held = torch.cat([t.reshape(-1) for t in results[finisher].tensors])
    _assert_close(results[finisher].tensors, _mean(inputs, range(4)), atol=1e-6)
    parts = results[finisher].report.parts
    start = sum(p.num_elements for p in parts[:3])
    for i in (0, 1):
        report = results[i].report
        assert finished_at[i] < 1.0, finished_at  # not the reduce deadline (21 s)
        values = torch.cat([t.reshape(-1) for t in results[i].tensors])
        if report.excluded is None:  # a member that ends in the round holds what peer 2 holds
            assert torch.equal(values[start:], held[start:]), i
        else:
            assert "had finished the round" in report.excluded
            assert report.parts[3].outcome is PartOutcome.KEPT_LOCAL


def test_a_reassigned_contribution_ahead_of_the_failure_reports_is_taken() -> None:
    # Peer 1 is dead; peer 0 cannot reach peer 2, declares it failed too, and sends its values
    # of parts 1 and 2 to their backup, peer 3. Its failure reports reach peer 3 just after
    # the data (separate calls). Before, peer 3, not yet knowing of peer 2, took peer 2 for
    # part 1's backup and dropped peer 0's values: it waited for them to its reduce deadline
    # (21 s) and averaged part 1 as its own values alone.

    class _ReportsLate(FaultyTransport):
        async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
            frame, _ = unpack_frame(memoryview(message_bytes(message)))
            if frame.kind is FrameKind.PEER_FAILED and peer_id == "peer-3":
                await self.network.clock.sleep_async(0.01)
            await super().send(peer_id, message, timeout_s=timeout_s)

    inputs = _inputs(4)
    cut = FaultScript(refuse_sends_to=frozenset({"peer-2"}))
    finished_at: dict[int, float] = {}
    results, _ = _run(
        inputs,
        absent=[1],
        made={0: lambda network, peer: _ReportsLate(network, peer, cut)},
        finished_at=finished_at,
    )
    want = torch.cat([t.reshape(-1) for t in _mean(inputs, [0, 3])])
    for i in (0, 3):
        assert finished_at[i] < 1.0, finished_at
        report = results[i].report
        assert report.excluded is None
        got = torch.cat([t.reshape(-1) for t in results[i].tensors]).double()
        start = report.parts[0].num_elements
        for part in report.parts[1:3]:
            assert part.contributors == ["peer-0", "peer-3"]
            end = start + part.num_elements
            torch.testing.assert_close(got[start:end], want[start:end], atol=1e-6, rtol=0)
            start = end


def test_a_report_naming_a_member_that_finished_is_answered_not_taken() -> None:
    # Between the end of its round and the mailbox's closing it (its tasks winding down), a
    # member that finished with every average got a report naming it failed: it reported the
    # round as excluded, its own part kept local, and answered nothing. Closed a moment later
    # it would have answered that it had finished: it does so now either way.
    layout = FlatLayout([torch.zeros(64)], CodecPolicy())
    plan = PartPlan.create(["peer-0", "peer-1"], layout.total)
    clock = IdleJumpClock()
    answered: list[tuple[str, Frame]] = []
    state = RoundState(
        round_id=bytes(16),
        plan=plan,
        me=0,
        local=np.zeros(64, dtype=np.float32),
        output=np.zeros(64, dtype=np.float32),
        weight=1.0,
        chunk_codec=ChunkCodec(layout, WireLimits()),
        transport=FakeNetwork(clock).transport("peer-0"),
        clock=clock,
        offload=inline_offload,
        feedback=None,
        send_timeout_s=5.0,
        max_in_flight_per_peer=3,
        answer_closed=lambda sender, frame: answered.append((sender, frame)),
    )
    state.done.set()  # every average in hand
    report = Frame(FrameKind.PEER_FAILED, bytes(16), 0, 0, 0, 0.0)
    asyncio.run(state.handle("peer-1", report, memoryview(b"")))
    assert state.excluded is None
    assert state.finished() is not None
    assert answered == [("peer-1", report)]


def test_a_finished_round_answers_only_for_averages_it_took_from_the_owner() -> None:
    # Part 2's averages came from a backup here, parts 0, 1 and 3 from their owners.
    finished = FinishedRound(frozenset({"p0", "p1", "p2", "p3"}), frozenset({0, 1, 3}))
    round_id = bytes(16)

    def frame(kind: FrameKind, *, part: int = 0, index: int = 0, flags: int = 0) -> Frame:
        return Frame(kind, round_id, part, 0, index, 1.0, flags)

    # A report that owner 3 failed: this member holds owner 3's averages, the sender will not.
    assert finished.answers("p1", frame(FrameKind.PEER_FAILED, index=3))
    # Owner 2 failed here too: the backup's averages, which this member holds, reach the sender.
    assert not finished.answers("p1", frame(FrameKind.PEER_FAILED, index=2))
    reassigned = frame(FrameKind.CONTRIBUTION, part=1, flags=FLAG_REASSIGNED)
    assert finished.answers("p3", reassigned)
    assert not finished.answers("p3", frame(FrameKind.CONTRIBUTION, part=1))  # just late
    assert not finished.answers("stranger", reassigned)  # not a member of the round
    assert not finished.answers("p1", frame(FrameKind.RESULT, part=3, flags=FLAG_REASSIGNED))
    # Owner 3 left saying every member holds its averages: nothing of its is reassigned, and
    # an answer would drop the sender from the round for nothing.
    assert not finished.answers("p1", frame(FrameKind.PEER_FAILED, index=3, flags=FLAG_DELIVERED))


def test_message_size_grows_with_the_round_within_bounds() -> None:
    from gossamer.comm.plan import MAX_CHUNK_ELEMENTS, MIN_CHUNK_ELEMENTS, chunk_elements_for

    # Up to 32 MiB of float32: 2 MiB messages, as before; from 64 MiB: 4 MiB, one bulk chunk.
    assert chunk_elements_for(1000, 4096) == MIN_CHUNK_ELEMENTS == 1 << 19
    assert chunk_elements_for(8 << 20, 4096) == MIN_CHUNK_ELEMENTS
    assert chunk_elements_for(25_000_000, 4096) == MAX_CHUNK_ELEMENTS == 1 << 20
    # Between: a sixteenth of the tensor, on a block boundary (a 40 MB round: 2.4 MB messages).
    between = chunk_elements_for(10_000_000, 4096)
    assert between % 4096 == 0
    assert 10_000_000 // 16 - 4096 < between <= 10_000_000 // 16
    assert chunk_elements_for(10_000_000, 1) == 625_000
    # A round of only zero-element tensors: "total and align must be positive" before.
    assert chunk_elements_for(0, 4096) == MIN_CHUNK_ELEMENTS
    with pytest.raises(ValueError, match="total must be >= 0"):
        chunk_elements_for(-1, 4096)
    empty = [[torch.zeros(0, 3), torch.zeros(0)] for _ in range(2)]
    results, _ = _run(empty, config=dataclasses.replace(CONFIG, chunk_elements=None))
    for result in results.values():
        assert [tuple(t.shape) for t in result.tensors] == [(0, 3), (0,)]
    assert AllReduceConfig().chunk_elements is None
    with pytest.raises(ValueError, match="chunk_elements"):
        AllReduceConfig(chunk_elements=0)
    AllReduceConfig(chunk_elements=CHUNK_ELEMENTS_LIMIT)
    with pytest.raises(ValueError, match="chunk_elements is at most"):  # peers refuse them
        AllReduceConfig(chunk_elements=CHUNK_ELEMENTS_LIMIT + 1)


class _Posts(FakeTransport):
    """Hands a message over and returns at once, without waiting for the receiver to handle
    it (so a receiver's slow handler holds no sender's round up)."""

    def __init__(self, network: FakeNetwork, peer_id: str) -> None:
        super().__init__(network, peer_id)
        self.handling: set[asyncio.Task[None]] = set()

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        handled = asyncio.ensure_future(
            self.network.transports[peer_id].accept(self.peer_id, message)
        )
        self.handling.add(handled)
        handled.add_done_callback(self.handling.discard)


@pytest.mark.parametrize("schedule", ["open"], indirect=True)
def test_nothing_writes_into_the_output_after_the_round_returns() -> None:
    # Decoding an average takes 1.5 s in its thread, the round's deadline is 1 s: the round
    # ends while the decodes run. It waits for them before it hands its output over, so the
    # caller's tensor does not change after all_reduce returned.
    async def slow_decodes(fn: Callable[[], object]) -> object:
        def run() -> object:
            if "_land" in getattr(fn, "__qualname__", ""):
                time.sleep(1.5)
            return fn()

        return await asyncio.to_thread(run)

    async def main() -> list[torch.Tensor]:
        clock = SystemClock()
        network = FakeNetwork(clock)
        members = ["peer-0", "peer-1"]
        for peer in members:
            network.transports[peer] = _Posts(network, peer)
        config = dataclasses.replace(CONFIG, timeout_s=1.0, order="open")
        outs = [torch.zeros(4000) for _ in members]

        async def one(i: int) -> torch.Tensor:
            await all_reduce(
                [torch.full((4000,), float(i))],
                mailbox=CommMailbox(network.transports[members[i]], clock),
                members=members,
                round_key="settle/1",
                config=config,
                clock=clock,
                offload=slow_decodes,  # type: ignore[arg-type]
                out=[outs[i]],
            )
            return outs[i].clone()  # what the caller has as the round returns

        returned = await asyncio.gather(one(0), one(1))
        await asyncio.sleep(2.0)  # any decode still running would have written by now
        return [now - then for now, then in zip(outs, returned, strict=True)]

    changes = asyncio.run(main())
    assert all(bool((change == 0).all()) for change in changes)


@pytest.mark.parametrize("schedule", ["open"], indirect=True)
def test_a_backup_average_is_not_overwritten_by_its_failed_owners_landing_late() -> None:
    # peer-1 owns part 1. Its average reaches peer-0 and peer-2, whose decodes of it take
    # 0.5-1 s in their threads; as they start, the failure detector reports peer-1 gone, and
    # peer-2 (part 1's backup) averages it over peer-0 and itself meanwhile. The backup's
    # average must be what both survivors end with: before, peer-2's landing of the dead
    # owner's average (5.0, with peer-1's values) ended over the backup average it had just
    # written and sent to everyone (2.5).
    members = ["peer-0", "peer-1", "peer-2"]
    size = 3 * 64
    gone: set[str] = set()

    def slow_landing(me: str) -> Callable[[Callable[[], object]], object]:
        async def offload(fn: Callable[[], object]) -> object:
            def run() -> object:
                landing = getattr(fn, "__qualname__", "").endswith("_land.<locals>.work")
                if landing and inspect.getclosurevars(fn).nonlocals["a"] == 64:  # part 1
                    gone.add("peer-1")
                    time.sleep(0.5 if me == "peer-2" else 1.0)
                return fn()

            return await asyncio.to_thread(run)

        return offload

    async def main() -> list[AllReduceResult]:
        clock = SystemClock()
        network = FakeNetwork(clock)
        mailboxes = [CommMailbox(network.transport(m), clock) for m in members]
        config = dataclasses.replace(CONFIG, timeout_s=10.0, order="open", liveness_poll_s=0.01)

        async def one(i: int, value: float) -> AllReduceResult:
            return await all_reduce(
                [torch.full((size,), value)],
                mailbox=mailboxes[i],
                members=members,
                round_key="late/1",
                config=config,
                clock=clock,
                offload=slow_landing(members[i]),  # type: ignore[arg-type]
                alive=None if i == 1 else (lambda peer: peer not in gone),
            )

        return list(await asyncio.gather(one(0, 1.0), one(1, 10.0), one(2, 4.0)))

    results = asyncio.run(main())
    for i in (0, 2):
        report = results[i].report
        assert report.parts[1].outcome == PartOutcome.REASSIGNED
        assert report.parts[1].contributors == ["peer-0", "peer-2"]
        assert sorted(set(results[i].tensors[0][64:128].tolist())) == [2.5], members[i]


@pytest.mark.parametrize("schedule", ["open"], indirect=True)
@pytest.mark.parametrize("holder", [0, 2])
def test_the_residual_spent_on_a_contribution_reaches_the_backup_of_its_dead_owner(
    holder: int,
) -> None:
    # The holder carries +0.3 on every value from earlier rounds (its error feedback). peer-1
    # dies as the round starts, so part 1 goes to its backup, peer-2; the holder's contribution
    # to it must carry the residual it spent on the one sent to the dead owner: the backup
    # averages 0.3 and 1 (peer-0 holds it) or 0 and 1.3 (peer-2, the backup itself, holds it),
    # 0.65 either way, not 0 and 1 (the residual lost for good). The backup itself added its
    # raw values before.
    members = ["peer-0", "peer-1", "peer-2"]
    block = 64
    feedback = ErrorFeedback()
    feedback._residual("0", 3 * block)[:] = 0.3  # as earlier rounds would have left it
    config = dataclasses.replace(
        CONFIG,
        order="open",
        codec=CodecPolicy(codec="int8", block_size=block, min_compressed_numel=0),
    )

    clock = IdleJumpClock()

    async def main() -> list[AllReduceResult]:
        network = FakeNetwork(clock)
        scripts = {"peer-1": FaultScript(crash_after_sends=0)}
        mailboxes = [CommMailbox(network.transport(m, scripts.get(m)), clock) for m in members]
        values = [0.0, 5.0, 1.0]

        async def one(i: int) -> AllReduceResult:
            return await all_reduce(
                [torch.full((3 * block,), values[i])],
                mailbox=mailboxes[i],
                members=members,
                round_key="feedback/1",
                config=config,
                clock=clock,
                offload=inline_offload,
                feedback=feedback if i == holder else None,
            )

        return list(await asyncio.gather(one(0), one(1), one(2)))

    results = asyncio.run(clock.run(main()))
    report = results[0].report
    assert report.parts[1].outcome == PartOutcome.REASSIGNED
    part1 = results[0].tensors[0][block : 2 * block]
    torch.testing.assert_close(part1, torch.full((block,), 0.65), atol=0.01, rtol=0)


@pytest.mark.parametrize("absent", [False, True])
@pytest.mark.parametrize("moving", [False, True])
@pytest.mark.parametrize("codec", ["int8", "bf16"])
def test_with_error_feedback_the_averages_do_not_drift_from_the_mean_over_rounds(
    codec: str, moving: bool, absent: bool
) -> None:
    # Members send the same values every round (a steady pseudo-gradient). The owners' averages
    # are rounded again on their way to every member; before they had feedback of their own,
    # that rounding came back the same in every round, and the error of the average summed
    # over the rounds grew with them (0.011 after one int8 round, 0.061 after 10, 0.167
    # after 30). Now it stays within about a round's, also where the parts move from round to
    # round with the members' bandwidth figures (``moving``: an owner keeps the residuals of
    # what it still owns), and where a member is gone every round (``absent``: a backup
    # averages its part, and did so without feedback: 0.22 after 30 int8 rounds).
    n, numel, rounds = 3, 3 * 1024, 12
    gen = torch.Generator().manual_seed(1)
    values = [torch.randn(numel, generator=gen) for _ in range(n)]
    exact = torch.stack([v.double() for v in values]).mean(0)
    feedbacks = [ErrorFeedback() for _ in range(n)]
    members = [f"peer-{i}" for i in range(n + absent)]  # (the last one never comes)
    config = _scheduled(
        dataclasses.replace(
            CONFIG, codec=CodecPolicy(codec=codec, block_size=64, min_compressed_numel=0)
        )
    )
    clock = IdleJumpClock()

    async def one_round(key: str) -> list[AllReduceResult]:
        network = FakeNetwork(clock)
        boxes = [CommMailbox(network.transport(m), clock) for m in members[:n]]
        return list(
            await asyncio.gather(
                *(
                    all_reduce(
                        [values[i].clone()],
                        mailbox=boxes[i],
                        members=members,
                        round_key=key,
                        config=config,
                        clock=clock,
                        offload=inline_offload,
                        feedback=feedbacks[i],
                        bandwidth_weights=[1.0, 1.0 + 0.2 * (len(key) % 2), 1.0, 1.0][
                            : len(members)
                        ]
                        if moving
                        else None,
                    )
                    for i in range(n)
                )
            )
        )

    cumulative = torch.zeros(numel, dtype=torch.float64)
    errors = []
    for k in range(rounds):
        results = asyncio.run(clock.run(one_round("drift/" + "x" * k)))  # (key length: parts)
        _assert_agree(dict(enumerate(results)))
        cumulative += results[0].tensors[0].double() - exact
        errors.append(float(cumulative.abs().max()))
    assert errors[-1] < 2 * errors[0], errors


@pytest.mark.parametrize("schedule", ["open"], indirect=True)
def test_the_error_feedback_does_not_change_after_the_round_returns() -> None:
    # Encoding a contribution with feedback takes 1 s in its thread; the round's deadline is
    # 0.3 s (the other member never comes). The round waits for the encoding before it
    # returns, so the caller's residuals do not change under it afterwards.
    block = 64
    feedback = ErrorFeedback()
    config = dataclasses.replace(
        CONFIG,
        timeout_s=0.3,
        order="open",
        codec=CodecPolicy(codec="int8", block_size=block, min_compressed_numel=0),
    )

    async def slow_encodes(fn: Callable[[], object]) -> object:
        def run() -> object:
            if "encode_message" in fn.__code__.co_names:  # a contribution's encoding
                time.sleep(1.0)
            return fn()

        return await asyncio.to_thread(run)

    async def main() -> float:
        clock = SystemClock()
        network = FakeNetwork(clock)
        mailbox = CommMailbox(network.transport("peer-0"), clock)
        CommMailbox(network.transport("peer-1"), clock)  # never opens the round
        await all_reduce(
            [torch.randn(2 * block)],
            mailbox=mailbox,
            members=["peer-0", "peer-1"],
            round_key="feedback/2",
            config=config,
            clock=clock,
            offload=slow_encodes,  # type: ignore[arg-type]
            feedback=feedback,
        )
        at_return = feedback.residual_norm("0")
        await asyncio.sleep(1.5)  # an encoding still running would have written by now
        return feedback.residual_norm("0") - at_return

    assert asyncio.run(main()) == 0.0


@pytest.mark.parametrize("schedule", ["open"], indirect=True)
def test_a_member_whose_caller_cancels_the_round_leaves_the_others_a_plain_failure() -> None:
    # peer-0's caller cancels its round while peer-0 still adds peer-1's contribution (0.3 s in
    # its thread). What peer-0 handles after that starts nothing; before, it started work in
    # its closing task group, whose RuntimeError went back into peer-1's send and out of
    # peer-1's all_reduce.
    members = ["peer-0", "peer-1"]

    async def slow_adds(fn: Callable[[], object]) -> object:
        def run() -> object:
            if "_on_contribution" in getattr(fn, "__qualname__", ""):
                time.sleep(0.3)
            return fn()

        return await asyncio.to_thread(run)

    async def main() -> AllReduceResult:
        clock = SystemClock()
        network = FakeNetwork(clock)
        mailboxes = [CommMailbox(network.transport(m), clock) for m in members]
        config = dataclasses.replace(CONFIG, timeout_s=1.0, order="open")

        def one(i: int) -> asyncio.Task[AllReduceResult]:
            return asyncio.create_task(
                all_reduce(
                    [torch.ones(128)],
                    mailbox=mailboxes[i],
                    members=members,
                    round_key="cancel/1",
                    config=config,
                    clock=clock,
                    offload=slow_adds,  # type: ignore[arg-type]
                )
            )

        cancelled, other = one(0), one(1)
        await asyncio.sleep(0.1)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        return await other

    result = asyncio.run(main())
    torch.testing.assert_close(result.tensors[0], torch.ones(128))


@pytest.mark.parametrize("schedule", ["open"], indirect=True)
@pytest.mark.parametrize("ends", ["returns", "raises"])
def test_a_cancel_during_the_rounds_last_writes_is_raised_once_they_end(ends: str) -> None:
    # The writes end, or fail, in the loop iteration the caller is cancelled in: the cancel
    # still reaches the caller (it had been swallowed when the work had just ended).
    async def main() -> None:
        work: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        waiting = asyncio.ensure_future(allreduce_module._to_its_end(work))
        await asyncio.sleep(0)
        if ends == "returns":
            work.set_result("done")
        else:
            work.set_exception(RuntimeError("the work failed"))
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(main())


class _ClaimsToBeTheBackup(FakeTransport):
    """Sends its contributions to member 0 again as averages of part 0 reassigned to it, as
    if it were part 0's backup (member 1 is)."""

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        await super().send(peer_id, message, timeout_s=timeout_s)
        data = bytearray(message_bytes(message))
        frame, body = unpack_frame(memoryview(data))
        if peer_id == "peer-0" and frame.kind is FrameKind.CONTRIBUTION and frame.part == 0:
            forged = Frame(
                FrameKind.RESULT, frame.round_id, 0, frame.chunk, frame.peer_index, 0.0,
                FLAG_REASSIGNED,
            )  # fmt: skip
            claim = pack_frame(forged) + pack_contributors([2]) + bytes(body)
            await super().send(peer_id, claim, timeout_s=timeout_s)


def test_a_member_claiming_to_be_the_backup_of_a_live_owner_is_trusted_no_more_than_a_report() -> (
    None
):
    # Member 2 claimed part 0 as its backup: owner 0 took its values for its own part's
    # average, told nobody, and the others held the real one. The claim now says what a
    # failure report says (member 1, before it in part 0's backup order, failed), and the
    # others hear it as one.
    inputs = [[torch.full((3000,), float(i))] for i in range(3)]
    results, _ = _run(inputs, made={2: _ClaimsToBeTheBackup})
    assert "peer-1" in results[0].report.failed
    assert results[1].report.excluded is not None  # (told it was reported failed)
