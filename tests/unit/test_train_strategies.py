"""DiLoCo and synchronous data parallel among peers that are threads of one process."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import threading
import time
from pathlib import Path

import pytest
import torch
from train_listeners import CrashAfterCheckpoint

from gossamer.core.config import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SwarmConfig,
    TrainConfig,
)
from gossamer.core.errors import (
    AveragingStalledError,
    DeadlineExceededError,
    TrainingDivergedError,
)
from gossamer.core.hashing import sha256_state
from gossamer.models.gpt import GPT
from gossamer.train import Trainer, TrainResult
from gossamer.train.averaging import AverageOutcome, InProcessGroup, PendingRound, TensorAverager
from gossamer.train.checkpointing import RunState, estimate_checkpoint_num_bytes
from gossamer.train.diloco import DiLoCoStrategy
from gossamer.train.diloco_config import DiLoCoConfig
from gossamer.train.diloco_outer_step import MAX_FAILED_ATTEMPTS, averaged_buffers
from gossamer.train.strategy import TrainingStrategy
from gossamer.train.sync import SyncStrategy
from gossamer.train.thread_swarm import run_thread_swarm

NUM_PEERS = 3


def _config(tmp_path: Path, peer: int, max_steps: int) -> RunConfig:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("def f(x):\n    return x + 1\n" * 300 + "import sys\n" * 200)
    return RunConfig(
        model=ModelConfig(num_layers=1, num_heads=2, width=32, context=32),
        data=DataConfig(source="text", path=str(corpus)),
        optim=OptimConfig(lr=1e-2, warmup_steps=2),
        train=TrainConfig(max_steps=max_steps, batch_size=4, eval_every=0, eval_batches=2),
        checkpoint=CheckpointConfig(directory=str(tmp_path / f"peer{peer}"), every_steps=0),
    )


def _run_peers(
    tmp_path: Path, strategies: list[TrainingStrategy], max_steps: int
) -> tuple[list[Trainer], list[TrainResult]]:
    swarm = run_thread_swarm(
        _config(tmp_path, 0, max_steps), strategies, checkpoint_root=tmp_path, timeout_s=120
    )
    return swarm.trainers, swarm.results


@pytest.mark.parametrize(
    ("train_while_forming", "train_while_averaging"),
    [(False, False), (True, False), (True, True)],
    ids=["blocking", "forming", "forming-and-averaging"],
)
def test_diloco_peers_agree_on_global_weights_and_learn(
    tmp_path: Path, train_while_forming: bool, train_while_averaging: bool
) -> None:
    group = InProcessGroup(NUM_PEERS)
    config = DiLoCoConfig(
        inner_steps=5,
        train_while_forming=train_while_forming,
        train_while_averaging=train_while_averaging,
    )
    strategies = [DiLoCoStrategy(config, group.averager()) for _ in range(NUM_PEERS)]
    trainers, results = _run_peers(tmp_path, list(strategies), max_steps=20)
    assert {s.outer_step for s in strategies} == {4}
    assert len({s.global_weights_hash() for s in strategies}) == 1
    # After an outer step every local model restarts from the global weights.
    assert len({sha256_state(t.model.state_dict()) for t in trainers}) == 1
    assert all(r.val_loss_after < r.val_loss_before for r in results)
    num_params = sum(p.numel() for p in trainers[0].model.parameters())
    expected = 4 * int(2 * (NUM_PEERS - 1) / NUM_PEERS * num_params * 4)
    assert strategies[0].bytes_sent == expected


@pytest.mark.parametrize("max_steps", [20, 22])  # the budget a multiple of H, and not
def test_overlapped_diloco_peers_end_on_the_same_weights_and_learn(
    tmp_path: Path, max_steps: int
) -> None:
    group = InProcessGroup(NUM_PEERS)
    strategies = [
        DiLoCoStrategy(DiLoCoConfig(inner_steps=5, overlap=True), group.averager())
        for _ in range(NUM_PEERS)
    ]
    trainers, results = _run_peers(tmp_path, list(strategies), max_steps=max_steps)
    # Four rounds in the background, each applied a round late and the last one at the end;
    # steps past the last multiple of H go through one more round.
    assert {s.outer_step for s in strategies} == {4 if max_steps == 20 else 5}
    assert not any(s.round_in_flight for s in strategies)
    assert len({s.global_weights_hash() for s in strategies}) == 1
    assert len({sha256_state(t.model.state_dict()) for t in trainers}) == 1
    for trainer, strategy in zip(trainers, strategies, strict=True):
        for param, tensor in zip(trainer.model.parameters(), strategy._global, strict=True):
            assert torch.equal(param.detach(), tensor.detach())
    assert all(r.val_loss_after < r.val_loss_before for r in results)


def test_overlapped_diloco_keeps_its_own_progress_until_the_average_arrives() -> None:
    group = InProcessGroup(1)
    strategy = DiLoCoStrategy(
        DiLoCoConfig(inner_steps=2, outer_lr=1.0, outer_momentum=0.0, overlap=True),
        group.averager(),
    )
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))

    def inner_step(delta: float, step: int) -> None:
        with torch.no_grad():
            model.weight.sub_(delta)
        strategy.on_step_end(model, step)

    inner_step(0.1, 0)
    inner_step(0.1, 1)  # boundary: progress 0.2 in flight, global still 1.0
    assert torch.allclose(model.weight, torch.full((1, 2), 0.8))
    assert strategy.outer_step == 0
    inner_step(0.1, 2)
    inner_step(0.1, 3)  # boundary: the first round lands (global 0.8), the second launches
    assert strategy.outer_step == 1
    assert torch.allclose(strategy._global[0], torch.full((1, 2), 0.8))
    assert torch.allclose(model.weight, torch.full((1, 2), 0.6))  # 0.8 minus its own 0.2
    assert strategy.finish(model, 4)
    assert strategy.outer_step == 2
    assert torch.allclose(model.weight, torch.full((1, 2), 0.6))
    assert torch.equal(model.weight.detach(), strategy._global[0].detach())
    strategy.close()


def _outer_steps(config: DiLoCoConfig, deltas: list[float]) -> list[float]:
    """One peer with a one-weight model (all 1.0) and H = 1: each inner step moves the weight by
    the next delta, each outer step applies it; the global weight after every outer step."""
    strategy = DiLoCoStrategy(config, InProcessGroup(1).averager())
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    weights = []
    for step, delta in enumerate(deltas):
        with torch.no_grad():
            model.weight.sub_(delta)
        strategy.on_step_end(model, step)
        weights.append(float(strategy._global[0].detach()[0, 0]))
    return weights


def test_outer_momentum_warms_up_along_nesterovs_sequence() -> None:
    strategy = DiLoCoStrategy(DiLoCoConfig(), InProcessGroup(1).averager())
    assert [strategy.outer_momentum_at(t) for t in range(4)] == pytest.approx(
        [0, 1 / 4, 2 / 5, 1 / 2]
    )
    assert strategy.outer_momentum_at(27) == pytest.approx(0.9)
    assert strategy.outer_momentum_at(1000) == pytest.approx(0.9)  # capped at outer_momentum
    paper = DiLoCoStrategy(DiLoCoConfig(outer_momentum_warmup=False), InProcessGroup(1).averager())
    assert {paper.outer_momentum_at(t) for t in range(30)} == {0.9}


def test_first_outer_steps_do_not_replay_the_first_pseudo_gradient_at_full_momentum() -> None:
    config = DiLoCoConfig(inner_steps=1, outer_lr=0.5, outer_momentum=0.9)
    # Momentum 0, then 1/4, then 2/5 (torch's Nesterov form: buffer = m * buffer + g, step
    # g + m * buffer); with none, the first pseudo-gradient leaves no buffer behind.
    expected = [1 - 0.5 * 0.1, 0.95 - 0.5 * (0.1 + 0.25 * 0.1), 0.8875 - 0.5 * (0.1 + 0.4 * 0.14)]
    assert _outer_steps(config, [0.1, 0.1, 0.1]) == pytest.approx(expected)
    # The paper's constant momentum, from the first step: 0.1 * (1 + 0.9) at once.
    paper = dataclasses.replace(config, outer_momentum_warmup=False)
    assert _outer_steps(paper, [0.1])[0] == pytest.approx(1 - 0.5 * 0.19)


class _LinearPeer:
    """A one-weight model (all 1.0) under DiLoCo with lr 1 and no momentum, so the global
    weights move by exactly the (weighted) average progress. Overlapped unless told otherwise."""

    def __init__(
        self,
        group: InProcessGroup,
        *,
        inner_steps: int = 2,
        train_while_forming: bool = False,
        train_while_averaging: bool = False,
        outer_lr: float = 1.0,
        overlap: bool | None = None,
        averager: TensorAverager | None = None,
    ) -> None:
        self.strategy = DiLoCoStrategy(
            DiLoCoConfig(
                inner_steps=inner_steps,
                outer_lr=outer_lr,
                outer_momentum=0.0,
                overlap=not train_while_forming if overlap is None else overlap,
                train_while_forming=train_while_forming,
                train_while_averaging=train_while_averaging,
            ),
            averager or group.averager(),
        )
        self.model = torch.nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.model.weight.fill_(1.0)
        self.strategy.setup(self.model, torch.optim.SGD(self.model.parameters(), lr=0.1))

    def step(self, delta: float, step: int) -> None:
        with torch.no_grad():
            self.model.weight.sub_(delta)
        self.strategy.on_step_end(self.model, step)

    def steps(self, delta: float, steps: range) -> None:
        for step in steps:
            self.step(delta, step)

    def wait_for_round(self) -> None:
        inflight = self.strategy._inflight
        assert inflight is not None
        concurrent.futures.wait([inflight], timeout=10)

    def wait_until_averaged(self) -> None:
        averaging = self.strategy._averaging
        assert averaging is not None
        concurrent.futures.wait([averaging], timeout=10)

    def wait_until_formed(self) -> None:
        forming = self.strategy._forming
        assert forming is not None
        deadline = time.monotonic() + 10
        while not forming.ready():
            assert time.monotonic() < deadline, "the round never formed"
            time.sleep(0.01)

    def weight(self) -> float:
        return float(self.model.weight.detach()[0, 0])

    def global_weight(self) -> float:
        return float(self.strategy._global[0].detach()[0, 0])


def _finish_together(peers: list[_LinearPeer], step: int) -> None:
    threads = [threading.Thread(target=p.strategy.finish, args=(p.model, step)) for p in peers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    for peer in peers:
        peer.strategy.close()


def test_overlapped_round_lands_as_soon_as_it_is_done_and_moves_the_model_by_the_error() -> None:
    group = InProcessGroup(2)
    a, b = _LinearPeer(group), _LinearPeer(group)
    for step in (0, 1):  # boundary at step 1: progress 0.2 (a) and 0.4 (b), average 0.3
        a.step(0.1, step)
        b.step(0.2, step)
    assert a.weight() == pytest.approx(0.8)  # each restarts from its own estimate
    assert b.weight() == pytest.approx(0.6)
    a.wait_for_round()
    b.wait_for_round()
    a.step(0.1, 2)  # not a boundary, but the round is done: it lands now
    b.step(0.2, 2)
    for peer in (a, b):
        assert peer.strategy.outer_step == 1
        assert not peer.strategy.round_in_flight
        assert float(peer.strategy._global[0].detach()[0, 0]) == pytest.approx(0.7)
    # Moved by the estimate's error: a by 0.7 - 0.8, b by 0.7 - 0.6, after this step's own.
    assert a.weight() == pytest.approx(0.8 - 0.1 - 0.1)
    assert b.weight() == pytest.approx(0.6 - 0.2 + 0.1)
    a.step(0.1, 3)  # boundary: progress from the real global weights, 0.2 and 0.4 again
    b.step(0.2, 3)
    assert a.weight() == pytest.approx(0.7 - 0.2)
    assert b.weight() == pytest.approx(0.7 - 0.4)
    _finish_together([a, b], 4)
    for peer in (a, b):
        assert peer.strategy.outer_step == 2
        assert peer.weight() == pytest.approx(0.7 - 0.3)


def test_overlapped_round_not_done_waits_for_the_boundary() -> None:
    group = InProcessGroup(2)
    a, b = _LinearPeer(group), _LinearPeer(group)
    a.step(0.1, 0)
    a.step(0.1, 1)  # a's round is launched; b has not come to it
    a.step(0.1, 2)
    assert a.strategy.outer_step == 0
    assert a.strategy.round_in_flight
    assert a.weight() == pytest.approx(0.7)  # its own steps only
    b.step(0.2, 0)
    b.step(0.2, 1)
    a.step(0.1, 3)  # boundary: waits for the round, applies it, launches the next
    assert a.strategy.outer_step == 1
    assert float(a.strategy._global[0].detach()[0, 0]) == pytest.approx(0.7)
    # Progress 0.2 since a restarted at 0.8; the next estimate is the real 0.7 minus it.
    assert a.weight() == pytest.approx(0.5)
    b.wait_for_round()
    b.step(0.2, 2)  # b's round (the same one) lands early on b
    assert b.strategy.outer_step == 1
    b.step(0.2, 3)
    _finish_together([a, b], 4)
    assert a.strategy.global_weights_hash() == b.strategy.global_weights_hash()


def _forming_peer(group: InProcessGroup) -> _LinearPeer:
    """A linear peer that trains while a round's group forms, H = 4."""
    return _LinearPeer(group, inner_steps=4, train_while_forming=True)


