"""A swarm DiLoCo peer publishes each outer step's state off the training thread, in order."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import json
import threading
import time
from collections.abc import Callable, Coroutine
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from torch import nn

from gossamer.core.errors import ConfigError, PeerUnavailableError
from gossamer.core.hashing import sha256_state
from gossamer.obs.metrics import PeerMetrics
from gossamer.train import swarm_catch_up, swarm_diloco, swarm_state_exchange
from gossamer.train.averaging import AverageOutcome, begin_round
from gossamer.train.diloco_config import DiLoCoConfig
from gossamer.train.state_sync import StateSnapshot
from gossamer.train.state_sync_wire import StateSyncLimits, decode_manifest, serialize_snapshot
from gossamer.train.swarm_averager import RoundFate
from gossamer.train.swarm_diloco import SwarmDiLoCoStrategy
from gossamer.train.swarm_sync import meta_bytes_bound

INNER_STEPS = 2


class FakeDht:
    """Records what was put; every get finds nothing."""

    def __init__(self) -> None:
        self.puts: list[tuple[bytes, bytes]] = []

    async def put(
        self, key: bytes, value: bytes, ttl_s: float | None = None, *, renew: bool = True
    ) -> int:
        self.puts.append((key, value))
        return 1

    async def get(self, key: bytes, *, replicated_only: bool = False) -> list[Any]:
        return []


class FakeNode:
    peer_id = "a" * 64

    def __init__(self) -> None:
        self.dht = FakeDht()

    def peers(self) -> list[Any]:
        return []


class FakeNodeThread:
    """Runs node work to completion in the calling thread."""

    def __init__(self) -> None:
        self.node = FakeNode()

    def run(self, work: Callable[[Any], Coroutine[Any, Any, Any]], timeout_s: float) -> Any:
        return asyncio.run(work(self.node))


class FakeAverager:
    """A swarm of one that records the run's membership, and in which thread it was told."""

    def __init__(self) -> None:
        self.newest_seen_version: int | None = None
        self.events: list[tuple[str, int]] = []
        self.threads: set[str] = set()
        self.settings: dict[str, Any] = {}
        self.other_settings: dict[str, str] = {}
        self.failed: list[str] = []
        self.left_before_joining: frozenset[str] = frozenset()

    @property
    def other_settings_peers(self) -> frozenset[str]:
        return frozenset(self.other_settings)

    def report_failed(self, round_key: str) -> None:
        self.failed.append(round_key)

    def failed_everywhere(self, round_key: str) -> bool:
        return False

    def round_fate(self, round_key: str) -> RoundFate:
        return RoundFate(failed_everywhere=self.failed_everywhere(round_key))

    def average(
        self, tensors: list[torch.Tensor], *, round_key: str, weight: float
    ) -> AverageOutcome:
        self.newest_seen_version = -1
        return AverageOutcome(
            tensors=[t.clone() for t in tensors], group_size=1, bytes_sent=0, bytes_received=0
        )

    def newest_version(self) -> int:
        return -1

    def join_run(self, version: int) -> None:
        self.events.append(("join", version))
        self.threads.add(threading.current_thread().name)

    def leave_run(self) -> None:
        self.events.append(("leave", -1))


class FakeDonor:
    def __init__(self) -> None:
        self.versions: list[int] = []
        self.steps: list[int] = []
        self.max_meta_bytes: list[int | None] = []

    def publish(self, snapshot: StateSnapshot, *, max_meta_bytes: int | None = None) -> None:
        self.versions.append(snapshot.version)
        self.steps.append(snapshot.meta["step"])
        self.max_meta_bytes.append(max_meta_bytes)

    def serving_idle_s(self, version: int, peers: set[str] | None = None) -> float | None:
        return None  # (nobody downloads from it)


def test_outer_steps_are_published_in_order_and_drained_on_close() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    averager, donor, node_thread = FakeAverager(), FakeDonor(), FakeNodeThread()
    strategy = SwarmDiLoCoStrategy(
        DiLoCoConfig(inner_steps=INNER_STEPS, run_id="r"),
        cast(Any, averager),
        cast(Any, node_thread),
        cast(Any, donor),
        join_existing=False,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy.setup(model, optimizer)
    hashes = []
    for step in range(3 * INNER_STEPS):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.01 * (step + 1))
        strategy.on_step_end(model, step)
        if (step + 1) % INNER_STEPS == 0:
            hashes.append(strategy.global_weights_hash())
    strategy.close()

    assert donor.versions == [0, 1, 2, 3]
    assert averager.events == [("join", 0), ("join", 1), ("join", 2), ("join", 3), ("leave", -1)]
    assert any(name.startswith("gossamer-publish") for name in averager.threads)
    published = [json.loads(value)["hash"] for _, value in node_thread.node.dht.puts]
    assert published == hashes  # each step's hash is that of its global weights
    assert not any(t.name.startswith("gossamer-publish") for t in threading.enumerate())


def test_a_state_that_is_not_this_run_s_is_refused_before_it_is_applied() -> None:
    """Verified bytes from donors, yet a meta without a step, or tensors of other shapes: each
    raised out of the strategy (KeyError, ValueError, RuntimeError in copy_) and ended training."""
    strategy = _strategy_on(nn.Linear(4, 4))
    good = strategy._snapshot(step=0)
    assert strategy._unusable(good) == ""
    bad_metas: list[dict[str, Any]] = [
        {"outer_step": 0},
        {"outer_step": 0, "step": "12"},
        {"outer_step": -1, "step": 0},
        {"outer_step": 0, "step": True},
        {"outer_step": 0, "step": 0, "round_in_flight": "yes"},
    ]
    for meta in bad_metas:
        snapshot = StateSnapshot(version=1, tensors=good.tensors, meta=meta)
        assert strategy._unusable(snapshot), meta
    wrong_shape = good.tensors | {"global.0": torch.zeros(3, 4)}
    assert "shape" in strategy._unusable(
        StateSnapshot(version=1, tensors=wrong_shape, meta=good.meta)
    )
    missing = {k: v for k, v in good.tensors.items() if k != "global.1"}
    assert "no tensor" in strategy._unusable(
        StateSnapshot(version=1, tensors=missing, meta=good.meta)
    )
    integers = good.tensors | {"momentum.0": torch.zeros(4, 4, dtype=torch.int64)}
    assert "floating" in strategy._unusable(
        StateSnapshot(version=1, tensors=integers, meta=good.meta)
    )
    strategy.close()


def _excluded(tensors: list[torch.Tensor]) -> AverageOutcome:
    """A round that went on without this peer: its own tensors back."""
    return AverageOutcome(
        tensors=[t.clone() for t in tensors],
        group_size=1,
        bytes_sent=0,
        bytes_received=0,
        excluded=True,
    )


