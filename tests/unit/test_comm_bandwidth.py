"""The bandwidth meter and the part plan it drives: timing sends, averaging, identical plans."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
import torch
from comm_fakes import IdleJumpClock, RateLimitedTransport, inline_offload

from gossamer.comm.allreduce import AllReduceConfig, all_reduce
from gossamer.comm.bandwidth import (
    DEFAULT_BYTES_PER_S,
    MAX_FIGURE_BYTES_PER_S,
    BandwidthMeter,
    BandwidthMeterConfig,
    SendTally,
    plan_weights,
)
from gossamer.comm.codecs import CodecPolicy
from gossamer.comm.fake_transport import FakeNetwork, FaultScript
from gossamer.comm.groups import (
    AgreedGroup,
    GroupConfig,
    InMemoryRendezvousBoard,
    JoinEntry,
    form_group,
)
from gossamer.comm.plan import PartPlan
from gossamer.comm.report import AllReduceResult
from gossamer.comm.transport import CommMailbox, Message, message_nbytes
from gossamer.core.errors import PeerUnavailableError

SMALL = BandwidthMeterConfig(min_bytes_per_peer=1000, min_busy_s=10.0)


class _TimedTransport:
    """Sends that take a scripted time on the fake clock; some destinations refuse."""

    def __init__(self, clock: IdleJumpClock, seconds_per_byte: float) -> None:
        self.clock = clock
        self.seconds_per_byte = seconds_per_byte
        self.refusing: set[str] = set()

    @property
    def peer_id(self) -> str:
        return "me"

    def set_receiver(self, receiver: object) -> None:
        del receiver

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        await self.clock.sleep_async(message_nbytes(message) * self.seconds_per_byte)
        if peer_id in self.refusing:
            raise PeerUnavailableError(f"{peer_id} refused")


def _run_tally(
    sends: list[tuple[float, str, int]], refusing: frozenset[str] = frozenset()
) -> SendTally:
    """Start each (at_s, dest, size) send at its time through one tally; return it."""
    clock = IdleJumpClock()
    inner = _TimedTransport(clock, 1e-6)  # 1 MB/s
    inner.refusing |= refusing
    tally = SendTally(inner, clock)

    async def one(at_s: float, dest: str, size: int) -> None:
        await clock.sleep_async(at_s)
        with contextlib.suppress(PeerUnavailableError):
            await tally.send(dest, bytes(size), timeout_s=10.0)

    async def main() -> None:
        async with asyncio.TaskGroup() as group:
            for at_s, dest, size in sends:
                group.create_task(one(at_s, dest, size))

    asyncio.run(clock.run(main()))
    return tally


def test_a_destination_counts_its_busy_time_once_however_many_messages_overlap() -> None:
    # Two 100 kB messages to "a" in flight together (0..0.1 s), a third after a gap (1.0..1.1 s):
    # 300 kB over 0.2 s of busy time, the gap not counted.
    tally = _run_tally([(0.0, "a", 100_000), (0.0, "a", 100_000), (1.0, "a", 100_000)])
    assert tally.rates(SMALL) == pytest.approx({"a": 1.5e6})


def test_destinations_served_at_once_add_up() -> None:
    tally = _run_tally([(0.0, "a", 100_000), (0.0, "b", 50_000)])
    assert tally.rates(SMALL) == pytest.approx({"a": 1e6, "b": 1e6})
    assert tally.throughput_bytes_per_s(SMALL) == pytest.approx(2e6)


def test_one_destination_at_a_time_counts_the_link_once() -> None:
    # pairwise steps: a, then b, then c, each alone on the 1 MB/s link
    tally = _run_tally([(0.0, "a", 100_000), (0.1, "b", 100_000), (0.2, "c", 100_000)])
    assert tally.rates(SMALL) == pytest.approx({"a": 1e6, "b": 1e6, "c": 1e6})
    assert tally.shared_rates(SMALL) == pytest.approx({"a": 1e6, "b": 1e6, "c": 1e6})
    assert tally.throughput_bytes_per_s(SMALL) == pytest.approx(1e6)  # not the sum, 3e6


def test_failed_and_tiny_destinations_do_not_count() -> None:
    tally = _run_tally(
        [(0.0, "a", 100_000), (0.0, "gone", 100_000), (0.0, "tiny", 10)],
        refusing=frozenset({"gone"}),
    )
    assert set(tally.rates(SMALL)) == {"a"}
    nothing = _run_tally([(0.0, "tiny", 10)])
    assert nothing.throughput_bytes_per_s(SMALL) is None


def test_a_cancelled_send_keeps_its_time_but_adds_no_bytes() -> None:
    clock = IdleJumpClock()
    tally = SendTally(_TimedTransport(clock, 1e-6), clock)
    config = BandwidthMeterConfig(min_bytes_per_peer=1000, min_busy_s=0.5)

    async def main() -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(tally.send("slow", bytes(100_000), timeout_s=10.0))
            cut = group.create_task(tally.send("slow", bytes(10_000_000), timeout_s=10.0))
            await clock.sleep_async(1.0)  # the round's deadline
            cut.cancel()

    asyncio.run(clock.run(main()))
    # 100 kB delivered over the 1 s the link was busy: a low figure, not none.
    assert tally.rates(config) == pytest.approx({"slow": 1e5})


def test_small_rounds_measure_a_floor_of_the_send_rate() -> None:
    # Three 20 kB messages at once (each at 1 MB/s: the fake's links are not shared), then one
    # after a gap: far below what the figure counts (the default config), but the floor sees
    # 80 kB over 0.04 s busy, the gap not counted.
    sends = [(0.0, "a", 20_000), (0.0, "b", 20_000), (0.0, "c", 20_000), (1.0, "a", 20_000)]
    tally = _run_tally(sends)
    assert tally.busy_throughput_bytes_per_s() == pytest.approx(2e6)
    meter = BandwidthMeter(BandwidthMeterConfig(smoothing=0.5))
    assert meter.floor_bytes_per_s == DEFAULT_BYTES_PER_S  # nothing measured yet
    assert meter.update(tally) is None  # the published figure does not move
    assert meter.estimate_bytes_per_s == DEFAULT_BYTES_PER_S
    assert meter.floor_bytes_per_s == pytest.approx(2e6)
    # A round that counts: the figure 1 MB/s, the floor's average 1.5 MB/s; the lower wins.
    assert meter.update(_run_tally([(0.0, "a", 300_000)])) == pytest.approx(1e6)
    assert meter.floor_bytes_per_s == pytest.approx(1e6)
    meter.observe(4e6)  # the figure moves to 2.5 MB/s: the floor's average is lower now
    assert meter.floor_bytes_per_s == pytest.approx(1.5e6)
    assert _run_tally([]).busy_throughput_bytes_per_s() is None


def test_meter_starts_at_the_default_then_follows_a_moving_average() -> None:
    meter = BandwidthMeter(BandwidthMeterConfig(smoothing=0.5))
    assert meter.estimate_bytes_per_s == DEFAULT_BYTES_PER_S
    assert meter.num_measurements == 0
    meter.observe(1e6)  # the first measurement replaces the default
    assert meter.estimate_bytes_per_s == 1e6
    meter.observe(3e6)
    assert meter.estimate_bytes_per_s == pytest.approx(2e6)
    assert meter.last_sample_bytes_per_s == 3e6
    assert meter.num_measurements == 2
    with pytest.raises(ValueError, match="finite"):
        meter.observe(float("nan"))


def test_a_round_that_tells_nothing_leaves_the_estimate() -> None:
    meter = BandwidthMeter(SMALL)
    assert meter.update(_run_tally([(0.0, "tiny", 10)])) is None
    assert meter.num_measurements == 0
    assert meter.update(_run_tally([(0.0, "a", 100_000)])) == pytest.approx(1e6)
    assert meter.estimate_bytes_per_s == pytest.approx(1e6)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("default_bytes_per_s", 0.0),
        ("default_bytes_per_s", float("inf")),
        ("smoothing", 0.0),
        ("smoothing", 1.5),
        ("min_bytes_per_peer", 0),
        ("min_busy_s", 0.0),
    ],
)
def test_meter_config_rejects_bad_values(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        BandwidthMeterConfig(**{field: value})  # type: ignore[arg-type]


def test_plan_weights_bound_untrusted_figures_and_fill_missing_ones() -> None:
    assert plan_weights([1e6, 1e7]) == [1e6, 1e7]
    # 0, negative and non-finite count as the median of the known figures (the lower middle
    # one of an even count)
    assert plan_weights([2e6, 0.0, 4e6, float("nan")]) == [2e6, 2e6, 4e6, 2e6]
    # an infinite one too (it was taken as the cap, 100x the median: the largest share)
    assert plan_weights([2e6, 2e6, float("inf"), -float("inf")]) == [2e6] * 4
    # one peer claiming far more (or less) than the others is held to max_ratio of the median
    assert plan_weights([1e6, 1e6, 1e12, 1.0], max_ratio=10.0) == [1e6, 1e6, 1e7, 1e5]
    assert plan_weights([0.0, 0.0]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="empty"):
        plan_weights([])
    with pytest.raises(ValueError, match="max_ratio"):
        plan_weights([1.0], max_ratio=0.5)


def test_one_of_two_members_cannot_raise_the_median_to_take_every_part() -> None:
    # The mean of two figures was their median: a peer claiming 1e13 B/s beside an honest
    # 12.5e6 held itself to 100x that mean, a 200:1 share, and the honest member's part of a
    # 500,000-value round rounded down to no block at all.
    weights = plan_weights([12.5e6, 1e13])
    assert weights == [12.5e6, 12.5e8]
    plan = PartPlan.create(["honest", "liar"], 500_000, bandwidth_weights=weights)
    honest = plan.bounds[1] - plan.bounds[0]
    assert honest >= 4096


def test_every_member_with_weight_owns_a_block_where_there_are_enough() -> None:
    plan = PartPlan.create(["a", "b", "c", "d"], 3 * 4096 + 5, bandwidth_weights=[1, 100, 0, 100])
    sizes = [b - a for a, b in zip(plan.bounds, plan.bounds[1:], strict=False)]
    assert sizes == [4096, 4096, 0, 4096 + 5]
    few = PartPlan.create(["a", "b", "c"], 2 * 4096, bandwidth_weights=[1, 1, 1])
    assert sum(b - a for a, b in zip(few.bounds, few.bounds[1:], strict=False)) == 2 * 4096
    big = PartPlan.create(["a", "b"], 100 * 4096, bandwidth_weights=[1, 3])
    assert big.bounds == (0, 25 * 4096, 100 * 4096)
    # (a weight that scales to 0 next to a huge one still has a weight: b owned nothing)
    far = PartPlan.create(["a", "b", "c"], 3 * 4096, bandwidth_weights=[1e300, 5e-324, 1.0])
    assert far.bounds == (0, 4096, 8192, 3 * 4096)


def test_parts_do_not_depend_on_how_the_python_version_sums_floats() -> None:
    # The weights sum to 1.2000000000000002 added in turn (Python 3.11's sum) and to 1.2
    # correctly rounded (3.12's sum compensates): 3.11 cut [249, 274] blocks past the floors.
    weights = [0.01, 0.001, 0.001]
    plan = PartPlan.create(["a", "b", "c"], 303 * 4096, bandwidth_weights=weights)
    assert plan.bounds == (0, (250 + 1) * 4096, (275 + 2) * 4096, 303 * 4096)


def test_every_member_builds_the_same_plan_from_the_agreed_figures() -> None:
    # Figures as measured (awkward floats), through the join entries' JSON as members read them.
    figures = [1.2345678901234e6, 1.1e6 / 3, 1.23e7, 9.87654321e6]
    members = [f"peer-{i}" for i in range(4)]
    entries = [JoinEntry(m, 0.0, f) for m, f in zip(members, figures, strict=True)]
    plans = set()
    for _reader in members:
        decoded = [JoinEntry.decode(e.encode(), e.peer_id) for e in entries]
        weights = plan_weights([e.bandwidth_bytes_per_s for e in decoded])
        plans.add(PartPlan.create(members, 1_000_003, bandwidth_weights=weights, align=64))
    assert len(plans) == 1
    (plan,) = plans
    sizes = [b - a for a, b in zip(plan.bounds, plan.bounds[1:], strict=False)]
    assert sum(sizes) == 1_000_003
    for size, figure in zip(sizes, figures, strict=True):
        assert size == pytest.approx(1_000_003 * figure / sum(figures), abs=64)


def test_group_formation_carries_the_meters_figures_to_every_member() -> None:
    clock = IdleJumpClock()
    board = InMemoryRendezvousBoard()
    config = GroupConfig(min_group_size=2, max_group_size=8, join_window_s=2.0)
    meters = [BandwidthMeter() for _ in range(4)]
    for i, meter in enumerate(meters[:3]):
        meter.observe(1e6 * (1 + 9 * (i % 2)))  # the fourth has measured nothing yet
    opens_at = clock.wall()

    async def one(i: int) -> AgreedGroup:
        await clock.sleep_async(0.3 * i)
        me = JoinEntry(f"peer-{i}", 0.0, meters[i].estimate_bytes_per_s)
        return await form_group(board, "run/3", me, opens_at_s=opens_at, config=config, clock=clock)

    async def main() -> list[AgreedGroup]:
        return list(await asyncio.gather(*(one(i) for i in range(4))))

    groups = asyncio.run(clock.run(main()))
    assert len({g.group_hash for g in groups}) == 1
    weights = {tuple(g.part_weights()) for g in groups}
    assert len(weights) == 1
    by_peer = dict(zip(groups[0].members, groups[0].part_weights(), strict=True))
    assert by_peer == {"peer-0": 1e6, "peer-1": 1e7, "peer-2": 1e6, "peer-3": DEFAULT_BYTES_PER_S}


# ---- the meter in all-reduce rounds, over fake links with rates ------------------------------

RATES = [1e6, 1e6, 1e7, 1e7]  # bytes/s of each member's uplink: 1:10, like 8 and 80 Mbit/s
NUM_ELEMENTS = 200_000
ROUND_CONFIG = AllReduceConfig(
    timeout_s=60.0,
    send_timeout_s=30.0,
    chunk_elements=8192,
    max_in_flight_per_peer=2,
    codec=CodecPolicy(codec="none", block_size=64, min_compressed_numel=0),
)


def _rounds(num_rounds: int, *, follow_meters: bool) -> list[tuple[float, list[AllReduceResult]]]:
    """Rounds over fake rate-limited links; (seconds, results) per round."""
    clock = IdleJumpClock()
    members = [f"peer-{i}" for i in range(len(RATES))]
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(NUM_ELEMENTS, generator=gen) for _ in members]
    meters = [BandwidthMeter(BandwidthMeterConfig(min_bytes_per_peer=16_384)) for _ in members]

    async def main() -> list[tuple[float, list[AllReduceResult]]]:
        network = FakeNetwork(clock)
        mailboxes = [
            CommMailbox(RateLimitedTransport.join(network, m, r), clock)
            for m, r in zip(members, RATES, strict=True)
        ]
        done = []
        for number in range(num_rounds):
            # what each member would publish in its join entry, and the group agree on
            figures = [m.estimate_bytes_per_s for m in meters]
            weights = plan_weights(figures) if follow_meters else None
            started = clock.monotonic()
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(
                        all_reduce(
                            [inputs[i]],
                            mailbox=mailboxes[i],
                            members=members,
                            round_key=f"run/{number}",
                            config=ROUND_CONFIG,
                            bandwidth_weights=weights,
                            meter=meters[i],
                            clock=clock,
                            offload=inline_offload,
                        )
                    )
                    for i in range(len(members))
                ]
            done.append((clock.monotonic() - started, [t.result() for t in tasks]))
        return done

    return asyncio.run(clock.run(main()))


def test_parts_follow_the_measured_rates_and_the_round_gets_faster() -> None:
    rounds = _rounds(3, follow_meters=True)
    want = torch.stack(_inputs_for_rounds()).double().mean(0)
    first_s, first = rounds[0]
    # before any measurement everybody announces the default: equal parts
    sizes = [p.num_elements for p in first[0].report.parts]
    assert max(sizes) - min(sizes) <= 64
    # the first round's own traffic measured each uplink (the sum over destinations)
    for result, rate in zip(first, RATES, strict=True):
        assert result.report.send_bytes_per_s == pytest.approx(rate, rel=0.35)
    for seconds, results in rounds[1:]:
        plans = {tuple(p.num_elements for p in r.report.parts) for r in results}
        assert len(plans) == 1  # every member built the same plan
        (sizes_now,) = plans
        slow, fast = min(sizes_now[:2]), min(sizes_now[2:])
        assert fast >= 6 * slow, sizes_now
        for result in results:
            torch.testing.assert_close(result.tensors[0].double(), want, atol=1e-5, rtol=0)
            assert not result.report.failed
        assert seconds < 0.85 * first_s, (seconds, first_s)


def test_equal_parts_stay_equal_without_weights_but_the_meter_still_learns() -> None:
    rounds = _rounds(2, follow_meters=False)
    for _, results in rounds:
        sizes = [p.num_elements for p in results[0].report.parts]
        assert max(sizes) - min(sizes) <= 64
    slow, fast = (rounds[1][1][i].report.send_bytes_per_s for i in (0, 3))
    assert slow is not None
    assert fast is not None
    assert fast > 5 * slow


def _inputs_for_rounds() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(NUM_ELEMENTS, generator=gen) for _ in RATES]


def test_a_failed_peer_does_not_count_against_the_senders_figure() -> None:
    clock = IdleJumpClock()
    members = ["peer-0", "peer-1", "peer-2"]
    meter = BandwidthMeter(BandwidthMeterConfig(min_bytes_per_peer=16_384))

    async def main() -> AllReduceResult:
        network = FakeNetwork(clock)
        mailboxes = [
            CommMailbox(RateLimitedTransport.join(network, "peer-0", 1e6), clock),
            CommMailbox(network.transport("peer-1"), clock),
            CommMailbox(network.transport("peer-2", FaultScript(crash_after_sends=0)), clock),
        ]
        tensors = [torch.ones(100_000) * i for i in range(3)]
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(
                    all_reduce(
                        [tensors[i]],
                        mailbox=mailboxes[i],
                        members=members,
                        round_key="run/1",
                        config=ROUND_CONFIG,
                        meter=meter if i == 0 else None,
                        clock=clock,
                        offload=inline_offload,
                    )
                )
                for i in range(3)
            ]
        return tasks[0].result()

    result = asyncio.run(clock.run(main()))
    assert "peer-2" in result.report.failed
    assert meter.num_measurements == 1
    assert meter.estimate_bytes_per_s == pytest.approx(1e6, rel=0.35)


def test_json_round_trip_keeps_figures_exact() -> None:
    # The plan depends on the figures bit for bit; JSON floats must survive the board unchanged.
    for figure in (1.1e6 / 3, 12_500_000.000000002, 5e-324, 1.7976931348623157e308):
        assert json.loads(json.dumps(figure)) == figure


def test_a_hung_peer_given_up_on_leaves_no_figure_and_the_next_round_runs() -> None:
    """Sends to a member that froze are cancelled when the failure detector reports it gone:
    their time says nothing of this peer's link. Counted, they made a figure of 0 B/s, the
    meter's estimate became 0 and the next round divided by it."""
    clock = IdleJumpClock()
    members = ["peer-0", "peer-1"]
    meter = BandwidthMeter()
    config = AllReduceConfig(timeout_s=30.0, send_timeout_s=10.0)

    def alive(peer_id: str) -> bool:
        return peer_id != "peer-1" or clock.monotonic() < 2.5  # reported gone at 2.5 s

    async def main() -> list[AllReduceResult]:
        network = FakeNetwork(clock)
        mailbox = CommMailbox(network.transport("peer-0"), clock)
        CommMailbox(network.transport("peer-1", FaultScript(hung=True)), clock)
        results = []
        for key in ("run/1", "run/2"):
            results.append(
                await all_reduce(
                    [torch.ones(1 << 20)],
                    mailbox=mailbox,
                    members=members,
                    round_key=key,
                    config=config,
                    clock=clock,
                    offload=inline_offload,
                    meter=meter,
                    alive=alive,
                )
            )
        return results

    first, second = asyncio.run(clock.run(main()))
    assert "peer-1" in first.report.failed
    assert first.report.send_bytes_per_s is None
    assert meter.num_measurements == 0
    assert meter.estimate_bytes_per_s == BandwidthMeterConfig().default_bytes_per_s
    assert "peer-1" in second.report.failed
    torch.testing.assert_close(second.tensors[0], torch.ones(1 << 20))