def test_a_peer_trains_while_the_group_forms_and_counts_by_the_steps_behind_it() -> None:
    group = InProcessGroup(2)
    a, b = _forming_peer(group), _forming_peer(group)
    a.steps(0.1, range(4))  # the boundary at step 3 begins round 0; b is not there
    a.steps(0.1, range(4, 6))  # a trains on meanwhile
    assert a.strategy.outer_step == 0
    assert a.weight() == pytest.approx(0.4)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # b's boundary completes the group; b averages at its next step end, a at its own.
        b_done = pool.submit(b.steps, 0.2, range(5))
        a.wait_until_formed()
        a.steps(0.1, range(6, 7))
        b_done.result(timeout=10)
    # a: 7 steps, progress 0.7; b: 5 steps, progress 1.0; weighed 7 to 5.
    first = 1 - (7 * 0.7 + 5 * 1.0) / 12
    for peer in (a, b):
        assert peer.strategy.outer_step == 1
        assert peer.global_weight() == pytest.approx(first)
        assert peer.weight() == pytest.approx(first)  # restarted from the new global weights
    a.steps(0.1, range(7, 8))  # boundary: round 1 begins; b comes at its own boundary
    b.steps(0.2, range(5, 8))
    _finish_together([a, b], 8)
    second = first - (1 * 0.1 + 3 * 0.6) / 4  # a: 1 step since round 0, b: 3
    for peer in (a, b):
        assert peer.strategy.outer_step == 2
        assert peer.weight() == pytest.approx(second)