class BehindAverager(FakeAverager):
    """Other peers nudged this one for the rounds ``nudged``; the run's versions read after
    them put the newest at ``published``."""

    def __init__(self, published: int, nudged: list[str]) -> None:
        super().__init__()
        self.newest_seen_version = published
        self.nudged = nudged

    def rounds_awaiting(self) -> list[str]:
        return list(self.nudged)

    def newest_version(self) -> int:
        raise AssertionError("the training thread reads no version between boundaries")


def _behind_peer(
    averager: FakeAverager, served: bool = True
) -> tuple[SwarmDiLoCoStrategy, nn.Module, StateSnapshot, list[int | None]]:
    """A peer at outer step 4, the swarm's state at outer step 5 (step 5 * H), and the
    versions it asked donors for (they serve it if ``served``)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    strategy = SwarmDiLoCoStrategy(
        DiLoCoConfig(inner_steps=INNER_STEPS * 4, run_id="r", train_while_forming=True),
        cast(Any, averager),
        cast(Any, FakeNodeThread()),
        cast(Any, FakeDonor()),
        join_existing=False,
    )
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    strategy.outer_step = 5
    newer = strategy._snapshot(step=5 * INNER_STEPS * 4)
    strategy.outer_step = 4
    downloads: list[int | None] = []

    def download(version: int | None, donors: object = None) -> StateSnapshot | None:
        downloads.append(version)
        return newer if served else None

    strategy._download = download  # type: ignore[method-assign]
    return strategy, model, newer, downloads


def test_a_peer_the_others_wait_for_at_a_newer_round_takes_their_state_between_boundaries() -> None:
    # A newcomer that synced to outer step 4 just before the others made 5: they wait for it
    # at round outer/5. Before, it trained to its boundary from state 4 (a whole round) before
    # it learned it was behind, and they waited that long for it.
    averager = BehindAverager(published=5, nudged=["r/outer/3", "other/outer/9", "r/outer/5"])
    strategy, model, newer, downloads = _behind_peer(averager)
    continue_from = strategy.on_step_end(model, 4 * INNER_STEPS * 4)  # not a boundary
    assert continue_from == newer.meta["step"]
    assert strategy.outer_step == 5
    assert strategy.resyncs == 1
    assert downloads == [5]  # the version the run's peers published, not the most held
    strategy.close()


@pytest.mark.parametrize(
    ("nudged", "published", "served"),
    [
        (["r/outer/5"], 4, True),  # the versions do not say it is behind: a stale nudge
        (["r/outer/4", "r/outer/x5", "r/outer/²"], 5, True),  # no round ahead of it
        (["r/outer/5"], 5, False),  # no donor serves it yet: tried once, not every step
        (["r/outer/6", "r/outer/7", "r/outer/8"], 9, False),  # forged: one try per 2 s
    ],
)
def test_a_nudge_alone_does_not_move_a_peer_nor_download_at_every_step(
    nudged: list[str], published: int, served: bool
) -> None:
    averager = BehindAverager(published=published, nudged=nudged)
    strategy, model, _, downloads = _behind_peer(averager, served=served)
    first = 4 * INNER_STEPS * 4
    for step in range(first, first + 3):
        assert strategy.on_step_end(model, step) is None
    assert strategy.outer_step == 4
    assert downloads == ([] if served else [published])
    strategy.close()


class RunAverager(FakeAverager):
    """A run of three other peers, one active; the node knows peers of other runs too."""

    def run_states(self) -> dict[str, tuple[str, int]]:
        return {"b" * 64: ("active", 3), "c" * 64: ("joining", 5), "d" * 64: ("left", -1)}


class CrowdedNode(FakeNode):
    def peers(self) -> list[Any]:
        return [SimpleNamespace(peer_id=p * 64) for p in "bcde"]


def test_a_peer_takes_state_only_from_its_own_run_s_active_peers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Donors were every peer the node knew: peers of another run in the same swarm (every
    peer serves its state) outvoted this run's, and a newcomer took their weights."""
    node_thread = FakeNodeThread()
    node_thread.node = CrowdedNode()
    strategy = SwarmDiLoCoStrategy(
        DiLoCoConfig(inner_steps=INNER_STEPS, run_id="r"),
        cast(Any, RunAverager()),
        cast(Any, node_thread),
        cast(Any, FakeDonor()),
        join_existing=False,
    )
    model = nn.Linear(4, 4)
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    asked: list[list[str]] = []

    def download(node_thread: object, donors: list[str], **kwargs: Any) -> Any:
        asked.append(list(donors))
        return strategy._snapshot(step=0), 0

    monkeypatch.setattr(swarm_state_exchange, "download_from_donors", download)
    assert strategy._download(version=None) is not None
    assert asked == [["b" * 64]]
    strategy.close()


def test_a_peer_resumed_from_its_checkpoint_serves_its_state_at_its_version_s_step() -> None:
    """It served its resumed state as that of step 0: a newcomer taking it started the run
    over (a restart test's peer went from step 0 while the other resumed at 30)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    donor = FakeDonor()
    strategy = SwarmDiLoCoStrategy(
        DiLoCoConfig(inner_steps=INNER_STEPS, run_id="r"),
        cast(Any, FakeAverager()),
        cast(Any, FakeNodeThread()),
        cast(Any, donor),
        join_existing=False,
    )
    strategy.outer_step = 5  # as a checkpoint of outer step 5 restores it
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert donor.versions[0] == 5
    assert donor.steps[0] == 5 * INNER_STEPS
    strategy.close()


class _RoundLog(FakeAverager):
    """A swarm of one that logs the (step, round key) of every average."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[int, str]] = []
        self.step = -1

    def average(
        self, tensors: list[torch.Tensor], *, round_key: str, weight: float
    ) -> AverageOutcome:
        self.log.append((self.step, round_key))
        return super().average(tensors, round_key=round_key, weight=weight)

    def run_states(self) -> dict[str, tuple[str, int]]:
        return {}

    def rounds_awaiting(self) -> list[str]:
        return []


def _forming_peer() -> tuple[SwarmDiLoCoStrategy, _RoundLog]:
    averager = _RoundLog()
    strategy = SwarmDiLoCoStrategy(
        DiLoCoConfig(inner_steps=5, run_id="r", train_while_forming=True),
        cast(Any, averager),
        cast(Any, FakeNodeThread()),
        cast(Any, FakeDonor()),
        join_existing=False,
    )
    return strategy, averager


def _train(strategy: SwarmDiLoCoStrategy, log: _RoundLog, model: nn.Module, steps: range) -> None:
    for step in steps:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.01)
        log.step = step
        assert strategy.on_step_end(model, step) is None


