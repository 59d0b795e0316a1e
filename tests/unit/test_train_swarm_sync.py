"""Elastic sync's wiring: serving a newcomer at its step, rejoining after a missed round."""

from __future__ import annotations

import copy
import importlib
import logging
from collections.abc import Callable
from typing import Any, cast

import pytest
import torch
from torch import nn

from gossamer.core.errors import DeadlineExceededError, GossamerError
from gossamer.obs.metrics import PeerMetrics
from gossamer.train import swarm_sync
from gossamer.train.averaging import AverageOutcome
from gossamer.train.state_sync import StateSnapshot
from gossamer.train.swarm_sync import SwarmSyncStrategy


class FakeAverager:
    """A run's membership as a sync peer sees it; every round is this peer's alone."""

    def __init__(self) -> None:
        self.joining: dict[str, int] = {}
        self.states: dict[str, tuple[str, int]] = {}
        self.events: list[tuple[str, int]] = []
        self.excluded = False
        self.newest_seen_version: int | None = None

    def average(
        self, tensors: list[torch.Tensor], *, round_key: str, weight: float
    ) -> AverageOutcome:
        return AverageOutcome(
            tensors=[t.clone() for t in tensors],
            group_size=0 if self.excluded else 1,
            bytes_sent=0,
            bytes_received=0,
            excluded=self.excluded,
        )

    def join_run(self, version: int) -> None:
        self.events.append(("join", version))

    def announce_joining(self, step: int) -> None:
        self.events.append(("joining", step))

    def leave_run(self) -> None:
        self.events.append(("leave", -1))

    def run_states(self) -> dict[str, tuple[str, int]]:
        return dict(self.states)


class FakeDonor:
    def __init__(self) -> None:
        self.snapshots: list[StateSnapshot] = []

    def publish(self, snapshot: StateSnapshot) -> None:
        self.snapshots.append(snapshot)


class FakeNode:
    peer_id = "m" * 52


class FakeNodeThread:
    node = FakeNode()


def make(
    averager: FakeAverager,
    donor: FakeDonor,
    *,
    join_existing: bool = False,
    metrics: PeerMetrics | None = None,
) -> SwarmSyncStrategy:
    return SwarmSyncStrategy(
        cast(Any, averager),
        cast(Any, averager),
        cast(Any, FakeNodeThread()),
        cast(Any, donor),
        join_existing=join_existing,
        run_id="r",
        announce_every=10,
        metrics=None if metrics is None else metrics.enable_swarm(),
        goodput=None if metrics is None else metrics.goodput,
        tokens_per_step=1000,
    )