def test_a_round_not_formed_by_the_next_boundary_is_waited_for_there() -> None:
    group = InProcessGroup(2)
    a, b = _forming_peer(group), _forming_peer(group)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        a_done = pool.submit(a.steps, 0.1, range(8))  # waits at step 7 for b's round 0
        time.sleep(0.2)
        assert not a_done.done()
        b.steps(0.2, range(5))  # b begins round 0 at step 3 and averages at step 4
        a_done.result(timeout=10)
    first = 1 - (8 * 0.8 + 5 * 1.0) / 13
    assert a.strategy.outer_step == b.strategy.outer_step == 1
    assert a.global_weight() == pytest.approx(first)
    assert a.weight() == pytest.approx(first)  # round 1 began at step 7: no steps in it yet
    b.steps(0.2, range(5, 8))
    _finish_together([a, b], 8)
    # a's part in round 1 has no steps and no weight: the average is b's progress alone.
    for peer in (a, b):
        assert peer.strategy.outer_step == 2
        assert peer.weight() == pytest.approx(first - 0.6)


def test_a_last_round_with_nothing_in_it_leaves_the_weights_where_they_are() -> None:
    """Forming, the round of the last boundary can take in every step (it formed after the
    last one); the round after the last step then carries nothing, and must not move the
    weights by the outer momentum alone."""
    config = DiLoCoConfig(
        inner_steps=4,
        outer_lr=1.0,
        outer_momentum=0.9,
        outer_momentum_warmup=False,
        train_while_forming=True,
    )
    strategy = DiLoCoStrategy(config, InProcessGroup(1).averager())  # alone: formed at once
    model = torch.nn.Linear(2, 1, bias=False)
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for step in range(9):  # boundaries at 3 and 7; each round averaged a step later
        with torch.no_grad():
            model.weight.sub_(0.1)
        strategy.on_step_end(model, step)
    assert strategy.outer_step == 2
    before = strategy._global[0].detach().clone()
    assert strategy.finish(model, 9)  # 9 steps: not a multiple of H, so one more round
    assert strategy.outer_step == 3
    assert torch.equal(strategy._global[0].detach(), before)
    assert torch.equal(model.weight.detach(), before)


def _averaging_peer(group: InProcessGroup, outer_lr: float = 1.0) -> _LinearPeer:
    """A linear peer that trains while a round's group forms and while it averages, H = 4."""
    return _LinearPeer(
        group,
        inner_steps=4,
        train_while_forming=True,
        train_while_averaging=True,
        outer_lr=outer_lr,
    )


def test_the_steps_taken_while_averaging_start_from_an_eager_estimate() -> None:
    group = InProcessGroup(2)
    a, b = _averaging_peer(group, outer_lr=0.5), _averaging_peer(group, outer_lr=0.5)
    a.steps(0.1, range(4))
    b.steps(0.2, range(4))
    a.step(0.1, 4)  # hands 0.5 over; restarts from 1 - 0.5 * 0.5, its own outer step
    assert a.weight() == pytest.approx(0.75, abs=1e-6)
    b.step(0.2, 4)  # hands 1.0 over; restarts from 1 - 0.5 * 1.0
    assert b.weight() == pytest.approx(0.5, abs=1e-6)
    a.wait_until_averaged()
    b.wait_until_averaged()
    a.step(0.1, 5)  # lands: the average is 0.75, the global weights 1 - 0.5 * 0.75
    b.step(0.2, 5)
    for peer, own in ((a, 0.1), (b, 0.2)):
        assert peer.global_weight() == pytest.approx(0.625, abs=1e-6)
        assert peer.weight() == pytest.approx(0.625 - own, abs=1e-6)  # the step since is kept
    _finish_together([a, b], 6)