def test_a_peer_resumed_while_its_round_formed_forms_that_round_as_the_others_do() -> None:
    # The round forming when the checkpoint was taken was lost with the process, and the
    # resumed peer began it again at the next boundary: a round behind the others (and any
    # peer that took its state) to the end of the run, which it ended on other weights.
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    live, live_log = _forming_peer()
    live.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    _train(live, live_log, model, range(30))
    tensors, meta = live.state_for_checkpoint()  # the process is killed here
    _train(live, live_log, model, range(30, 50))
    live.close()

    resumed, resumed_log = _forming_peer()
    resumed.load_checkpoint_state(tensors, meta)
    restored = nn.Linear(4, 4)
    resumed.setup(restored, torch.optim.SGD(restored.parameters(), lr=0.1))
    _train(resumed, resumed_log, restored, range(30, 50))
    resumed.close()
    assert resumed_log.log == [entry for entry in live_log.log if entry[0] >= 30]
    assert resumed_log.log[0] == (30, "r/outer/5")


class _WeightLog(_RoundLog):
    """Logs the weight of every average too."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[float] = []

    def average(
        self, tensors: list[torch.Tensor], *, round_key: str, weight: float
    ) -> AverageOutcome:
        self.weights.append(weight)
        return super().average(tensors, round_key=round_key, weight=weight)


def test_a_peer_behind_at_finish_adds_nothing_to_the_tail_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It took the others' newer state (its local model restarted from it) and still joined the
    # tail round at full weight with a zero pseudo-gradient: with two peers, half the others'
    # last outer step.
    monkeypatch.setattr(swarm_diloco, "_FINAL_AGREEMENT_S", 0.0)
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    averager = _WeightLog()
    strategy = SwarmDiLoCoStrategy(
        DiLoCoConfig(inner_steps=5, run_id="r"),  # blocking rounds
        cast(Any, averager),
        cast(Any, FakeNodeThread()),
        cast(Any, FakeDonor()),
        join_existing=False,
    )
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    _train(strategy, averager, model, range(12))
    version = strategy.outer_step
    newer = StateSnapshot(
        version=version + 1,
        tensors=strategy.state_for_checkpoint()[0],
        meta={"outer_step": version + 1, "step": 10, "round_in_flight": False},
    )
    averager.newest_seen_version = version + 1
    monkeypatch.setattr(strategy, "_download", lambda version=None, donors=None: newer)
    monkeypatch.setattr(strategy, "_out_of_agreement", lambda outer_step: [])
    before = len(averager.weights)
    strategy.finish(model, 12)
    strategy.close()
    assert averager.weights[before:] == [0.0]


class _Excluding(_RoundLog):
    """Leaves this peer out of one round; records what each round was sent."""

    def __init__(self, excluded_key: str) -> None:
        super().__init__()
        self.excluded_key = excluded_key
        self.sent: dict[str, list[torch.Tensor]] = {}

    def average(
        self, tensors: list[torch.Tensor], *, round_key: str, weight: float
    ) -> AverageOutcome:
        self.sent[round_key] = [t.clone() for t in tensors]
        if round_key == self.excluded_key:
            return _excluded(tensors)
        return super().average(tensors, round_key=round_key, weight=weight)


def test_an_overlap_peer_resumed_after_a_round_left_it_out_does_not_send_that_round_again() -> None:
    # The local model stood on the estimate it restarted from, the checkpoint said no round was
    # in flight, and the resumed peer measured its next contribution from the global weights:
    # the excluded round's progress went out again.
    config = DiLoCoConfig(inner_steps=5, run_id="r", overlap=True)
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    averager = _Excluding("r/outer/2")
    strategy = SwarmDiLoCoStrategy(
        config,
        cast(Any, averager),
        cast(Any, FakeNodeThread()),
        cast(Any, FakeDonor()),
        join_existing=False,
    )
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for step in range(17):  # the round launched at step 14 leaves it out
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.01 * torch.randn_like(param))
        averager.step = step
        if strategy._inflight is not None:
            strategy._inflight.result()  # (done: it lands at this step's end)
        strategy.on_step_end(model, step)
    tensors, meta = strategy.state_for_checkpoint()
    strategy.close()
    assert "r/outer/2" in averager.sent
    resumed = SwarmDiLoCoStrategy(
        config,
        cast(Any, _Excluding("none")),
        cast(Any, FakeNodeThread()),
        cast(Any, FakeDonor()),
        join_existing=False,
    )
    resumed.load_checkpoint_state(tensors, meta)
    resumed.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    # Its progress counts from where its model stands, not from the global weights under it.
    progress = resumed._progress()
    resumed.close()
    assert all(float(p.abs().max()) == 0.0 for p in progress)


def test_a_resumed_overlap_peer_publishes_its_version_at_the_step_training_does() -> None:
    # Training publishes version v as of step (v + 1) H with overlap; resumed, it said v H, and
    # a peer that took the state began its rounds a boundary off the others.
    config = DiLoCoConfig(inner_steps=5, run_id="r", overlap=True)
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    log, donor = _RoundLog(), FakeDonor()
    live = SwarmDiLoCoStrategy(
        config, cast(Any, log), cast(Any, FakeNodeThread()), cast(Any, donor), join_existing=False
    )
    live.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for step in range(30):
        log.step = step
        if live._inflight is not None:
            live._inflight.result()
        live.on_step_end(model, step)
    tensors, meta = live.state_for_checkpoint()
    live.close()
    published = dict(zip(donor.versions, donor.steps, strict=True))
    resumed_donor = FakeDonor()
    resumed = SwarmDiLoCoStrategy(
        config,
        cast(Any, _RoundLog()),
        cast(Any, FakeNodeThread()),
        cast(Any, resumed_donor),
        join_existing=False,
    )
    resumed.load_checkpoint_state(tensors, meta)
    resumed.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    resumed.close()
    (version,) = resumed_donor.versions
    assert published[version] == resumed_donor.steps[0] == (version + 1) * 5


class MeteredAverager(FakeAverager):
    """What a peer with metrics observes: a config, and rounds formed on averaging."""

    config = SimpleNamespace(codec="none")

    def begin(self, round_key: str) -> Any:
        return begin_round(cast(Any, SimpleNamespace(average=self.average)), round_key)


class ExcludingAverager(MeteredAverager):
    """Every round goes on without this peer (it came after the round closed)."""

    def average(
        self, tensors: list[torch.Tensor], *, round_key: str, weight: float
    ) -> AverageOutcome:
        return _excluded(tensors)


def _goodput_peer(
    averager: FakeAverager, **config: Any
) -> tuple[SwarmDiLoCoStrategy, nn.Module, PeerMetrics]:
    """A peer at outer step 0 whose downloads serve the swarm's state at outer step 1."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    metrics = PeerMetrics()
    strategy = SwarmDiLoCoStrategy(
        DiLoCoConfig(inner_steps=4, run_id="r", **config),
        cast(Any, averager),
        cast(Any, FakeNodeThread()),
        cast(Any, FakeDonor()),
        join_existing=False,
        metrics=metrics,
        tokens_per_step=10,
    )
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    strategy.outer_step = 1
    newer = strategy._snapshot(step=8)
    strategy.outer_step = 0

    def download(version: int | None, donors: object = None) -> StateSnapshot | None:
        return newer

    strategy._download = download  # type: ignore[method-assign]
    return strategy, model, metrics


