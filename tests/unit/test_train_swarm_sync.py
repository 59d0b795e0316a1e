"""Elastic sync's wiring: serving a newcomer at its step, rejoining after a missed round."""

from __future__ import annotations

import asyncio
import copy
import importlib
import json
import logging
from collections.abc import Callable
from typing import Any, cast

import pytest
import torch
from state_sync_fakes import FakeBulkNetwork, FakeBulkNode
from torch import nn

from gossamer.core.errors import DeadlineExceededError, GossamerError
from gossamer.obs.metrics import PeerMetrics
from gossamer.store import flatten_optimizer_state
from gossamer.train import swarm_sync
from gossamer.train.averaging import AverageOutcome
from gossamer.train.state_sync import StateDonor, StateSnapshot
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

    def publish(self, snapshot: StateSnapshot, *, max_meta_bytes: int | None = None) -> None:
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
    monkeypatch.setattr(swarm_sync, "_MEMBER_WAIT_BYTES_PER_S", 1.0)  # (seconds per byte)
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
        (_wrong_shaped_moment, "of shape \\(7,\\), this peer's"),
        (lambda s: s.tensors.__setitem__("param.1", torch.zeros(2)), "parameter 1 is"),
        (lambda s: s.tensors.__setitem__("param.1", torch.zeros(3, dtype=torch.int64)), "int64"),
        (lambda s: s.tensors.__setitem__("param.0", s.tensors["param.0"].half()), "float16"),
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


def _set_state(index: int, key: str, value: object) -> Callable[[dict[str, Any]], None]:
    return lambda sd: sd["state"][index].__setitem__(key, value)


def _set_group(key: str, value: object) -> Callable[[dict[str, Any]], None]:
    return lambda sd: sd["param_groups"][0].__setitem__(key, value)


@pytest.mark.parametrize("fresh", [False, True], ids=["trained", "fresh"])
@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (_set_state(0, "exp_avg", torch.tensor(0.5)), r"'exp_avg' of parameter 0 is .* shape \(\)"),
        (_set_state(0, "step", torch.ones(3, 4)), r"'step' of parameter 0 is .* shape \(3, 4\)"),
        (_set_state(1, "exp_avg_sq", torch.zeros(3).half()), "'exp_avg_sq' of parameter 1 is .*16"),
        (_set_state(1, "step", torch.tensor(3)), "'step' of parameter 1 is torch.int64"),
        (_set_state(1, "extra", torch.zeros(3)), r"parameter 1 has keys \['exp_avg', 'exp_avg_s"),
        (lambda sd: sd["state"][0].pop("exp_avg_sq"), "parameter 0 has keys"),
        (lambda sd: sd["state"].__setitem__(5, {"step": torch.tensor(1.0)}), "parameter 5"),
        (_set_group("betas", [0.9]), r"param_groups\[0\]\['betas'\] is a list"),
        (_set_group("betas", (0.9,)), r"param_groups\[0\]\['betas'\] has 1 items"),
        (_set_group("betas", (0.9, "0.999")), r"param_groups\[0\]\['betas'\]\[1\] is a str"),
        (_set_group("lr", "0.1"), r"param_groups\[0\]\['lr'\] is a str"),
        (_set_group("amsgrad", 1), r"param_groups\[0\]\['amsgrad'\] is a int"),
        (_set_group("eps", True), r"param_groups\[0\]\['eps'\] is a bool"),
        (_set_group("schedule", 1), r"param_groups\[0\] has keys"),
        (lambda sd: sd["param_groups"][0]["params"].pop(), r"param_groups\[0\] holds other"),
    ],
)
def test_optimizer_state_that_would_break_training_is_refused_before_anything_is_taken(
    damage: Callable[[dict[str, Any]], object], says: str, fresh: bool
) -> None:
    # torch's load_state_dict took each of these (casting moments to the weights' dtype), and
    # the first step failed, or trained on with a hyperparameter of another shape.
    model, optimizer, *_ = _serving(10)
    saved = copy.deepcopy(optimizer.state_dict())
    damage(saved)
    optimizer_tensors, optimizer_meta = flatten_optimizer_state(saved)
    snapshot = StateSnapshot(
        version=10,
        tensors={f"param.{i}": p.detach() for i, p in enumerate(model.parameters())}
        | {f"optim.{name}": tensor for name, tensor in optimizer_tensors.items()},
        meta={"step": 10, "optimizer": optimizer_meta},
    )
    torch.manual_seed(1)
    other = nn.Linear(4, 3)
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=0.1)
    if not fresh:  # a peer joining again holds state; a newcomer's optimizer has none yet
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
    assert after["state"].keys() == moments["state"].keys()
    for index, state in moments["state"].items():
        for name, value in state.items():
            assert torch.equal(after["state"][index][name], value)
    train_one_step(other, other_optimizer)  # and it trains on


def test_the_undamaged_state_is_taken_by_a_newcomer_whose_optimizer_has_no_state_yet() -> None:
    model, optimizer, *_ = _serving(10)
    torch.manual_seed(1)
    other = nn.Linear(4, 3)
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=0.1)
    newcomer = make(FakeAverager(), FakeDonor(), join_existing=True)
    newcomer._model, newcomer._optimizer = other, other_optimizer
    newcomer._apply(_published_state())
    for mine, theirs in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(mine, theirs)
        for name, value in optimizer.state[mine].items():
            assert torch.equal(value, other_optimizer.state[theirs][name])


class _AdamWOfTwoArguments(torch.optim.AdamW):
    """An optimizer whose class cannot be built from param groups alone."""

    def __init__(self, params: Any, marker: str) -> None:
        super().__init__(params, lr=0.1)