def test_a_peer_trains_while_the_round_averages_and_keeps_those_steps() -> None:
    group = InProcessGroup(2)
    a, b = _averaging_peer(group), _averaging_peer(group)
    a.steps(0.1, range(4))  # both begin round 0 at the boundary of step 3
    b.steps(0.2, range(4))
    a.step(0.1, 4)  # formed: a hands its pseudo-gradient (0.5, 5 steps) over and trains on
    assert a.strategy._averaging is not None
    a.step(0.1, 5)  # b has not contributed: the average is not there, a goes on
    assert a.strategy.outer_step == 0
    assert a.weight() == pytest.approx(0.4, abs=1e-6)
    b.step(0.2, 4)  # b's pseudo-gradient: 1.0, 5 steps; the average is 0.75
    a.wait_until_averaged()
    b.wait_until_averaged()
    a.step(0.1, 6)  # lands: the new global weights plus a's two steps since it handed over
    b.step(0.2, 5)  # lands: plus b's one step
    for peer in (a, b):
        assert peer.strategy.outer_step == 1
        assert peer.strategy._averaging is None
        assert peer.global_weight() == pytest.approx(0.25, abs=1e-6)
    assert a.weight() == pytest.approx(0.25 - 0.2, abs=1e-6)
    assert b.weight() == pytest.approx(0.25 - 0.2, abs=1e-6)
    a.step(0.1, 7)  # boundary: round 1 begins
    b.steps(0.2, range(6, 8))
    _finish_together([a, b], 8)
    # Round 1 holds what each did since handing round 0 over: a 0.3 and b 0.6, 3 steps each.
    for peer in (a, b):
        assert peer.strategy.outer_step == 2
        assert peer.weight() == pytest.approx(0.25 - 0.45, abs=1e-6)
        assert peer.global_weight() == pytest.approx(0.25 - 0.45, abs=1e-6)


def test_a_boundary_waits_for_a_round_still_averaging() -> None:
    group = InProcessGroup(2)
    a, b = _averaging_peer(group), _averaging_peer(group)
    a.steps(0.1, range(4))
    b.steps(0.2, range(4))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        a_done = pool.submit(a.steps, 0.1, range(4, 8))  # hands round 0 over at step 4
        time.sleep(0.3)
        assert not a_done.done()  # held at the boundary of step 7: b has not contributed
        assert a.strategy.outer_step == 0
        assert a.strategy._forming is None  # round 1 does not begin while round 0 averages
        b.step(0.2, 4)
        a_done.result(timeout=10)
    assert a.strategy.outer_step == 1
    assert a.strategy.round_began_at == 7
    assert a.weight() == pytest.approx(0.25 - 0.3, abs=1e-6)  # its steps 5 to 7 kept
    b.wait_until_averaged()
    b.steps(0.2, range(5, 8))
    _finish_together([a, b], 8)
    assert a.strategy.global_weights_hash() == b.strategy.global_weights_hash()
    assert a.weight() == b.weight() == pytest.approx(0.25 - 0.45, abs=1e-6)


def test_a_checkpoint_taken_while_a_round_averages_restores_onto_the_global_weights() -> None:
    group = InProcessGroup(2, timeout_s=1.0)
    a = _averaging_peer(group, outer_lr=0.5)
    a.steps(0.1, range(4))
    group.averager().begin("gossamer/outer/0")  # a second peer arrives and never contributes
    a.step(0.1, 4)  # hands 0.5 over, restarts from its estimate 0.75
    a.step(0.1, 5)
    assert a.strategy._averaging is not None
    tensors, meta = a.strategy.state_for_checkpoint()
    model_state = {k: v.clone() for k, v in a.model.state_dict().items()}
    restored = _averaging_peer(InProcessGroup(1), outer_lr=0.5)
    restored.model.load_state_dict(model_state)
    restored.strategy.load_checkpoint_state(tensors, meta)
    # Back on the global weights (1.0, the round never landed) with the step taken since.
    assert restored.weight() == pytest.approx(1.0 - 0.1, abs=1e-6)
    assert restored.global_weight() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(DeadlineExceededError):
        a.strategy.finish(a.model, 6)
    a.strategy.close()
    restored.strategy.close()


class _ResyncingStrategy(DiLoCoStrategy):
    """Takes "the swarm's state" as of the step ``resync_to`` says: before every round
    (``at_boundary``), or when a round ends (as after a missed round)."""

    resync_to: int | None = None
    at_boundary = True

    def _catch_up_before_round(self) -> int | None:
        return self.resync_to if self.at_boundary else None

    def _round(self, step: int, forming: PendingRound | None) -> int | None:
        super()._round(step, forming)
        return None if self.at_boundary else self.resync_to


def _resyncing(
    resync_to: int | None, *, at_boundary: bool
) -> tuple[_ResyncingStrategy, torch.nn.Module]:
    strategy = _ResyncingStrategy(
        DiLoCoConfig(inner_steps=4, train_while_forming=True), InProcessGroup(1).averager()
    )
    model = torch.nn.Linear(2, 1, bias=False)
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    strategy.resync_to = resync_to
    strategy.at_boundary = at_boundary
    return strategy, model


@pytest.mark.parametrize(("resync_to", "begins"), [(None, True), (0, True), (4, False), (6, False)])
def test_a_peer_that_took_state_of_a_later_step_begins_its_round_at_the_next_boundary(
    resync_to: int | None, begins: bool
) -> None:
    """State taken from others is that of the step after the boundary where they began the
    round that made it; a peer must begin its next round where they begin theirs, H steps
    later, or it would be a boundary ahead of them for the rest of the run."""
    strategy, model = _resyncing(resync_to, at_boundary=True)
    for step in range(4):  # the boundary is step 3
        continue_from = strategy.on_step_end(model, step)
    assert continue_from == resync_to
    assert (strategy._forming is not None) == begins
    assert strategy.round_began_at == (3 if begins else -1)


@pytest.mark.parametrize(("state_step", "begins"), [(4, True), (8, False)])
def test_a_peer_that_took_state_after_a_missed_round_begins_where_the_others_began(
    state_step: int, begins: bool
) -> None:
    """This peer's round of the boundary at step 7 was missed; the state it takes comes from
    the others' round of the boundary at step 3 (state of step 4: they were late), so they
    began the next round at step 7, which this peer has passed: it begins it at once, as of
    step 7. State of step 8 (their round of step 7): the next round is at step 11."""
    strategy, model = _resyncing(None, at_boundary=False)
    for step in range(8):  # rounds begin at steps 3 and 7 (alone: each formed a step later)
        strategy.on_step_end(model, step)
    assert strategy._forming is not None
    assert strategy.round_began_at == 7
    strategy.resync_to = state_step
    assert strategy.on_step_end(model, 8) == state_step  # the round ends: state taken
    assert (strategy._forming is not None) == begins
    if begins:
        assert strategy.round_began_at == 7