def test_a_destination_that_got_nothing_tells_no_rate() -> None:
    clock = IdleJumpClock()
    tally = SendTally(_TimedTransport(clock, 1e-6), clock)
    config = BandwidthMeterConfig(min_bytes_per_peer=1000, min_busy_s=0.5)

    async def main() -> None:
        async with asyncio.TaskGroup() as group:
            cut = group.create_task(tally.send("slow", bytes(10_000_000), timeout_s=10.0))
            await clock.sleep_async(1.0)
            cut.cancel()

    asyncio.run(clock.run(main()))
    assert tally.rates(config) == {}
    assert tally.throughput_bytes_per_s(config) is None
    with pytest.raises(ValueError, match="> 0"):
        BandwidthMeter().observe(0.0)


@pytest.mark.parametrize(
    "figures", [[1e7, 1.7e308], [1e308, 1e308, 1e308], [1e7, float(10**300), 5e6]]
)
def test_figures_near_the_float_limit_still_make_a_plan(figures: list[float]) -> None:
    # Finite but huge figures from other peers summed (or averaged) to inf, and every member
    # failed the round in PartPlan.create (OverflowError, or NaN bounds).
    weights = plan_weights(figures)
    assert all(0 < w <= MAX_FIGURE_BYTES_PER_S for w in weights)
    plan = PartPlan.create(
        [f"p{i}" for i in range(len(figures))], 10_000_000, bandwidth_weights=weights
    )
    assert plan.bounds[0] == 0
    assert plan.bounds[-1] == 10_000_000
    assert list(plan.bounds) == sorted(plan.bounds)