def test_state_for_an_optimizer_that_cannot_be_built_again_is_checked_as_elementwise() -> None:
    # Where a fresh optimizer's state cannot be read off a stand-in, every tensor but 'step'
    # (0-dim) must be of its parameter's shape and dtype; ints and floats are both numbers.
    model, optimizer, *_ = _serving(10)
    for damage, says in [
        (_set_state(0, "exp_avg", torch.tensor(0.5)), r"'exp_avg' of parameter 0 is .* \(\)"),
        (_set_state(0, "step", torch.ones(3, 4)), r"'step' of parameter 0 is .* \(3, 4\)"),
        (_set_state(1, "exp_avg", torch.zeros(3).half()), "'exp_avg' of parameter 1 is .*16"),
        (lambda sd: None, ""),
    ]:
        saved = copy.deepcopy(optimizer.state_dict())
        damage(saved)
        saved["param_groups"][0]["lr"] = 1  # an int where this peer's is a float: fine
        optimizer_tensors, optimizer_meta = flatten_optimizer_state(saved)
        snapshot = StateSnapshot(
            version=10,
            tensors={f"param.{i}": p.detach() for i, p in enumerate(model.parameters())}
            | {f"optim.{name}": tensor for name, tensor in optimizer_tensors.items()},
            meta={"step": 10, "optimizer": optimizer_meta},
        )
        other = nn.Linear(4, 3)
        newcomer = make(FakeAverager(), FakeDonor(), join_existing=True)
        newcomer._model = other
        newcomer._optimizer = _AdamWOfTwoArguments(other.parameters(), "x")
        if not says:
            newcomer._apply(snapshot)
            assert torch.equal(other.weight, model.weight)
            continue
        with pytest.raises(GossamerError, match=says):
            newcomer._apply(snapshot)
        assert not newcomer._optimizer.state


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


class _FakeBulkNodeThread:
    """A node thread whose node is an in-memory one: ``run`` runs on a loop of its own."""

    def __init__(self, node: FakeBulkNode) -> None:
        self.node = node

    def run(self, fn: Callable[[Any], Any], *, timeout_s: float) -> Any:
        async def bounded() -> Any:
            async with asyncio.timeout(timeout_s):
                return await fn(self.node)

        # (not asyncio.run: its SIGINT handling reprs the main task, result and all: 15 s
        # for a snapshot of 8,000 tensors)
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(bounded())
        finally:
            loop.close()


def _many_tensors() -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model of 8,000 tiny parameter tensors, trained one step."""
    model = nn.ParameterList([nn.Parameter(torch.randn(2)) for _ in range(8000)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    torch.stack([param.square().sum() for param in model]).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def test_the_state_of_a_model_of_8000_parameter_tensors_is_transferred() -> None:
    # Its meta (the optimizer's tree, ~150 bytes per tensor) passed the fixed 1 MiB that
    # newcomers accepted: no newcomer could take the state of a model of over ~7,000 tensors.
    torch.manual_seed(0)
    model, optimizer = _many_tensors()
    network = FakeBulkNetwork()
    averager = FakeAverager()
    averager.states = {"newcomer": ("active", 20)}  # it takes the state at once
    donor = make(averager, cast(Any, StateDonor(network.add("donor"), chunk_bytes=1 << 16)))
    donor._model, donor._optimizer = model, optimizer
    donor._serve(["newcomer"], 20)

    torch.manual_seed(1)
    other, other_optimizer = _many_tensors()
    newcomer = SwarmSyncStrategy(
        cast(Any, FakeAverager()),
        cast(Any, FakeAverager()),
        cast(Any, _FakeBulkNodeThread(network.add("newcomer"))),
        cast(Any, FakeDonor()),
        join_existing=True,
        run_id="r",
    )
    newcomer._model, newcomer._optimizer = other, other_optimizer
    snapshot = newcomer._download(["donor"], 20)
    assert snapshot is not None, newcomer._last_download_error
    assert len(json.dumps(snapshot.meta)) > 1 << 20
    newcomer._apply(snapshot)
    for mine, theirs in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(mine, theirs)
        for name, value in optimizer.state[mine].items():
            assert torch.equal(value, other_optimizer.state[theirs][name])


def test_a_donor_refuses_to_publish_a_meta_its_newcomers_would_refuse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(swarm_sync, "_META_BYTES_PER_TENSOR", 0)  # 1 MiB for any model
    model, optimizer = _many_tensors()
    averager = FakeAverager()
    averager.states = {"newcomer": ("active", 20)}
    state_donor = StateDonor(FakeBulkNetwork().add("donor"))
    donor = make(averager, cast(Any, state_donor))
    donor._model, donor._optimizer = model, optimizer
    with pytest.raises(ValueError, match=r"meta of \d+ bytes is larger than its receivers accept"):
        donor._serve(["newcomer"], 20)
    assert state_donor.version is None  # nothing published


def test_members_wait_for_a_newcomer_at_most_its_state_at_a_megabyte_a_second() -> None:
    # At the download's own floor (32 KiB/s) every member stopped training for up to 54
    # minutes for a newcomer taking a 100 MB state.
    wait_s = (
        swarm_sync._MEMBER_WAIT_S
        + swarm_sync._DOWNLOAD_TIMEOUT_S
        + 100e6 / swarm_sync._MEMBER_WAIT_BYTES_PER_S
    )
    assert wait_s < 300.0
    assert swarm_sync._download_time_bound_s(int(100e6)) > 3000.0  # (the newcomer's own)