class _FaultyAverage:
    """An in-process averager whose average of round ``key`` comes back NaN, as where a peer
    sent NaN as it was (each peer withholds its own; a peer of another build, a bug, a hostile
    peer does not): every peer of the round receives that same average."""

    def __init__(self, group: InProcessGroup, key: str, *, every_attempt: bool = False) -> None:
        self.inner = group.averager()
        self.key = key
        self.every_attempt = every_attempt
        """Poison every attempt of ``key``'s round too (``key#1``, ``key#2``...)."""
        self.keys: list[str] = []

    def poisoned(self, outcome: AverageOutcome, round_key: str) -> AverageOutcome:
        self.keys.append(round_key)
        again = self.every_attempt and round_key.startswith(f"{self.key}#")
        if round_key != self.key and not again:
            return outcome
        nan = [torch.full_like(t, math.nan) for t in outcome.tensors]
        return dataclasses.replace(outcome, tensors=nan)

    def average(
        self, tensors: list[torch.Tensor], *, round_key: str, weight: float
    ) -> AverageOutcome:
        outcome = self.inner.average(tensors, round_key=round_key, weight=weight)
        return self.poisoned(outcome, round_key)

    def begin(self, round_key: str) -> PendingRound:
        return _FaultyPending(self, round_key, self.inner.begin(round_key))


class _FaultyPending:
    def __init__(self, faulty: _FaultyAverage, round_key: str, pending: PendingRound) -> None:
        self.faulty = faulty
        self.round_key = round_key
        self.pending = pending

    def ready(self) -> bool:
        return self.pending.ready()

    def average(self, tensors: list[torch.Tensor], *, weight: float) -> AverageOutcome:
        return self.faulty.poisoned(self.pending.average(tensors, weight=weight), self.round_key)

    def cancel(self) -> None:
        self.pending.cancel()


def _faulty_peers(
    key: str, *, every_attempt: bool = False, **options: bool
) -> list[tuple[_LinearPeer, _FaultyAverage]]:
    group = InProcessGroup(2, timeout_s=10.0)
    made = []
    for _ in range(2):
        faulty = _FaultyAverage(group, key, every_attempt=every_attempt)
        made.append((_LinearPeer(group, averager=faulty, **options), faulty))
    return made


def test_an_average_of_nan_is_not_applied_and_its_progress_goes_into_the_next_attempt() -> None:
    # Each peer checked only what it sent: one peer sending NaN as it was turned every peer's
    # global weights to NaN, and each died of a "diverged" loss blaming the learning rate.
    (a, a_rounds), (b, b_rounds) = _faulty_peers("gossamer/outer/1", overlap=False)

    def train(peer: _LinearPeer, delta: float) -> None:
        peer.steps(delta, range(6))  # boundaries 1, 3 (NaN) and 5
        peer.strategy.finish(peer.model, 6)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done = [pool.submit(train, a, 0.1), pool.submit(train, b, 0.2)]
        for future in done:
            future.result(timeout=20)
    for peer, rounds in ((a, a_rounds), (b, b_rounds)):
        # The failed attempt's key is never formed again (across machines it stays closed).
        assert rounds.keys == ["gossamer/outer/0", "gossamer/outer/1", "gossamer/outer/1#1"]
        assert peer.strategy.outer_step == 2
        # 0.15 a step on average: steps 0-1 in outer/0, steps 2-5 in outer/1#1.
        assert peer.global_weight() == pytest.approx(1.0 - 0.9)
        assert peer.weight() == pytest.approx(1.0 - 0.9)
        peer.strategy.close()


def test_a_round_failing_on_every_member_attempt_after_attempt_raises_naming_it() -> None:
    # A cause that stays (a peer sending NaN over the torch backend) failed every attempt on
    # every member: the global weights never moved, each peer trained on alone, and finish()
    # put every local model back on the stale global weights, exiting 0.
    (a, a_rounds), (b, _) = _faulty_peers("gossamer/outer/1", every_attempt=True, overlap=False)

    def train(peer: _LinearPeer, delta: float) -> None:
        peer.steps(delta, range(6))  # boundaries 1, 3 (outer/1, NaN) and 5 (outer/1#1, NaN)
        peer.strategy.finish(peer.model, 6)  # outer/1#2, NaN: the third attempt in a row

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done = [pool.submit(train, a, 0.1), pool.submit(train, b, 0.2)]
        for future in done:
            with pytest.raises(AveragingStalledError, match=r"round gossamer/outer/1#2 \("):
                future.result(timeout=20)
    assert MAX_FAILED_ATTEMPTS == 3  # (the three attempts above)
    assert a_rounds.keys == [
        "gossamer/outer/0",
        "gossamer/outer/1",
        "gossamer/outer/1#1",
        "gossamer/outer/1#2",
    ]
    for peer in (a, b):
        assert peer.strategy.outer_step == 1
        peer.strategy.close()


def test_an_average_of_nan_in_the_background_gives_its_progress_back_to_the_local_model() -> None:
    # Overlapped: the local model restarted from an eager estimate of the round's average.
    (a, a_rounds), (b, b_rounds) = _faulty_peers("gossamer/outer/1")
    for step in range(4):  # boundaries 1 (outer/0) and 3 (outer/1, NaN)
        a.step(0.1, step)
        b.step(0.2, step)
        if step == 1:
            a.wait_for_round()
            b.wait_for_round()
    a.wait_for_round()
    b.wait_for_round()
    a.step(0.1, 4)  # outer/1 lands NaN: not applied, its progress back in the local model
    b.step(0.2, 4)
    for peer, own in ((a, 0.1), (b, 0.2)):
        assert peer.strategy.outer_step == 1
        assert peer.global_weight() == pytest.approx(0.7)
        assert peer.weight() == pytest.approx(0.7 - 3 * own)  # steps 2-4, none lost
    a.step(0.1, 5)  # boundary: outer/1#1 averages steps 2-5
    b.step(0.2, 5)
    _finish_together([a, b], 6)
    for peer, rounds in ((a, a_rounds), (b, b_rounds)):
        assert rounds.keys == ["gossamer/outer/0", "gossamer/outer/1", "gossamer/outer/1#1"]
        assert peer.strategy.outer_step == 2
        assert peer.weight() == pytest.approx(1.0 - 0.9)