def _train_until_replaced(
    strategy: SwarmDiLoCoStrategy, model: nn.Module, metrics: PeerMetrics, first: int
) -> int:
    """Steps from ``first`` (each counted as the loop counts it) until the swarm's state
    replaces this peer's; returns the steps trained until then."""
    for step in range(first, first + 40):
        metrics.goodput.add_step(10)
        if strategy.on_step_end(model, step) is not None:
            return step + 1 - first
    raise AssertionError("the peer's state was never replaced")


def test_a_missed_background_round_discards_every_step_it_lost() -> None:
    # Training while the round averaged, the peer handed its progress to a round that went on
    # without it, trained on, then took the swarm's state: every step it trained was lost, and
    # a round's worth (4) was counted.
    strategy, model, metrics = _goodput_peer(
        ExcludingAverager(), train_while_forming=True, train_while_averaging=True
    )
    trained = _train_until_replaced(strategy, model, metrics, first=0)
    assert trained > 4
    figures = metrics.goodput.snapshot()
    assert (figures.tokens_discarded, figures.tokens_kept) == (trained * 10, 0)
    strategy.close()


def test_a_peer_behind_at_a_boundary_discards_the_steps_it_took_since_it_resumed() -> None:
    # Resumed at step 6 from an older checkpoint, it learned at the boundary after step 7 that
    # the swarm was ahead: 2 steps lost, and a round's worth (4) was counted.
    averager = MeteredAverager()
    strategy, model, metrics = _goodput_peer(averager, train_while_forming=False)
    strategy._newest_version = lambda: 1  # type: ignore[method-assign]
    metrics.goodput.add_step(1000)  # (earlier work of this process, kept)
    trained = _train_until_replaced(strategy, model, metrics, first=6)
    assert trained == 2
    figures = metrics.goodput.snapshot()
    assert (figures.tokens_discarded, figures.tokens_kept) == (20, 1000)
    strategy.close()


def _strategy_on(model: nn.Module) -> SwarmDiLoCoStrategy:
    strategy = SwarmDiLoCoStrategy(
        DiLoCoConfig(inner_steps=INNER_STEPS, run_id="r"),
        cast(Any, FakeAverager()),
        cast(Any, FakeNodeThread()),
        cast(Any, FakeDonor()),
        join_existing=False,
    )
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    return strategy


class _Named(nn.Module):
    """Two layers whose parameters line up in shape with ``nn.Sequential``'s, not in name."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)


def test_a_state_of_another_model_whose_shapes_line_up_is_refused_saying_what_differs() -> None:
    # A 2-layer newcomer took a 3-layer run's state: only global.0..3 were checked, their shapes
    # matched, and the extra tensors were ignored (a GPT's final_norm took the weights of
    # blocks.2.attention_norm, of the same shape).
    deeper = _strategy_on(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)))
    newcomer = _strategy_on(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    state = deeper._snapshot(step=0)
    why = newcomer._unusable(state)
    assert "the donors train another model" in why
    assert "6 parameter tensors there, 4 here; the first of there only is 2.weight" in why
    assert "set this peer's model config" in why  # what to do
    # From a donor that publishes no signature: the tensors it has no place for say it.
    unsigned = StateSnapshot(
        version=0,
        tensors=state.tensors,
        meta={k: v for k, v in state.meta.items() if k != "model_signature"},
    )
    why = newcomer._unusable(unsigned)
    assert "has no place for ('global.4', 'global.5')" in why
    # Same count and shapes, other parameters.
    named = _strategy_on(_Named())
    why = named._unusable(newcomer._snapshot(step=0))
    assert "parameter 0 is 0.weight of shape (4, 4) there, first.weight of shape (4, 4)" in why
    for malformed in ([["x"]], "abc", [[1, [4]]]):
        signed = StateSnapshot(
            version=0, tensors=state.tensors, meta=state.meta | {"model_signature": malformed}
        )
        assert "malformed" in newcomer._unusable(signed)
    # Its own model's state is still taken.
    assert newcomer._unusable(newcomer._snapshot(step=0)) == ""
    for strategy in (deeper, newcomer, named):
        strategy.close()


def test_a_newcomer_whose_model_is_not_the_runs_stops_with_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Refused with a warning only, it trained alone: its rounds never met the others'.
    deeper = _strategy_on(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)))
    state = deeper._snapshot(step=0)
    monkeypatch.setattr(swarm_state_exchange, "download_from_donors", lambda *a, **k: (state, 1))
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    newcomer = SwarmDiLoCoStrategy(
        DiLoCoConfig(inner_steps=INNER_STEPS, run_id="r"),
        cast(Any, FakeAverager()),
        cast(Any, FakeNodeThread()),
        cast(Any, FakeDonor()),
        join_existing=True,
    )
    monkeypatch.setattr(newcomer, "_others", lambda: ["donor"])
    with pytest.raises(ConfigError, match=r"the donors train another model.*set this peer's"):
        newcomer.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    # Still new to the run (it found no donor when it joined), a later download says so too.
    with pytest.raises(ConfigError, match=r"the donors train another model"):
        newcomer._download(version=None)
    # A peer of the run (a donor's bug, or a liar's): a refused download, as before.
    newcomer._of_the_run = True
    assert newcomer._download(version=None) is None
    deeper.close()


def test_the_state_of_a_model_of_8000_parameter_tensors_passes_the_meta_limits_it_is_sent_under(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The state's meta names every trained parameter and its shape: with a fixed 1 MiB limit a
    model of many tensors could not be published or downloaded. The DiLoCo path sizes both
    limits from the model, and its snapshot serializes and decodes under them."""
    long_name = "decoder_block_" * 10  # (a deep model's names run to a hundred characters)
    model = nn.ParameterDict({f"{long_name}{i}": nn.Parameter(torch.zeros(1)) for i in range(8000)})
    donor = FakeDonor()
    strategy = SwarmDiLoCoStrategy(
        DiLoCoConfig(inner_steps=INNER_STEPS, run_id="r" * 8),
        cast(Any, RunAverager()),
        cast(Any, FakeNodeThread()),
        cast(Any, donor),
        join_existing=False,
    )
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    asked: list[int | None] = []

    def download(node_thread: object, donors: list[str], **kwargs: Any) -> Any:
        asked.append(kwargs.get("max_meta_bytes"))
        raise PeerUnavailableError("no donor here")

    monkeypatch.setattr(swarm_state_exchange, "download_from_donors", download)
    assert strategy._download(version=None, donors=["b" * 64]) is None
    strategy._publish(step=0)
    bound = meta_bytes_bound(list(model.parameters()))
    assert asked == [bound]
    assert donor.max_meta_bytes
    assert set(donor.max_meta_bytes) == {bound}
    serialized = serialize_snapshot(
        strategy._snapshot(step=0), chunk_bytes=1 << 20, max_meta_bytes=bound
    )
    manifest = decode_manifest(serialized.manifest_bytes, StateSyncLimits(max_meta_bytes=bound))
    assert len(json.dumps(manifest.meta)) > StateSyncLimits().max_meta_bytes  # (what 1 MiB refused)
    strategy.close()