def train_one_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def _serving(
    steps: int,
) -> tuple[nn.Module, torch.optim.Optimizer, FakeAverager, FakeDonor, SwarmSyncStrategy]:
    """A peer that trained ``steps`` steps, a newcomer having asked for the state at the last."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    averager, donor = FakeAverager(), FakeDonor()
    strategy = make(averager, donor)
    strategy.setup(model, optimizer)
    averager.joining = {"newcomer": steps}
    averager.states = {"newcomer": ("active", steps)}  # it takes the state at once
    for step in range(steps):
        train_one_step(model, optimizer)
        strategy.on_step_end(model, step)
    return model, optimizer, averager, donor, strategy


def test_serves_a_newcomer_the_exact_state_at_its_step() -> None:
    model, optimizer, averager, donor, strategy = _serving(20)
    assert averager.events == [("join", 0), ("join", 10), ("join", 20)]
    (snapshot,) = donor.snapshots  # published once, at the end of step 19, as version 20
    assert snapshot.version == 20
    assert snapshot.meta["step"] == 20
    assert set(snapshot.meta) == {"step", "optimizer"}  # the optimizer's tree beside its tensors
    assert strategy.newcomers_served == 1

    # A newcomer that takes it stands exactly where this peer stands, optimizer included.
    torch.manual_seed(1)
    other = nn.Linear(4, 3)
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=0.1)
    newcomer = make(FakeAverager(), FakeDonor(), join_existing=True)
    newcomer._model, newcomer._optimizer = other, other_optimizer
    newcomer._apply(snapshot)
    for mine, theirs in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(mine, theirs)
        for name, value in optimizer.state[mine].items():
            assert torch.equal(value, other_optimizer.state[theirs][name])
    train_one_step(model, optimizer)
    train_one_step(other, other_optimizer)
    for mine, theirs in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(mine, theirs)  # and stays there, step after step


def test_a_peer_serving_a_step_off_the_period_says_it_is_there() -> None:
    # Resumed at step 37 it announced 37; a newcomer asked for 57, which it never announced,
    # so the newcomer waited for it to say so to its timeout while it sat in _serve.
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    averager, donor = FakeAverager(), FakeDonor()
    strategy = make(averager, donor)
    strategy.resume_at(37)
    strategy.setup(model, optimizer)
    averager.joining = {"newcomer": 57}
    averager.states = {"newcomer": ("active", 57)}
    for step in range(37, 57):
        strategy.on_step_end(model, step)
    assert averager.events == [("join", 37), ("join", 40), ("join", 50), ("join", 57)]
    assert [s.version for s in donor.snapshots] == [57]


def test_a_donor_waits_for_a_newcomer_as_long_as_its_download_may_take(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A fixed 60 s: a state whose download took longer came after the others trained on, its
    # first round was closed, and it joined again, and again, downloading it each time.
    monkeypatch.setattr(swarm_sync, "_MEMBER_WAIT_S", 0.0)
    monkeypatch.setattr(swarm_sync, "_DOWNLOAD_TIMEOUT_S", 0.0)
    monkeypatch.setattr(swarm_sync, "_MIN_DOWNLOAD_BYTES_PER_S", 1.0)  # (seconds per byte)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    averager, donor = FakeAverager(), FakeDonor()
    strategy = make(averager, donor)
    strategy.setup(model, optimizer)
    reads = 0

    def run_states() -> dict[str, tuple[str, int]]:
        nonlocal reads
        reads += 1  # joining for two reads (its download), a member from the third
        return {"newcomer": ("joining", 10) if reads < 3 else ("active", 10)}

    monkeypatch.setattr(averager, "run_states", run_states)
    averager.joining = {"newcomer": 10}
    for step in range(10):
        strategy.on_step_end(model, step)
    assert reads == 3
    assert "did not join" not in caplog.text


def test_a_peer_that_missed_a_round_joins_again_at_the_step_it_gets() -> None:
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    averager, donor, metrics = FakeAverager(), FakeDonor(), PeerMetrics()
    strategy = make(averager, donor, metrics=metrics)
    strategy.setup(model, optimizer)
    taken: list[int] = []

    def join() -> int:
        taken.append(1)
        return 42

    strategy._join = join  # type: ignore[method-assign]
    metrics.goodput.add_step(7000)  # the steps before
    averager.excluded = True
    strategy.on_gradients(model, 7)
    assert strategy.last_round_excluded
    assert strategy.on_step_end(model, 7) == 42  # the loop continues from the step it took
    assert taken == [1]
    assert strategy.resyncs == 1
    assert averager.events[-1] == ("join", 42)
    # In the metrics too (gossamer_resyncs_total stayed 0), and its step is not goodput.
    swarm_metrics = metrics.swarm
    assert swarm_metrics is not None
    assert swarm_metrics.resyncs._value.get() == 1
    assert metrics.goodput.snapshot().tokens_discarded == 1000

    averager.excluded = False
    strategy.on_gradients(model, 42)
    assert strategy.on_step_end(model, 42) is None


def _published_state() -> StateSnapshot:
    (snapshot,) = _serving(10)[3].snapshots
    return snapshot


def _wrong_shaped_moment(snapshot: StateSnapshot) -> None:
    name = next(n for n, t in snapshot.tensors.items() if n.startswith("optim.") and t.dim())
    snapshot.tensors[name] = torch.zeros(7)


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda s: s.meta.__setitem__("optimizer", [1, 2]), "optimizer meta is a list"),
        (lambda s: s.meta.__setitem__("optimizer", None), "optimizer meta is a NoneType"),
        (lambda s: s.meta.pop("optimizer"), "optimizer meta is a NoneType"),
        (lambda s: s.meta["optimizer"]["tree"].__setitem__("state", 5), "optimizer state"),
        (lambda s: s.meta["optimizer"]["tree"].__setitem__("param_groups", 5), "optimizer"),
        (_wrong_shaped_moment, "has shape \\(7,\\), not"),
        (lambda s: s.tensors.__setitem__("param.1", torch.zeros(2)), "parameter 1 is"),
        (lambda s: s.tensors.__setitem__("param.1", torch.zeros(3, dtype=torch.int64)), "int64"),
        (lambda s: s.tensors.pop("param.1"), "different parameters"),
    ],
)
def test_a_state_that_does_not_fit_is_refused_and_nothing_of_it_is_taken(
    damage: Callable[[StateSnapshot], object], says: str
) -> None:
    # A donor's state reaches a newcomer, or a peer joining again after a missed round, over
    # the network: whatever is wrong with it, the peer says what and keeps its own state whole
    # (it crashed on a malformed optimizer tree, and copied weights before checking them all).
    snapshot = _published_state()
    damage(snapshot)
    torch.manual_seed(1)
    other = nn.Linear(4, 3)
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=0.1)
    train_one_step(other, other_optimizer)
    weights = [p.detach().clone() for p in other.parameters()]
    moments = copy.deepcopy(other_optimizer.state_dict())
    newcomer = make(FakeAverager(), FakeDonor(), join_existing=True)
    newcomer._model, newcomer._optimizer = other, other_optimizer
    with pytest.raises(GossamerError, match=says):
        newcomer._apply(snapshot)
    for param, before in zip(other.parameters(), weights, strict=True):
        assert torch.equal(param, before)
    after = other_optimizer.state_dict()
    assert after["param_groups"] == moments["param_groups"]
    for index, state in moments["state"].items():
        for name, value in state.items():
            assert torch.equal(after["state"][index][name], value)
    train_one_step(other, other_optimizer)  # and it trains on


def _no_download(*args: object, **kwargs: object) -> None:
    raise AssertionError("no state is downloaded")


def test_a_peer_resumed_ahead_of_the_run_keeps_its_own_state_and_step(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Resumed at step 40 while the run's other peer announced step 2, it took that peer's state
    # of step 22 and told the run it joined at 22, while the loop went on at step 40: the run's
    # progress rolled back, and the peer's weights and step disagreeing.
    module = importlib.import_module("gossamer.train.swarm_sync")  # (a function shadows it)
    monkeypatch.setattr(module, "download_from_donors", _no_download)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    weights = [p.detach().clone() for p in model.parameters()]
    averager = FakeAverager()
    averager.states = {"other": ("active", 2)}
    strategy = make(averager, FakeDonor(), join_existing=True)
    strategy.resume_at(40)
    with caplog.at_level(logging.WARNING):
        assert strategy.setup(model, optimizer) is None  # the loop goes on at its own step
    assert averager.events == [("join", 40)]  # a member at its own step, nothing announced
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert "ahead of the run's other peers (the newest announced step 2)" in caplog.text


def test_a_peer_resumed_behind_the_run_takes_its_state_and_step() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    averager = FakeAverager()
    averager.states = {"other": ("active", 2)}
    strategy = make(averager, FakeDonor(), join_existing=True)
    strategy.resume_at(21)  # the run is somewhere in [2, 12): its state at 22 is newer
    donor_peer = _serving(1)[4]
    strategy._wait_for_state = lambda donors, step: donor_peer._snapshot(step)  # type: ignore[method-assign]
    assert strategy.setup(model, optimizer) == 22
    assert averager.events == [("joining", 22), ("join", 22)]


def test_a_peer_that_finds_another_far_ahead_joins_again_at_a_step_past_it() -> None:
    # The peer that resumed ahead keeps its state: the peers behind it take it once they see
    # it at a round, or both trained on, each alone, each waiting for the other at its rounds.
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    averager, donor = FakeAverager(), FakeDonor()
    strategy = make(averager, donor)
    strategy.setup(model, optimizer)
    donor_peer = _serving(1)[4]
    asked: list[int] = []

    def wait_for_state(donors: list[str], step: int) -> StateSnapshot:
        asked.append(step)
        return donor_peer._snapshot(step)

    strategy._wait_for_state = wait_for_state  # type: ignore[method-assign]
    train_one_step(model, optimizer)
    averager.newest_seen_version = 40  # as a round's formation read it
    averager.states = {"ahead": ("active", 40)}
    assert strategy.on_step_end(model, 4) == 60  # 40 + two announcement periods
    assert asked == [60]
    assert averager.events[-2:] == [("joining", 60), ("join", 60)]
    assert strategy.resyncs == 1
    for mine, theirs in zip(model.parameters(), donor_peer._model.parameters(), strict=True):
        assert torch.equal(mine, theirs)

    # A peer a round saw ahead that is gone since (not among the run's live peers) moves nobody.
    averager.newest_seen_version = 90
    averager.states = {"ahead": ("active", 60)}
    assert strategy.on_step_end(model, 60) is None
    assert asked == [60]


def test_a_join_whose_downloads_fail_says_so_rather_than_blame_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The state was published each time, its download too slow: the error said no peer had
    # published it, and to check that the others train.
    module = importlib.import_module("gossamer.train.swarm_sync")

    def too_slow(*args: object, **kwargs: object) -> None:
        raise DeadlineExceededError("fetched at 0.01 MiB/s when the deadline passed, too slow")

    monkeypatch.setattr(module, "download_from_donors", too_slow)
    monkeypatch.setattr(module, "_STATE_WAIT_S", 0.3)
    averager = FakeAverager()
    averager.states = {"other": ("active", 2)}
    announce = averager.announce_joining

    def published(step: int) -> None:  # the other peer reaches the step and publishes it
        announce(step)
        averager.states["other"] = ("active", step)

    averager.announce_joining = published  # type: ignore[method-assign]
    model = nn.Linear(4, 3)
    strategy = make(averager, FakeDonor(), join_existing=True)
    with pytest.raises(GossamerError, match=r"was not downloaded in 3 attempts.*too slow"):
        strategy.setup(model, torch.optim.AdamW(model.parameters(), lr=0.1))