def test_an_average_of_nan_while_training_on_keeps_every_step_for_the_next_attempt() -> None:
    (a, a_rounds), (b, b_rounds) = _faulty_peers(
        "gossamer/outer/0", inner_steps=4, train_while_forming=True, train_while_averaging=True
    )
    a.steps(0.1, range(4))  # both begin outer/0 at the boundary of step 3
    b.steps(0.2, range(4))
    a.step(0.1, 4)  # formed: each hands 5 steps over and trains on from its estimate
    b.step(0.2, 4)
    a.wait_until_averaged()
    b.wait_until_averaged()
    a.step(0.1, 5)  # lands NaN: the 5 steps handed over are back, with the one since
    b.step(0.2, 5)
    for peer, own in ((a, 0.1), (b, 0.2)):
        assert peer.strategy.outer_step == 0
        assert peer.strategy.round_attempt == 1
        assert peer.global_weight() == pytest.approx(1.0)
        assert peer.weight() == pytest.approx(1.0 - 6 * own)
    a.steps(0.1, range(6, 8))  # boundary at 7: outer/0#1 begins, with all 8 steps in it
    b.steps(0.2, range(6, 8))
    _finish_together([a, b], 8)
    for peer, rounds in ((a, a_rounds), (b, b_rounds)):
        assert rounds.keys == ["gossamer/outer/0", "gossamer/outer/0#1"]
        assert peer.strategy.outer_step == 1
        assert peer.weight() == pytest.approx(1.0 - 8 * 0.15)


def test_a_last_round_that_failed_on_every_member_is_formed_again_after_the_last_step() -> None:
    # The budget a multiple of H: the last boundary's round was the last, and its steps were
    # thrown away at the end.
    (a, a_rounds), (b, _) = _faulty_peers("gossamer/outer/1", overlap=False)

    def train(peer: _LinearPeer, delta: float) -> None:
        peer.steps(delta, range(4))  # boundaries 1 and 3 (NaN): the last
        peer.strategy.finish(peer.model, 4)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done = [pool.submit(train, a, 0.1), pool.submit(train, b, 0.2)]
        for future in done:
            future.result(timeout=20)
    assert a_rounds.keys == ["gossamer/outer/0", "gossamer/outer/1", "gossamer/outer/1#1"]
    for peer in (a, b):
        assert peer.strategy.outer_step == 2
        assert peer.weight() == pytest.approx(1.0 - 4 * 0.15)
        peer.strategy.close()