def _strategy_with(config: DiLoCoConfig, model: nn.Module) -> SwarmDiLoCoStrategy:
    strategy = SwarmDiLoCoStrategy(
        config,
        cast(Any, FakeAverager()),
        cast(Any, FakeNodeThread()),
        cast(Any, FakeDonor()),
        join_existing=False,
    )
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    return strategy


@pytest.mark.parametrize(
    ("theirs", "said"),
    [
        ({"inner_steps": 10}, "swarm.inner_steps is 10 there, 5 here"),
        ({"outer_lr": 1.3}, "swarm.outer_lr is 1.3 there, 0.7 here"),
        ({"outer_momentum_warmup": False}, "swarm.outer_momentum_warmup is False there, True"),
        ({"overlap": True}, "swarm.overlap is True there, False here"),
    ],
)
def test_a_newcomer_whose_diloco_settings_are_not_the_runs_stops_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, theirs: dict[str, Any], said: str
) -> None:
    # Not exchanged, peers with H 5 and 10 both ended at exit 0 with other weights; with outer
    # lr 0.7 and 1.3 they resynced each other 8 times in 40 rounds.
    run = _strategy_with(DiLoCoConfig(run_id="r", **{"inner_steps": 5} | theirs), nn.Linear(4, 4))
    run._of_the_run = True  # (it averaged with another peer: a run exists)
    state = run._snapshot(step=0)
    assert state.meta["diloco"]["inner_steps"] == (10 if "inner_steps" in theirs else 5)
    assert state.meta["of_the_run"] is True
    monkeypatch.setattr(swarm_state_exchange, "download_from_donors", lambda *a, **k: (state, 1))
    model = nn.Linear(4, 4)
    newcomer = SwarmDiLoCoStrategy(
        DiLoCoConfig(inner_steps=5, run_id="r"),
        cast(Any, FakeAverager()),
        cast(Any, FakeNodeThread()),
        cast(Any, FakeDonor()),
        join_existing=True,
    )
    monkeypatch.setattr(newcomer, "_others", lambda: ["donor"])
    with pytest.raises(ConfigError, match="other DiLoCo settings") as raised:
        newcomer.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert said in str(raised.value)
    assert "give it another run name" in str(raised.value)  # what to do
    # Still new to the run (it found no donor when it joined), a later download says so too;
    # for a peer of the run (a donor's bug, or a liar's) it is a refused download.
    with pytest.raises(ConfigError, match="other DiLoCo settings"):
        newcomer._download(version=None)
    newcomer._of_the_run = True
    assert "other DiLoCo settings" in newcomer._unusable(state)
    assert newcomer._download(version=None) is None
    run.close()


@pytest.mark.parametrize("odd", ["donor", "newcomer"])
def test_peers_started_together_do_not_refuse_each_other_for_a_state_nobody_averaged(
    monkeypatch: pytest.MonkeyPatch, odd: str
) -> None:
    # Peers started at the same moment (no run yet): whichever published its first state
    # first was "the run", and one peer with another H refused the honest ones that happened
    # to download its state (exit 2) while it trained on. Such a state is nobody's authority:
    # not taken, nobody refused; their first rounds decide (the odd one stops there).
    honest, other = (
        DiLoCoConfig(inner_steps=10, run_id="r"),
        DiLoCoConfig(inner_steps=5, run_id="r"),
    )
    first = _strategy_with(other if odd == "donor" else honest, nn.Linear(4, 4))
    state = first._snapshot(step=0)
    assert state.version == 0
    monkeypatch.setattr(swarm_state_exchange, "download_from_donors", lambda *a, **k: (state, 1))
    model = nn.Linear(4, 4)
    newcomer = SwarmDiLoCoStrategy(
        honest if odd == "donor" else other,
        cast(Any, FakeAverager()),
        cast(Any, FakeNodeThread()),
        cast(Any, FakeDonor()),
        join_existing=True,
    )
    monkeypatch.setattr(newcomer, "_others", lambda: ["donor"])
    assert newcomer.setup(model, torch.optim.SGD(model.parameters(), lr=0.1)) is None
    assert newcomer._new_to_run()  # (its rounds' settings check still applies to it)
    assert state.meta["of_the_run"] is False
    assert newcomer._snapshot(step=0).meta["of_the_run"] is False
    assert newcomer._download(version=None) is None
    # Once the state is of the run (its peer averaged with another), a newcomer with other
    # settings is refused, as before.
    first._of_the_run = True
    state = first._snapshot(step=0)
    with pytest.raises(ConfigError, match="other DiLoCo settings"):
        newcomer._download(version=None, joining=True)
    # An outer step its peer took alone beside peers of other settings makes it no authority.
    alone = state.meta | {"of_the_run": False, "outer_step": 1}
    state = StateSnapshot(version=1, tensors=state.tensors, meta=alone)
    assert newcomer._download(version=None) is None
    first.close()
    newcomer.close()


def test_a_state_without_diloco_settings_from_a_peer_of_before_is_taken() -> None:
    strategy = _strategy_with(DiLoCoConfig(inner_steps=5, run_id="r"), nn.Linear(4, 4))
    state = strategy._snapshot(step=0)
    older = StateSnapshot(
        version=0,
        tensors=state.tensors,
        meta={k: v for k, v in state.meta.items() if k not in ("diloco", "round_attempt")},
    )
    assert strategy._unusable(older) == ""
    # Settings only the other version has are not compared; malformed ones are refused.
    newer = StateSnapshot(
        version=0, tensors=state.tensors, meta=state.meta | {"diloco": {"new_setting": 3}}
    )
    assert strategy._unusable(newer) == ""
    malformed = StateSnapshot(version=0, tensors=state.tensors, meta=state.meta | {"diloco": [5]})
    assert "malformed" in strategy._unusable(malformed)
    strategy.close()


