"""A swarm round's all-reduce deadline follows its members' links.

On thin links every round ran to the fixed ``swarm.round_timeout_s`` (60 s) and averaged part
of what it should, unless a user raised it by hand to the ring bound of the model at the
slowest link. Every round entry carries its writer's measured send rate, and every member
reads the same entries: each member computes the same deadline from them, between
``round_timeout_s`` and ``max_round_timeout_s``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
import torch

from gossamer.comm.bandwidth import agreed_send_rates, plan_weights
from gossamer.comm.codecs import CodecPolicy
from gossamer.comm.report import AllReduceReport
from gossamer.core.clock import FakeClock
from gossamer.core.config import RunConfig, SwarmConfig
from gossamer.core.errors import ConfigError
from gossamer.train import swarm_averager as averager_module
from gossamer.train import swarm_round_formation as formation
from gossamer.train.swarm import swarm_averager_config
from gossamer.train.swarm_averager import SwarmAverager
from gossamer.train.swarm_averager_config import SwarmAveragerConfig
from gossamer.train.swarm_round_records import _Formed

T = TypeVar("T")

MBIT_S = 1e6 / 8
"""One Mbit/s in bytes per second."""
MODEL_VALUES = 4_000_000
"""A 16 MB model in fp32 (the README's thin-link example)."""


def _deadline(
    num_members: int,
    nbytes: int,
    lowest: float,
    floor_s: float = 60.0,
    cap_s: float = 900.0,
) -> float:
    deadline_s, _ = formation.round_deadline_s(
        num_members=num_members,
        wire_nbytes=nbytes,
        lowest_bytes_per_s=lowest,
        floor_s=floor_s,
        cap_s=cap_s,
    )
    return deadline_s


@pytest.mark.parametrize(
    ("codec", "nbytes"),
    [
        ("none", 4 * MODEL_VALUES),
        ("fp16", 2 * MODEL_VALUES),
        ("bf16", 2 * MODEL_VALUES),
        # One byte a value and a float32 scale per block of 4096 values (the last one short).
        ("int8", MODEL_VALUES + 4 * math.ceil(MODEL_VALUES / 4096)),
    ],
)
def test_a_buffer_takes_its_codec_s_bytes_on_the_wire(codec: str, nbytes: int) -> None:
    assert formation.buffer_wire_nbytes([MODEL_VALUES], CodecPolicy(codec=codec)) == nbytes
    # Tensors under one block travel in fp32 whatever the codec (biases and norms).
    small = formation.buffer_wire_nbytes([MODEL_VALUES, 100], CodecPolicy(codec=codec))
    assert small == nbytes + 400


def test_the_deadline_is_twice_the_ring_bound_at_the_slowest_link() -> None:
    # The README's example: 16 MB between 2 peers at 1 Mbit/s is a 128 s ring bound.
    assert _deadline(2, 4 * MODEL_VALUES, 1 * MBIT_S) == pytest.approx(2 * 128.0)
    # 2(N-1)/N: four members each send and receive 1.5 buffers.
    assert _deadline(4, 4 * MODEL_VALUES, 2 * MBIT_S) == pytest.approx(2 * 1.5 * 64.0)
    # fp16 halves it.
    assert _deadline(2, 2 * MODEL_VALUES, 1 * MBIT_S) == pytest.approx(128.0)


def test_the_deadline_stays_between_the_floor_and_the_cap() -> None:
    # Fast links (and the first round, at the 100 Mbit/s default figure): the floor.
    assert _deadline(2, 4 * MODEL_VALUES, 100 * MBIT_S) == 60.0
    assert _deadline(16, 4 * MODEL_VALUES, 12.5e6, floor_s=1.0) == pytest.approx(
        2 * 30 / 16 * 16e6 / 12.5e6
    )
    # A link too thin for the model: the cap, and what it would need.
    deadline_s, needed_s = formation.round_deadline_s(
        num_members=2,
        wire_nbytes=4 * MODEL_VALUES,
        lowest_bytes_per_s=0.1 * MBIT_S,
        floor_s=60.0,
        cap_s=900.0,
    )
    assert deadline_s == 900.0
    assert needed_s == pytest.approx(2 * 1280.0)


@pytest.mark.parametrize("lowest", [0.0, -1.0, math.nan, math.inf, -math.inf])
def test_an_unusable_figure_gives_the_cap_never_an_infinite_deadline(lowest: float) -> None:
    assert _deadline(2, 4 * MODEL_VALUES, lowest) == 900.0


def _entry(bw: object, **more: object) -> dict[str, Any]:
    return {"at": 10.0, "bw": bw, "bwf": bw, "inc": "x", **more}


def _views(records: dict[str, dict[str, Any]]) -> dict[str, _Formed]:
    """Each member's formed round: its own entry as it made it, the others' as read from the
    DHT (JSON), in the group order formation fixed."""
    group = list(records)
    views = {}
    for me in group:
        seen = {p: r if p == me else json.loads(json.dumps(r)) for p, r in records.items()}
        views[me] = formation.formed_group(group, [], seen)
    return views


class FakeNodeThread:
    """Runs the averager's work on a fresh event loop, with a node that has no network."""

    def __init__(self, peer_id: str) -> None:
        self.node = SimpleNamespace(
            peer_id=peer_id,
            clock=FakeClock(wall_start_s=1000.0),
            on_bulk=lambda *a, **k: None,
            on_bulk_read_only=lambda *a, **k: None,
            detector=SimpleNamespace(watch=lambda peer: None, liveness=lambda peer: None),
        )

    def run(self, fn: Callable[[Any], Awaitable[T]], *, timeout_s: float) -> T:
        async def bounded() -> T:
            return await asyncio.wait_for(fn(self.node), timeout_s)

        return asyncio.run(bounded())


def _averager(peer_id: str, **settings: Any) -> SwarmAverager:
    config = SwarmAveragerConfig(run_id="r", backend="p2p", **settings)
    return SwarmAverager(FakeNodeThread(peer_id), config)  # type: ignore[arg-type]


def _timeouts_given_to_the_all_reduce(
    monkeypatch: pytest.MonkeyPatch,
    averager: SwarmAverager,
    round_: _Formed,
    tensors: list[torch.Tensor],
) -> tuple[float, float]:
    """(timeout_s, send_timeout_s) the round's all-reduce was called with."""
    given: list[Any] = []

    async def form_group(node: Any, key: str) -> _Formed:
        return round_

    async def all_reduce(tensors: list[torch.Tensor], **kwargs: Any) -> Any:
        given.append(kwargs["config"])
        report = AllReduceReport(
            round_id="00", peer_id="a", members=kwargs["members"], codec="none"
        )
        return SimpleNamespace(tensors=[t.clone() for t in tensors], report=report)

    monkeypatch.setattr(averager, "_form_group", form_group)
    monkeypatch.setattr(averager_module, "all_reduce", all_reduce)
    averager.average(tensors, round_key="outer/3", weight=1.0)
    [config] = given
    return config.timeout_s, config.send_timeout_s


def test_the_all_reduce_gets_the_round_s_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two members on 1 Mbit/s links averaging a 16 MB model: it ran to the fixed 60 s
    # deadline (and a 30 s send timeout) and averaged under half of the model.
    records = {"a": _entry(1 * MBIT_S), "b": _entry(1.2 * MBIT_S)}
    figures = [1 * MBIT_S, 1.2 * MBIT_S]  # (as formation makes it, spelled out here)
    rates = agreed_send_rates(figures, figures)
    round_ = _Formed(["a", "b"], [], plan_weights(figures), rates, records)
    tensors = [torch.zeros(MODEL_VALUES)]
    timeout_s, send_timeout_s = _timeouts_given_to_the_all_reduce(
        monkeypatch, _averager("a"), round_, tensors
    )
    assert timeout_s == pytest.approx(256.0)
    assert send_timeout_s == 30.0  # (each message gets its share of the round besides)
    # The first round of a run, at the default figure: the floor.
    default = {"a": {"at": 1.0, "bw": 12.5e6}, "b": {"at": 1.0, "bw": 12.5e6}}
    timeout_s, _ = _timeouts_given_to_the_all_reduce(
        monkeypatch, _averager("a"), _views(default)["a"], tensors
    )
    assert timeout_s == 60.0


def test_every_member_gives_its_all_reduce_the_same_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    records = {
        "a": _entry(3 * MBIT_S),
        "b": _entry(0.7 * MBIT_S),
        "c": _entry(5 * MBIT_S),
        "d": _entry(1.1 * MBIT_S),
    }
    tensors = [torch.zeros(1_000_000), torch.zeros(300)]
    timeouts = {
        me: _timeouts_given_to_the_all_reduce(
            monkeypatch, _averager(me, codec="int8"), round_, tensors
        )
        for me, round_ in _views(records).items()
    }
    assert len(set(timeouts.values())) == 1
    [(timeout_s, _)] = set(timeouts.values())
    nbytes = 1_000_000 + 4 * math.ceil(1_000_000 / 4096) + 4 * 300
    assert timeout_s == pytest.approx(max(60.0, 2 * 1.5 * nbytes / (0.7 * MBIT_S)))


@pytest.mark.parametrize(
    "bogus",
    [1e-9, 1, 0, -5.0, math.nan, math.inf, 1e308, "fast", None, [1], "missing"],
)
def test_a_member_with_a_bogus_figure_cannot_stretch_a_round_past_the_cap(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, bogus: object
) -> None:
    liar = {"at": 10.0, "inc": "x"} if bogus == "missing" else _entry(bogus)
    for others in (1, 3):
        records = {"liar": liar} | {f"p{i}": _entry(10 * MBIT_S) for i in range(others)}
        tensors = [torch.zeros(MODEL_VALUES)]
        timeouts = set()
        for me, round_ in _views(records).items():
            averager = _averager(me, round_timeout_s=20.0, max_round_timeout_s=120.0)
            with caplog.at_level(logging.WARNING, logger=averager_module.__name__):
                timeout_s, _ = _timeouts_given_to_the_all_reduce(
                    monkeypatch, averager, round_, tensors
                )
            timeouts.add(timeout_s)
        [timeout_s] = timeouts  # (every member alike)
        assert 20.0 <= timeout_s <= 120.0
        if bogus in (1e-9, 1):  # (taken, as low as it says: the cap)
            assert timeout_s == 120.0
    if bogus in (1e-9, 1):
        # Said once per averager (per run), naming the key and what the links need.
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings
        assert all("swarm.max_round_timeout_s" in w and "outer/3" in w for w in warnings)
        assert all("set swarm.max_round_timeout_s to at least" in w.lower() for w in warnings)


def test_the_cap_warning_is_said_once_per_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    records = {"a": _entry(0.1 * MBIT_S), "b": _entry(0.1 * MBIT_S)}
    averager = _averager("a")
    tensors = [torch.zeros(MODEL_VALUES)]
    with caplog.at_level(logging.WARNING, logger=averager_module.__name__):
        for _ in range(3):
            timeout_s, _ = _timeouts_given_to_the_all_reduce(
                monkeypatch, averager, _views(records)["a"], tensors
            )
            assert timeout_s == 900.0
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "peer a round r/outer/3" in warning
    assert "at least 2560" in warning


def test_a_cap_below_the_floor_is_refused() -> None:
    with pytest.raises(ValueError, match="max_round_timeout_s"):
        SwarmAveragerConfig(run_id="r", round_timeout_s=60.0, max_round_timeout_s=30.0)
    with pytest.raises(ValueError, match="max_round_timeout_s"):
        SwarmAveragerConfig(run_id="r", max_round_timeout_s=math.inf)
    with pytest.raises(ConfigError, match=r"swarm\.max_round_timeout_s.*swarm\.round_timeout_s"):
        SwarmConfig(strategy="diloco", round_timeout_s=120.0, max_round_timeout_s=100.0)
    config = RunConfig(swarm=SwarmConfig(strategy="diloco", max_round_timeout_s=1800.0))
    assert swarm_averager_config(config).max_round_timeout_s == 1800.0
    assert SwarmConfig().max_round_timeout_s == 900.0


def _undecided_for_s(
    monkeypatch: pytest.MonkeyPatch, averager: SwarmAverager, records: dict[str, dict[str, Any]]
) -> float:
    """How long ``averager`` (whose own round failed) waits for the others of a round of
    ``records`` that closed at the clock's time and on which they said nothing yet."""
    now = averager._clock.wall()

    async def read_round(node: Any, reads: Any, seen: dict[str, dict[str, Any]]) -> Any:
        seen.update(records)
        memberships = {p: ("active", 1, "x") for p in records}
        return memberships, [{p: now for p in records}, {"a": now}, {"a": now}]

    monkeypatch.setattr(averager, "_read_round", read_round)
    fate = averager.round_fate("outer/3")
    assert fate.undecided == tuple(sorted(set(records) - {"a"}))
    return fate.undecided_for_s


def test_a_peer_waits_for_undecided_members_as_long_as_their_round_may_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A member of a thin-link round fails late, near the round's deadline: a peer whose own
    # attempt failed and gave up on the others at the fixed 60 s came back to the round's
    # closed key while they formed the next attempt (they ended an outer step apart).
    thin = {"a": _entry(1 * MBIT_S), "b": _entry(1.2 * MBIT_S)}
    averager = _averager("a")
    averager._wire_nbytes = 4 * MODEL_VALUES
    assert _undecided_for_s(monkeypatch, averager, thin) == pytest.approx(0.5 + 256.0 + 10.0)
    # On fast links, the floor: not the cap (a member alive but silent held it 15 minutes).
    fast = {"a": _entry(100 * MBIT_S), "b": _entry(100 * MBIT_S)}
    assert _undecided_for_s(monkeypatch, averager, fast) == pytest.approx(0.5 + 60.0 + 10.0)
    # A member that lies low: clamped as its group clamps it (a hundredth of the median),
    # not taken as it says (that gave 910.5 s on a round whose group had 351.8 s).
    liar = {"a": _entry(100 * MBIT_S), "b": _entry(1e-9), "c": _entry(100 * MBIT_S)}
    expected_liar = 2 * 2 * (2 / 3) * 16e6 / MBIT_S
    assert _undecided_for_s(monkeypatch, averager, liar) == pytest.approx(
        0.5 + expected_liar + 10.0
    )
    # In a group of two, the liar is the median itself: the cap holds.
    pair = {"a": _entry(100 * MBIT_S), "b": _entry(1e-9)}
    assert _undecided_for_s(monkeypatch, averager, pair) == pytest.approx(0.5 + 900.0 + 10.0)
    # Groups of at most max_group_size: 2(N-1)/N of the largest.
    many = {p: _entry(5 * MBIT_S) for p in "abcdefghij"}
    grouped = _averager("a", max_group_size=4)
    grouped._wire_nbytes = 4 * MODEL_VALUES
    expected = 2 * 1.5 * 16e6 / (5 * MBIT_S)
    assert _undecided_for_s(monkeypatch, grouped, many) == pytest.approx(0.5 + expected + 10.0)
    # Before this peer knows its buffer's size (it averaged nothing yet): the cap.
    assert _undecided_for_s(monkeypatch, _averager("a"), fast) == pytest.approx(0.5 + 900 + 10)


def test_what_waits_for_a_round_it_does_not_know_waits_for_the_cap() -> None:
    config = SwarmAveragerConfig(run_id="r", backend="p2p", max_round_timeout_s=600.0)
    assert config.averaging_bound_s == pytest.approx(0.5 + 600.0 + 10.0)


def test_the_wait_on_a_round_s_fate_is_the_deadline_its_groups_computed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # round_fate's bound took the lowest figure of any member unclamped: one member publishing
    # 1 B/s on fast links made peers wait 910.5 s on a round whose group's deadline was 214 s.
    tensors = [torch.zeros(2_506_560)]  # (a 10 MB fp32 model, as in the lab)
    cases: list[dict[str, dict[str, Any]]] = [
        {"a": _entry(12.5e6), "b": _entry(12.5e6), "c": _entry(1.0)},
        {"a": _entry(250e3), "b": _entry(250e3), "c": _entry(1e300)},
        {"a": _entry(250e3), "b": _entry(1e300), "c": _entry(1e300)},
        {"a": _entry(12.5e6, bwm=0), "b": _entry(12.5e6, bwm=3), "c": _entry(12.5e6, bwm=0)},
    ]
    for records in cases:
        averager = _averager("a")
        group_s, _ = _timeouts_given_to_the_all_reduce(
            monkeypatch, averager, _views(records)["a"], tensors
        )
        assert _undecided_for_s(monkeypatch, averager, records) == pytest.approx(
            0.5 + group_s + 10.0
        )
    assert formation.lowest_figure_of_any_group([_entry(12.5e6), _entry(12.5e6), _entry(1.0)]) == (
        pytest.approx(12.5e6 / 100)
    )


def test_an_unmeasured_member_counts_at_1_mbit_s_for_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 3 new peers on 2 Mbit/s links, a 10 MB model: each published the meter's start figure
    # (100 Mbit/s), the first round was cut at the 60 s floor (its ring bound is 53.5 s) and
    # the swarm splintered. Unmeasured (bwm 0) they count at 1 Mbit/s: 213.9 s, on every member.
    tensors = [torch.zeros(2_506_560)]
    nbytes = 4 * 2_506_560
    new = {p: _entry(12.5e6, bwm=0) for p in "abc"}
    timeouts = {
        me: _timeouts_given_to_the_all_reduce(monkeypatch, _averager(me), round_, tensors)[0]
        for me, round_ in _views(new).items()
    }
    [timeout_s] = set(timeouts.values())  # (every member alike)
    assert timeout_s == pytest.approx(2 * 2 * (2 / 3) * nbytes / MBIT_S)
    # One unmeasured member among measured fast ones: still its 1 Mbit/s.
    mixed = {"a": _entry(12.5e6, bwm=5), "b": _entry(12.5e6, bwm=0), "c": _entry(12.5e6, bwm=2)}
    timeout_s, _ = _timeouts_given_to_the_all_reduce(
        monkeypatch, _averager("a"), _views(mixed)["a"], tensors
    )
    assert timeout_s == pytest.approx(2 * 2 * (2 / 3) * nbytes / MBIT_S)
    # The part weights keep the published figures (equal here).
    assert _views(mixed)["a"].part_weights == [12.5e6] * 3
    # Measured, or from a peer before the field (no bwm; malformed counts as that): as before.
    for fields in ({"bwm": 4}, {}, {"bwm": "x"}, {"bwm": None}, {"bwm": math.nan}):
        old = {p: _entry(12.5e6, **fields) for p in "abc"}
        timeout_s, _ = _timeouts_given_to_the_all_reduce(
            monkeypatch, _averager("a"), _views(old)["a"], tensors
        )
        assert timeout_s == 60.0
    # A start figure set below 1 Mbit/s is taken as it is.
    low = {p: _entry(0.5 * MBIT_S, bwm=0) for p in "ab"}
    timeout_s, _ = _timeouts_given_to_the_all_reduce(
        monkeypatch, _averager("a"), _views(low)["a"], tensors
    )
    assert timeout_s == pytest.approx(2 * 2 * (1 / 2) * nbytes / (0.5 * MBIT_S))


def test_a_round_entry_says_how_many_measurements_its_figure_has() -> None:
    averager = _averager("a")
    stored: list[dict[str, Any]] = []

    async def put(key: bytes, value: bytes, ttl_s: float, **kwargs: Any) -> bool:
        stored.append(json.loads(value))
        raise RuntimeError("stop here")

    async def lookup(key: bytes) -> list[Any]:
        return []

    async def no_correction(node: Any) -> float:
        return 0.0

    node: Any = averager.node_thread.node
    node.dht = SimpleNamespace(put=put, lookup=lookup)
    averager._clock_correction_s = no_correction  # type: ignore[method-assign]
    for _ in range(2):
        with pytest.raises(RuntimeError, match="stop here"):
            asyncio.run(averager._form_group(node, "r/outer/0"))
        averager.meter.observe(250e3)
    assert [e["bwm"] for e in stored] == [0, 1]
    assert [e["bw"] for e in stored] == [12.5e6, 250e3]


def _torch_entry(bw: float, bwm: int, host: str) -> dict[str, Any]:
    return _entry(bw, bwm=bwm, tcp=f"{host}:29500", pg="", dev="cpu", bk="auto", lay="L")


def _backend_of_the_round(
    monkeypatch: pytest.MonkeyPatch, records: dict[str, dict[str, Any]], tensors: list[Any]
) -> tuple[str, float]:
    """(the backend member "a" averaged round outer/3 over, its all-reduce's deadline or the
    torch timeout), for a peer on backend auto that may open torch.distributed groups."""
    # (no store: a unit test opens no socket, and the torch round itself is a fake)
    monkeypatch.setattr(SwarmAverager, "_open_torch_store", lambda self: None)
    averager = SwarmAverager(
        FakeNodeThread("a"),  # type: ignore[arg-type]
        SwarmAveragerConfig(run_id="r", backend="auto"),
    )
    averager._torch = SimpleNamespace(  # type: ignore[assignment]
        group_hash=None, members=(), rank=0
    )
    given: list[tuple[str, float]] = []

    async def torch_round(node: Any, plan: Any, tensors: list[torch.Tensor], *a: Any) -> Any:
        given.append(("torch", averager._torch_timeout_s))
        report = AllReduceReport(round_id="00", peer_id="a", members=plan.members, codec="none")
        return SimpleNamespace(tensors=[t.clone() for t in tensors], report=report)

    monkeypatch.setattr(averager, "_torch_round", torch_round)
    monkeypatch.setattr(averager_module, "decline_round", lambda *a, **k: None)
    try:
        timeout_s, _ = _timeouts_given_to_the_all_reduce(
            monkeypatch, averager, _views(records)["a"], tensors
        )
    except ValueError:  # (no all-reduce: the torch round did it)
        [(backend, timeout_s)] = given
        return backend, timeout_s
    assert not given
    return "p2p", timeout_s


def test_a_round_whose_deadline_is_past_the_floor_goes_over_p2p_not_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Backend auto, codec none, private addresses: torch.distributed first, its timeout half
    # the floor (30 s) whatever the links; 3 new peers on 2 Mbit/s with a 10 MB model all
    # gave up at 60 s and averaged nothing, round after round (torch measures no link).
    tensors = [torch.zeros(2_506_560)]
    hosts = {"a": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3"}
    new = {p: _torch_entry(12.5e6, 0, h) for p, h in hosts.items()}
    backend, timeout_s = _backend_of_the_round(monkeypatch, new, tensors)
    assert backend == "p2p"
    assert timeout_s == pytest.approx(2 * 2 * (2 / 3) * 4 * 2_506_560 / MBIT_S)
    # Measured thin links: p2p with their deadline.
    thin = {p: _torch_entry(250e3, 3, h) for p, h in hosts.items()}
    assert _backend_of_the_round(monkeypatch, thin, tensors) == ("p2p", pytest.approx(106.95, 0.01))
    # Measured fast links (after p2p rounds measured them): back to torch.
    fast = {p: _torch_entry(12.5e6, 3, h) for p, h in hosts.items()}
    assert _backend_of_the_round(monkeypatch, fast, tensors) == ("torch", 30.0)
    # A small model is within the floor even unmeasured: torch from the first round.
    assert _backend_of_the_round(monkeypatch, new, [torch.zeros(1000)]) == ("torch", 30.0)


def test_round_entries_live_as_long_as_the_recent_rounds_need(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Sized by the 900 s cap (1091 s), a peer's entries and closes of fast rounds (one every
    # 0.2 s) piled up past max_records_per_publisher (10,000) and replicas refused its stores.
    averager = _averager("a")
    config = averager.config
    assert averager._entry_ttl_s() == config.entry_ttl_s  # (nothing known yet: the cap)
    assert config.entry_ttl_s >= config.formation_bound_s + config.max_round_timeout_s
    tensors = [torch.zeros(MODEL_VALUES)]
    fast = {"a": _entry(100 * MBIT_S), "b": _entry(100 * MBIT_S)}
    _timeouts_given_to_the_all_reduce(monkeypatch, averager, _views(fast)["a"], tensors)
    assert averager._entry_ttl_s() == 300.0  # (the floor, as before the deadline followed links)
    thin = {"a": _entry(1 * MBIT_S), "b": _entry(1 * MBIT_S)}
    _timeouts_given_to_the_all_reduce(monkeypatch, averager, _views(thin)["a"], tensors)
    assert averager._entry_ttl_s() == pytest.approx(config.formation_bound_s + 0.5 + 256 + 10 + 60)
    # The longest of the recent rounds counts, until it is no longer recent.
    for _ in range(15):
        _timeouts_given_to_the_all_reduce(monkeypatch, averager, _views(fast)["a"], tensors)
    assert averager._entry_ttl_s() > 300.0
    _timeouts_given_to_the_all_reduce(monkeypatch, averager, _views(fast)["a"], tensors)
    assert averager._entry_ttl_s() == 300.0
    # A deadline read from another round's entries (waiting on its fate) counts too.
    averager._wire_nbytes = 4 * MODEL_VALUES
    _undecided_for_s(monkeypatch, averager, thin)
    assert averager._entry_ttl_s() > 300.0