class _BatchNormed(torch.nn.Module):
    """A linear layer and a BatchNorm, whose running statistics are buffers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 4)
        self.norm = torch.nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(x))


@pytest.mark.parametrize(
    ("train_while_forming", "train_while_averaging"),
    [(False, False), (True, True)],
    ids=["blocking", "forming-and-averaging"],
)
def test_peers_end_with_the_same_running_statistics(
    train_while_forming: bool, train_while_averaging: bool
) -> None:
    # Only trained parameters were averaged: the BatchNorm statistics stayed each peer's own,
    # and the peers ended with different models though their hashes agreed.
    group = InProcessGroup(2, timeout_s=10.0)
    config = DiLoCoConfig(
        inner_steps=3,
        train_while_forming=train_while_forming,
        train_while_averaging=train_while_averaging,
    )
    strategies = [DiLoCoStrategy(config, group.averager()) for _ in range(2)]
    models = [_BatchNormed() for _ in range(2)]

    def train(index: int) -> None:
        model, strategy = models[index], strategies[index]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        strategy.setup(model, optimizer)
        data = torch.Generator().manual_seed(index)
        for step in range(6):
            x = torch.randn(8, 3, generator=data) * (index + 1) + index  # other statistics
            loss = model(x).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            strategy.on_step_end(model, step)
        strategy.finish(model, 6)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(train, i) for i in range(2)]:
            future.result(timeout=20)
    states = [m.state_dict() for m in models]
    for name in ("norm.running_mean", "norm.running_var"):
        torch.testing.assert_close(states[0][name], states[1][name], rtol=0, atol=0)
    assert sha256_state(states[0]) == sha256_state(states[1])
    assert strategies[0].global_weights_hash() == strategies[1].global_weights_hash()
    for strategy in strategies:
        strategy.close()


def test_the_built_in_gpt_has_no_buffers_to_average() -> None:
    # Its rounds carry its parameters' pseudo-gradients and nothing else (same bytes as before).
    assert averaged_buffers(GPT(ModelConfig(num_layers=1, num_heads=2, width=32))) == []
    assert len(averaged_buffers(_BatchNormed())) == 2  # mean and variance, not the count


def test_sync_peers_stay_identical(tmp_path: Path) -> None:
    group = InProcessGroup(NUM_PEERS)
    strategies = [SyncStrategy(group.averager()) for _ in range(NUM_PEERS)]
    trainers, results = _run_peers(tmp_path, list(strategies), max_steps=6)
    assert len({sha256_state(t.model.state_dict()) for t in trainers}) == 1
    assert all(r.steps_done == 6 for r in results)
    assert all(s.last_group_size == NUM_PEERS for s in strategies)


class _InfiniteGradientOnce(SyncStrategy):
    """A sync peer whose gradient holds an inf at step 3 (an overflow on this peer only)."""

    def on_gradients(self, model: torch.nn.Module, step: int) -> None:
        if step == 3:
            grad = next(model.parameters()).grad
            assert grad is not None
            grad.view(-1)[0] = float("inf")
        super().on_gradients(model, step)


def test_one_peer_s_infinite_gradient_is_withheld_and_every_peer_stays_finite(
    tmp_path: Path,
) -> None:
    # Before, it went into the average: every peer trained on NaN weights to the end, silently.
    group = InProcessGroup(NUM_PEERS)
    strategies: list[TrainingStrategy] = [_InfiniteGradientOnce(group.averager())]
    strategies += [SyncStrategy(group.averager()) for _ in range(NUM_PEERS - 1)]
    trainers, results = _run_peers(tmp_path, strategies, max_steps=6)
    for trainer in trainers:
        assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    assert len({sha256_state(t.model.state_dict()) for t in trainers}) == 1
    assert all(r.steps_done == 6 for r in results)


class _WeightsTurnNaN(SyncStrategy):
    """A lone peer whose weights turn NaN after step 2 (diverged)."""

    def on_step_end(self, model: torch.nn.Module, step: int) -> int | None:
        if step == 2:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")
        return super().on_step_end(model, step)


def test_weights_that_turn_nan_are_never_checkpointed(tmp_path: Path) -> None:
    config = dataclasses.replace(
        _config(tmp_path, 0, max_steps=8),
        checkpoint=CheckpointConfig(directory=str(tmp_path / "peer0"), every_steps=1),
    )
    with (
        Trainer(config, strategy=_WeightsTurnNaN(InProcessGroup(1).averager())) as trainer,
        pytest.raises(TrainingDivergedError, match=r"by step 3: weight .* holds NaN"),
    ):
        trainer.run()
    # The checkpoints are of finite weights only (the last one before the weights turned).
    assert trainer.store.steps()[-1] == 2
    state = trainer.store.load_latest()
    assert state is not None
    assert all(bool(torch.isfinite(t).all()) for t in state.tensors["model"].values())


class _MaskedBigram(torch.nn.Module):
    """A model with a frozen -inf parameter: an additive mask (token 0 is never predicted)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(256, 256)
        mask = torch.zeros(256)
        mask[0] = float("-inf")
        self.mask = torch.nn.Parameter(mask, requires_grad=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table(tokens) + self.mask


def test_a_frozen_parameter_that_is_not_finite_is_the_model_s_own(tmp_path: Path) -> None:
    config = _config(tmp_path, 0, max_steps=3)
    with Trainer(config, model_factory=_MaskedBigram) as trainer:
        result = trainer.run()
    assert result.checkpoint_path is not None


def test_a_loss_that_turns_nan_stops_the_peer_before_it_steps(tmp_path: Path) -> None:
    config = _config(tmp_path, 0, max_steps=8)
    with (
        Trainer(config, strategy=_WeightsTurnNaN(InProcessGroup(1).averager())) as trainer,
        pytest.raises(TrainingDivergedError, match="diverged at step 3: the loss is nan"),
    ):
        trainer.run()


def test_diloco_state_survives_a_checkpoint(tmp_path: Path) -> None:
    group = InProcessGroup(1)
    config = _config(tmp_path, 0, max_steps=10)
    strategy = DiLoCoStrategy(DiLoCoConfig(inner_steps=3), group.averager())
    with Trainer(config, strategy=strategy) as trainer:
        trainer.run()
    restored = DiLoCoStrategy(DiLoCoConfig(inner_steps=3), group.averager())
    with Trainer(config, strategy=restored):
        # Three rounds of H = 3, and the tenth step's progress in a last one at the end.
        assert restored.outer_step == strategy.outer_step == 4
        assert restored.global_weights_hash() == strategy.global_weights_hash()
        assert restored.bytes_sent == strategy.bytes_sent


def test_in_process_round_times_out_when_peers_are_missing() -> None:
    group = InProcessGroup(2, timeout_s=0.05)
    with pytest.raises(DeadlineExceededError, match="1 of 2 peers"):
        group.averager().average([torch.ones(3)], round_key="r", weight=1.0)


def _average_of_two(weights: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two in-process peers average zeros and fours with these weights: both results."""
    group = InProcessGroup(2)
    out: list[torch.Tensor] = []

    def second() -> None:
        outcome = group.averager().average(
            [torch.full((2,), 4.0)], round_key="r", weight=weights[1]
        )
        out.extend(outcome.tensors)

    thread = threading.Thread(target=second)
    thread.start()
    mine = group.averager().average([torch.zeros(2)], round_key="r", weight=weights[0])
    thread.join(timeout=10)
    return mine.tensors[0], out[0]


def test_weighted_average() -> None:
    mine, theirs = _average_of_two((1.0, 3.0))
    assert torch.equal(mine, torch.full((2,), 3.0))
    assert torch.equal(theirs, mine)
    mine, _ = _average_of_two((0.0, 0.0))  # no weight anywhere: every contribution alike
    assert torch.equal(mine, torch.full((2,), 2.0))


def test_diloco_config_is_checked() -> None:
    with pytest.raises(ValueError, match="inner_steps"):
        DiLoCoConfig(inner_steps=0)
    with pytest.raises(ValueError, match="outer_momentum"):
        DiLoCoConfig(outer_momentum=1.0)
    with pytest.raises(ValueError, match="exclude each other"):
        DiLoCoConfig(overlap=True, train_while_forming=True)
    with pytest.raises(ValueError, match="needs diloco"):
        DiLoCoConfig(train_while_averaging=True)


def test_diloco_config_from_a_swarm_section_keeps_only_what_applies() -> None:
    from gossamer.core.config import SwarmConfig

    default = DiLoCoConfig.from_swarm(SwarmConfig(), run_id="r")
    assert (default.inner_steps, default.outer_lr, default.outer_momentum) == (50, 0.7, 0.9)
    assert default.train_while_forming
    assert default.train_while_averaging
    assert default.outer_momentum_warmup
    assert not default.overlap
    assert default.run_id == "r"
    # Overlapped rounds never wait for their group: nothing trains through forming or averaging.
    overlapped = DiLoCoConfig.from_swarm(SwarmConfig(overlap=True), run_id="r")
    assert overlapped.overlap
    assert not overlapped.train_while_forming
    assert not overlapped.train_while_averaging
    # Averaging in the background needs the group formed in the background.
    blocking = DiLoCoConfig.from_swarm(SwarmConfig(train_while_forming=False), run_id="r")
    assert not blocking.train_while_forming
    assert not blocking.train_while_averaging
    chosen = DiLoCoConfig.from_swarm(
        SwarmConfig(outer_lr=1.0, train_while_averaging=False), run_id="r", inner_steps=20
    )
    assert (chosen.inner_steps, chosen.outer_lr) == (20, 1.0)
    assert chosen.train_while_forming
    assert not chosen.train_while_averaging


def test_lossy_codec_is_applied_and_counted() -> None:
    from gossamer.comm.codecs import CodecPolicy

    exact, lossy = InProcessGroup(1), InProcessGroup(1, codec=CodecPolicy(codec="int8"))
    tensor = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    plain = exact.averager().average([tensor], round_key="r", weight=1.0)
    averager = lossy.averager()
    squeezed = averager.average([tensor], round_key="r", weight=1.0)
    assert torch.equal(plain.tensors[0], tensor)
    assert not torch.equal(squeezed.tensors[0], tensor)
    assert torch.allclose(squeezed.tensors[0], tensor, atol=0.05)
    assert averager.feedback.residual_norm("0") > 0  # the residual is kept for the next round
    group = InProcessGroup(2, codec=CodecPolicy(codec="int8"))
    outcomes = []
    thread = threading.Thread(
        target=lambda: outcomes.append(
            group.averager().average([tensor], round_key="r", weight=1.0)
        )
    )
    thread.start()
    mine = group.averager().average([tensor], round_key="r", weight=1.0)
    thread.join(timeout=10)
    fp32_ring_bytes = 2 * (1 / 2) * tensor.numel() * 4
    assert mine.bytes_sent < fp32_ring_bytes / 3.5


def _diloco(**options: bool) -> DiLoCoStrategy:
    return DiLoCoStrategy(DiLoCoConfig(inner_steps=4, **options), InProcessGroup(1).averager())


def test_a_diloco_run_stopped_mid_round_and_resumed_ends_as_one_that_was_not(
    tmp_path: Path,
) -> None:
    # run(stop_at_step=6) finished the strategy: a last round of steps 4-5 the uninterrupted
    # run never takes.
    straight = _config(tmp_path, 0, max_steps=12)
    with Trainer(straight, strategy=_diloco()) as trainer:
        trainer.run()
        expected = sha256_state(trainer.model.state_dict())
    paused = _config(tmp_path, 1, max_steps=12)
    with Trainer(paused, strategy=_diloco()) as trainer:
        trainer.run(stop_at_step=6)
    with Trainer(paused, strategy=_diloco()) as trainer:
        trainer.run()
        assert sha256_state(trainer.model.state_dict()) == expected


class _LandsAtStep4(DiLoCoStrategy):
    """Overlapped DiLoCo whose round of steps 0-3 has finished when step 4 ends, however late
    the machine's load runs its thread (it landed at step 4 or 5, or under load later)."""

    def on_step_end(self, model: torch.nn.Module, step: int) -> int | None:
        if step == 4 and self._inflight is not None:
            concurrent.futures.wait([self._inflight], timeout=60)
        return super().on_step_end(model, step)


def test_an_overlapped_peer_restored_after_its_round_landed_counts_its_steps_since(
    tmp_path: Path,
) -> None:
    # With overlap, a peer restored from a checkpoint taken after its round had landed measured
    # its progress from its local weights: the steps since the landing were left out of the next
    # round and erased from the model. (Where a round lands depends on a thread's timing, so
    # whole runs are not compared here: where progress is measured from is.)
    paused = _config(tmp_path, 0, max_steps=12)
    landing = _LandsAtStep4(DiLoCoConfig(inner_steps=4, overlap=True), InProcessGroup(1).averager())
    with Trainer(paused, strategy=landing) as trainer:
        trainer.run(stop_at_step=6)  # the round of steps 0-3 lands at step 4
    state = trainer.store.load_latest()
    assert state is not None
    assert state.meta["strategy"]["state"]["round_in_flight"] is False
    restored = _diloco(overlap=True)
    with Trainer(paused, strategy=restored):
        for start, tensor in zip(restored._start, restored._global, strict=True):
            assert torch.equal(start, tensor)  # from the global weights, not the local ones


def test_a_diloco_peer_killed_before_its_last_round_runs_it_when_restarted(tmp_path: Path) -> None:
    # 10 steps, H = 4: steps 8-9 go through a last round in finish(). Killed after the
    # checkpoint of step 10, the restarted peer skipped that round (the count of steps since
    # the last round was not saved) and threw steps 8-9 away.
    def config(peer: int) -> RunConfig:
        base = _config(tmp_path, peer, max_steps=10)
        directory = str(tmp_path / f"peer{peer}")
        return dataclasses.replace(
            base, checkpoint=CheckpointConfig(directory=directory, every_steps=2)
        )

    with Trainer(config(0), strategy=_diloco()) as trainer:
        trainer.run()
        expected = sha256_state(trainer.model.state_dict())
    with (
        Trainer(config(1), strategy=_diloco(), listener=CrashAfterCheckpoint(10)) as trainer,
        pytest.raises(KeyboardInterrupt),
    ):
        trainer.run()
    restarted = _diloco()
    with Trainer(config(1), strategy=restarted) as trainer:
        trainer.run()
        assert restarted.outer_step == 3
        assert sha256_state(trainer.model.state_dict()) == expected


class _Diverging(SyncStrategy):
    def on_gradients(self, model: torch.nn.Module, step: int) -> None:
        raise TrainingDivergedError(f"loss is nan at step {step}")


def test_a_peer_s_own_error_reaches_the_caller_as_it_is(tmp_path: Path) -> None:
    # (wrapped in a RuntimeError, `gossamer bench diloco` printed a 60-line traceback for it)
    group = InProcessGroup(2)
    strategies: list[TrainingStrategy] = [_Diverging(group.averager()) for _ in range(2)]
    with pytest.raises(TrainingDivergedError, match="loss is nan"):
        _run_peers(tmp_path, strategies, max_steps=4)


@pytest.mark.parametrize("outer_momentum", [0.9, 0.0])
def test_the_start_disk_check_estimates_a_diloco_checkpoint_with_its_outer_state(
    outer_momentum: float,
) -> None:
    # The strategy is set up after the check, so its global weights and momentum were left out
    # of the estimate: a DiLoCo run's checkpoint was about 40% over it.
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 64)).sum().backward()
    optimizer.step()
    strategy = DiLoCoStrategy(
        DiLoCoConfig(inner_steps=1, outer_momentum=outer_momentum, outer_momentum_warmup=False),
        InProcessGroup(1).averager(),
    )
    strategy.setup(model, optimizer)
    for step in range(2):  # (two outer steps: the momentum buffers exist)
        with torch.no_grad():
            for param in model.parameters():
                param.sub_(0.01)
        strategy.on_step_end(model, step)
    run = RunState(
        config=RunConfig(swarm=SwarmConfig(strategy="diloco", outer_momentum=outer_momentum)),
        model=model,
        optimizer=optimizer,
        stream=None,  # type: ignore[arg-type]  # (the estimate reads no data)
        strategy=strategy,
        custom_model=True,
    )
    strategy_tensors, _ = strategy.state_for_checkpoint()
    optimizer_tensors = [
        value
        for param_state in optimizer.state.values()
        for value in param_state.values()
        if isinstance(value, torch.Tensor)
    ]
    held = [*model.state_dict().values(), *optimizer_tensors, *strategy_tensors.values()]
    actual = sum(t.numel() * t.element_size() for t in held)
    estimate = estimate_checkpoint_num_bytes(run)
    assert 0.99 * actual <= estimate <= actual
    strategy.close()