class _OtherSettingsAverager(FakeAverager):
    """A round of ``group_size`` peers whose entries held a peer with other settings too."""

    def __init__(self, group_size: int) -> None:
        super().__init__()
        self.group_size = group_size

    def average(
        self, tensors: list[torch.Tensor], *, round_key: str, weight: float
    ) -> AverageOutcome:
        self.other_settings = {"b" * 64: "swarm.inner_steps is 10 there, 5 here"}
        outcome = super().average(tensors, round_key=round_key, weight=weight)
        return dataclasses.replace(outcome, group_size=self.group_size)

    def run_states(self) -> dict[str, tuple[str, int]]:
        return {"b" * 64: ("active", 0)}  # (the run's only other peer: this one is the odd one)


@pytest.mark.parametrize(
    ("of_the_run", "group_size"), [(False, 1), (True, 1), (False, 2)], ids=["new", "of-run", "met"]
)
def test_peers_that_started_together_with_other_settings_are_refused_at_their_first_round(
    of_the_run: bool, group_size: int
) -> None:
    # A newcomer that found no donor yet (the first peer still starting) trained from scratch
    # and was never compared: its round entries carry its settings now. New to the run, it
    # stops; a peer of the run (it averaged with another, or took the run's state) goes on,
    # and its averager leaves the other out of its rounds; so does one whose round had others
    # of its settings in it.
    averager = _OtherSettingsAverager(group_size)
    strategy = SwarmDiLoCoStrategy(
        DiLoCoConfig(inner_steps=INNER_STEPS, run_id="r"),
        cast(Any, averager),
        cast(Any, FakeNodeThread()),
        cast(Any, FakeDonor()),
        join_existing=False,
    )
    model = nn.Linear(4, 4)
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert averager.settings == strategy.config.agreed_settings()  # (its round entries')
    strategy._of_the_run = of_the_run
    strategy.on_step_end(model, 0)
    if of_the_run or group_size > 1:
        strategy.on_step_end(model, 1)
        assert strategy.outer_step == 1
    else:
        with pytest.raises(ConfigError, match=r"peer bbbbbbbb of run 'r' uses other DiLoCo.*no st"):
            strategy.on_step_end(model, 1)
        assert strategy.outer_step == 0
    strategy.close()


class _RunOf(_OtherSettingsAverager):
    """A round alone beside the odd peer (b...), in a run whose active peers are ``active``."""

    def __init__(self, active: list[str]) -> None:
        super().__init__(group_size=1)
        self.active = active

    def run_states(self) -> dict[str, tuple[str, int]]:
        return {peer: ("active", 0) for peer in self.active}


def test_a_new_peer_stops_for_other_settings_only_as_the_odd_one_out() -> None:
    # Three peers started together, two with H 10 and the odd one with H 5: the first round
    # of one of the two closed before the other came (it had not joined the run yet). Alone
    # beside the odd peer, it stopped (exit 2) and left the odd one the run; it goes on now,
    # still new to the run: the run's other peer may share its settings.
    odd, honest = "b" * 64, "c" * 64
    averager = _RunOf([odd, honest])
    strategy = SwarmDiLoCoStrategy(
        DiLoCoConfig(inner_steps=INNER_STEPS, run_id="r"),
        cast(Any, averager),
        cast(Any, FakeNodeThread()),
        cast(Any, FakeDonor()),
        join_existing=False,
    )
    model = nn.Linear(4, 4)
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    strategy.on_step_end(model, 0)
    strategy.on_step_end(model, 1)
    assert strategy.outer_step == 1
    assert strategy._new_to_run()  # (an outer step alone beside the odd peer: no authority)
    assert strategy._snapshot(step=2).meta["of_the_run"] is False
    # The other peer left: every active peer uses other settings, and this one stops.
    averager.active = [odd]
    strategy.on_step_end(model, 2)
    with pytest.raises(ConfigError, match=r"peer bbbbbbbb of run 'r' uses other DiLoCo.*no st"):
        strategy.on_step_end(model, 3)
    strategy.close()


class _BatchNormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)


def test_averaged_buffers_travel_with_the_state_and_its_hash() -> None:
    donor = _strategy_with(DiLoCoConfig(inner_steps=INNER_STEPS, run_id="r"), _BatchNormed())
    state = donor._snapshot(step=0)
    assert {"buffer.0", "buffer.1"} <= set(state.tensors)  # running mean and variance
    assert "buffer.2" not in state.tensors  # (the batch count is an integer: each peer's own)
    model = _BatchNormed()
    newcomer = _strategy_with(DiLoCoConfig(inner_steps=INNER_STEPS, run_id="r"), model)
    hash_before = newcomer.global_weights_hash()
    state.tensors["buffer.0"].fill_(3.0)
    assert newcomer._unusable(state) == ""
    state = StateSnapshot(version=1, tensors=state.tensors, meta=state.meta | {"outer_step": 1})
    newcomer._apply_snapshot(state)
    assert torch.equal(model.norm.running_mean, torch.full((4,), 3.0))
    assert newcomer.global_weights_hash() != hash_before
    wrong = StateSnapshot(
        version=1, tensors=state.tensors | {"buffer.1": torch.zeros(5)}, meta=state.meta
    )
    assert "'buffer.1'" in newcomer._unusable(wrong)
    # A model without such buffers hashes as before they were averaged (peers of both agree).
    plain = _strategy_with(DiLoCoConfig(inner_steps=INNER_STEPS, run_id="r"), nn.Linear(4, 4))
    expected = sha256_state({str(i): t for i, t in enumerate(plain._global)})
    assert plain.global_weights_hash() == expected
    for strategy in (donor, newcomer, plain):
        strategy.close()


class _FailedEverywhere(FakeAverager):
    """A swarm in which the round ``failing`` fails on every member (this peer's all-reduce
    ran past its deadline: its own tensors back, excluded), and the swarm says so."""

    def __init__(self, failing: str) -> None:
        super().__init__()
        self.failing = failing
        self.rounds: list[str] = []

    def average(
        self, tensors: list[torch.Tensor], *, round_key: str, weight: float
    ) -> AverageOutcome:
        self.rounds.append(round_key)
        if round_key == self.failing:
            return _excluded(tensors)
        return super().average(tensors, round_key=round_key, weight=weight)

    def failed_everywhere(self, round_key: str) -> bool:
        return round_key == self.failing

    def run_states(self) -> dict[str, tuple[str, int]]:
        return {"b" * 64: ("active", 1)}  # (another peer, which publishes no newer state)


@pytest.mark.parametrize("background", [False, True])
def test_a_round_failed_on_every_member_is_formed_again_with_its_progress(
    monkeypatch: pytest.MonkeyPatch, background: bool
) -> None:
    # Before, the peer waited 30 s for a newer state nobody published, then formed the round
    # again under the same key, closed by the failed attempt: never averaged again.
    monkeypatch.setattr(swarm_diloco, "_FINAL_AGREEMENT_S", 0.0)
    monkeypatch.setattr(swarm_catch_up, "_NEWER_STATE_WAIT_S", 1.0)  # (the old code's wait)
    averager = _FailedEverywhere("r/outer/1")
    strategy = SwarmDiLoCoStrategy(
        DiLoCoConfig(
            inner_steps=2,
            outer_lr=1.0,
            outer_momentum=0.0,
            run_id="r",
            train_while_forming=background,
            train_while_averaging=background,
        ),
        cast(Any, averager),
        cast(Any, FakeNodeThread()),
        cast(Any, FakeDonor()),
        join_existing=False,
    )
    monkeypatch.setattr(strategy, "_download", lambda *a, **k: None)
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    started = time.monotonic()
    for step in range(8):
        with torch.no_grad():
            model.weight.sub_(0.1)
        strategy.on_step_end(model, step)
        strategy._wait_for_publication()
        if strategy._averaging is not None:  # (lands at the next step end, as it is done)
            concurrent.futures.wait([strategy._averaging], timeout=10)
    strategy.finish(model, 8)
    assert time.monotonic() - started < 1.0  # no wait for a newer state
    keys = averager.rounds
    assert keys[:3] == ["r/outer/0", "r/outer/1", "r/outer/1#1"]
    # Every step's progress is in the global weights: none thrown away with the failed round.
    assert strategy.outer_step == len(keys) - 1
    assert float(model.weight.detach()) == pytest.approx(0.2)
    assert float(strategy._global[0].detach()) == pytest.approx(0.2)
    assert strategy.resyncs == 0
    strategy.close()


class _OddPeerAverager(FakeAverager):
    """A run of b (this peer's settings, at this peer's version 3) and x, an odd peer of a
    smaller H (known by its round entries) whose versions run ahead: the run's versions, read
    without x's (see SwarmAverager.other_settings_peers), say nothing newer is out."""

    def __init__(self) -> None:
        super().__init__()
        self.other_settings = {"x" * 64: "swarm.inner_steps is 1 there, 2 here"}
        self.newest_seen_version = 3

    def run_states(self) -> dict[str, tuple[str, int]]:
        return {"b" * 64: ("active", 3), "x" * 64: ("active", 7)}

    def newest_version(self) -> int:
        return 3


def test_a_peer_waiting_for_a_newer_state_neither_downloads_at_every_poll_nor_from_an_odd_peer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Peers a, b (H 10) beside an odd x (H 5) that never met them: a counted x's versions, was
    # behind, and waited 30 s for a newer state, downloading every 0.2 s (x won the tie of
    # two donors as the newer version; its state refused as unusable): 145 downloads in a run.
    monkeypatch.setattr(swarm_catch_up, "_NEWER_STATE_WAIT_S", 1.0)
    strategy = SwarmDiLoCoStrategy(
        DiLoCoConfig(inner_steps=INNER_STEPS, run_id="r"),
        cast(Any, _OddPeerAverager()),
        cast(Any, FakeNodeThread()),
        cast(Any, FakeDonor()),
        join_existing=False,
    )
    model = nn.Linear(4, 4)
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    strategy.outer_step = 3
    same = strategy._snapshot(step=3 * INNER_STEPS)
    asked: list[list[str]] = []

    def download(node_thread: object, donors: list[str], **kwargs: Any) -> Any:
        asked.append(list(donors))
        return same, 0

    monkeypatch.setattr(swarm_state_exchange, "download_from_donors", download)
    assert strategy._wait_for_newer_state() is None
    assert asked == [["b" * 64]]  # one try (then one per 2 s), never x
    strategy.close()


class _MissedRoundAverager(FakeAverager):
    """This peer missed round 4; the run's other peer published version 5."""

    def round_fate(self, round_key: str) -> RoundFate:
        return RoundFate(failed_everywhere=False, newest_version=5)

    def run_states(self) -> dict[str, tuple[str, int]]:
        return {"b" * 64: ("active", 5)}


def _missed_round_4() -> SwarmDiLoCoStrategy:
    """A peer (training while the group forms) at outer step 4 that missed its round; the run's
    other peer published version 5."""
    strategy = SwarmDiLoCoStrategy(
        DiLoCoConfig(inner_steps=INNER_STEPS, run_id="r", train_while_forming=True),
        cast(Any, _MissedRoundAverager()),
        cast(Any, FakeNodeThread()),
        cast(Any, FakeDonor()),
        join_existing=False,
    )
    model = nn.Linear(4, 4)
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    strategy.outer_step = 4
    strategy.last_round_excluded = True
    return strategy


class _FakeTime:
    """``time`` for the swarm module: sleeping moves the monotonic clock on at once."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def monotonic(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.now_s += seconds


def test_a_failed_download_of_a_newer_state_is_tried_again_at_the_next_poll(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The newest version was noted as tried before its download, which failed (a donor's
    # circuit breaker was open): the next try waited for the 2 s timer, not for the next poll.
    strategy = _missed_round_4()
    strategy.outer_step = 5
    newer = strategy._snapshot(step=5 * INNER_STEPS)
    strategy.outer_step = 4
    clock = _FakeTime()
    tried_at_s: list[float] = []

    def download(node_thread: object, donors: list[str], **kwargs: Any) -> Any:
        tried_at_s.append(clock.now_s)
        if len(tried_at_s) == 1:
            raise PeerUnavailableError("circuit breaker open for peer bbbbbbbb")
        return newer, 100

    monkeypatch.setattr(swarm_state_exchange, "download_from_donors", download)
    monkeypatch.setattr(swarm_catch_up, "time", clock)
    assert strategy._wait_for_newer_state() is newer
    assert tried_at_s == [0.0, pytest.approx(0.2)]  # the next poll, not 2 s later
    monkeypatch.undo()
    strategy.close()


def test_downloads_that_keep_failing_are_tried_less_and_less_often(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(swarm_catch_up, "_NEWER_STATE_WAIT_S", 8.0)
    strategy = _missed_round_4()
    clock = _FakeTime()
    tried_at_s: list[float] = []

    def download(node_thread: object, donors: list[str], **kwargs: Any) -> Any:
        tried_at_s.append(clock.now_s)
        raise PeerUnavailableError("circuit breaker open for peer bbbbbbbb")

    monkeypatch.setattr(swarm_state_exchange, "download_from_donors", download)
    monkeypatch.setattr(swarm_catch_up, "time", clock)
    assert strategy._wait_for_newer_state() is None
    monkeypatch.undo()
    gaps = [later - earlier for earlier, later in itertools.pairwise(tried_at_s)]
    assert gaps[0] == pytest.approx(0.2)
    assert all(b >= a - 1e-6 for a, b in itertools.pairwise(gaps)), gaps  # backing off
    assert max(gaps) <= 2.0 + 0.2 + 1e-6, gaps  # up to the 2 s timer, then at that pace
    strategy.close()


class _NudgedForItsRound(FakeAverager):
    """The others nudged this peer for round ``r/outer/4``; of the run's three other active
    peers, ``entered`` have their entries of it on the DHT."""

    def __init__(self, entered: int) -> None:
        super().__init__()
        self.entered = entered
        self.reads: list[str] = []

    def rounds_awaiting(self) -> list[str]:
        return ["r/outer/4"]

    def round_entrants(self, round_key: str) -> tuple[frozenset[str], frozenset[str]]:
        self.reads.append(round_key)
        active = frozenset(p * 64 for p in "bcd")
        return active, frozenset(sorted(active)[: self.entered])


def _newcomer_at_outer_step_4(
    averager: FakeAverager, max_steps: int | None = None
) -> tuple[SwarmDiLoCoStrategy, nn.Module]:
    """A peer that took the others' state of outer step 4 (as of step 4 H), as a newcomer
    does, training while its rounds form (to ``max_steps``, where given)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    strategy = SwarmDiLoCoStrategy(
        DiLoCoConfig(inner_steps=INNER_STEPS * 4, run_id="r", train_while_forming=True),
        cast(Any, averager),
        cast(Any, FakeNodeThread()),
        cast(Any, FakeDonor()),
        join_existing=False,
        max_steps=max_steps,
    )
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    strategy.outer_step = 4
    state = strategy._snapshot(step=4 * INNER_STEPS * 4)
    strategy.outer_step = 0
    strategy._apply_snapshot(state)
    assert strategy.outer_step == 4
    return strategy, model


def test_a_peer_that_took_the_swarms_state_joins_the_round_the_others_began() -> None:
    # It went on from the state's step, 4 H, while the others were steps past it: it came to
    # their round 4 as many steps after them, past their join window, and never averaged.
    h = INNER_STEPS * 4
    averager = _NudgedForItsRound(entered=2)
    strategy, model = _newcomer_at_outer_step_4(averager)
    step = 4 * h + 1  # (two steps taken from the state; the others are at their boundary)
    assert strategy.on_step_end(model, step) == 5 * h  # goes on after the others' boundary
    assert averager.reads == ["r/outer/4"]
    assert strategy.round_began_at == 5 * h - 1  # published as of 5 H, as theirs is
    # The round formed (this fake forms it inside average): averaged at the next step end,
    # the two steps taken before joining weighted as such.
    assert strategy.on_step_end(model, 5 * h) is None
    assert strategy.outer_step == 5
    # Once per state taken: a later nudge of its round does not move it.
    assert strategy.on_step_end(model, 5 * h + 1) is None
    assert averager.reads == ["r/outer/4"]
    strategy.close()


def test_a_peer_is_not_moved_to_a_round_most_of_the_run_is_not_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Any peer can nudge: one alone (a peer that lies, or the first of many to come) in the
    # round does not move this one off its own boundary.
    monkeypatch.setattr(swarm_catch_up, "_JOIN_CHECK_EVERY_S", 60.0)
    h = INNER_STEPS * 4
    averager = _NudgedForItsRound(entered=1)
    strategy, model = _newcomer_at_outer_step_4(averager)
    for step in range(4 * h + 1, 4 * h + 4):
        assert strategy.on_step_end(model, step) is None
    assert strategy.outer_step == 4
    assert averager.reads == ["r/outer/4"]  # not read again at every step end
    strategy.close()


def test_a_peer_joins_early_a_round_whose_boundary_is_the_runs_last_step() -> None:
    # (max_steps a multiple of H: the others average that round at their last step's end)
    h = INNER_STEPS * 4
    averager = _NudgedForItsRound(entered=2)
    strategy, model = _newcomer_at_outer_step_4(averager, max_steps=5 * h)
    assert strategy.on_step_end(model, 4 * h + 1) == 5 * h
    strategy.close()


def test_a_peer_does_not_join_early_a_round_past_the_end_of_the_run() -> None:
    # max_steps not a multiple of H: the others' last round is the one after their last step
    # (finish()), applied without the outer momentum. Joined early, this peer averaged it as
    # a boundary's round (with the momentum: other weights) and went on from the boundary's
    # next step, past the budget: it ended at 5 H, the others at 5 H - 3.
    h = INNER_STEPS * 4
    max_steps = 5 * h - 3
    averager = _NudgedForItsRound(entered=3)
    strategy, model = _newcomer_at_outer_step_4(averager, max_steps=max_steps)
    step = 4 * h + 1  # (two steps taken from the state; the others are in their last round)
    while step < max_steps:
        assert strategy.on_step_end(model, step) is None, f"it jumped at step {step}"
        step += 1
    # It ends at the others' step, on their grid, with no round of its own formed: its last
    # round is the others' (same key), run after its last step as theirs is.
    assert strategy._forming is None
    assert strategy.outer_step == 4
    assert strategy._round_key() == "r/outer/4"
    strategy.close()


class _TheOthersFinished(_NudgedForItsRound):
    """The others ran their last round (after their last step) and published version 5."""

    def round_fate(self, round_key: str) -> RoundFate:
        return RoundFate(failed_everywhere=False, newest_version=5)

    def run_states(self) -> dict[str, tuple[str, int]]:
        return {}


def test_a_peer_behind_at_the_end_that_takes_the_others_last_state_ends_on_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It came to the end (max_steps not a multiple of H) after the others had run their last
    # round and published its state: it took that state, then ran that last round again,
    # alone, and ended an outer step past them (everyone waited out the final agreement).
    h = INNER_STEPS * 4
    max_steps = 5 * h - 3
    averager = _TheOthersFinished(entered=3)
    strategy, model = _newcomer_at_outer_step_4(averager, max_steps=max_steps)
    for step in range(4 * h + 1, max_steps):
        assert strategy.on_step_end(model, step) is None
    strategy.outer_step = 5
    theirs = strategy._snapshot(step=max_steps, final=True)  # (from the others' finish())
    their_hash = strategy.global_weights_hash()
    strategy.outer_step = 4
    monkeypatch.setattr(strategy, "_newest_version", lambda: 5)
    monkeypatch.setattr(strategy, "_download", lambda version=None, donors=None: theirs)
    strategy.finish(model, max_steps)
    assert strategy.outer_step == 5  # theirs, not one more
    assert strategy.global_weights_hash() == their_hash
    strategy.close()
