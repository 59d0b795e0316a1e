"""A training peer's time split into phases: every second counted once, waiting apart.

Two peers train as threads of one process with synchronous data parallel over an in-process
group. One of them is slowed inside its averaging hook, so the other waits for it every step: that
waiting must be counted as "waiting", not also as the hook's "communication", and no peer's phases
may add up to more than its wall time.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from gossamer.core.config import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from gossamer.obs.metrics import PeerMetrics
from gossamer.obs.trace import PHASES, SpanRecorder
from gossamer.train import Trainer
from gossamer.train.averaging import AverageOutcome, InProcessAverager, InProcessGroup
from gossamer.train.strategy import LocalStrategy
from gossamer.train.sync import SyncStrategy

STEPS = 8
DELAY_S = 0.1


class SlowAverager:
    """Averages after a pause of its own (a slow peer: its time is not waiting)."""

    def __init__(self, averager: InProcessAverager) -> None:
        self.averager = averager

    def average(
        self, tensors: list[torch.Tensor], *, round_key: str, weight: float
    ) -> AverageOutcome:
        time.sleep(DELAY_S)
        return self.averager.average(tensors, round_key=round_key, weight=weight)


def _config(tmp_path: Path, peer: int) -> RunConfig:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("def f(x):\n    return x + 1\n" * 300)
    return RunConfig(
        model=ModelConfig(num_layers=1, num_heads=2, width=32, context=32),
        data=DataConfig(source="text", path=str(corpus)),
        optim=OptimConfig(lr=1e-2, warmup_steps=2),
        train=TrainConfig(max_steps=STEPS, batch_size=2, eval_every=0, eval_batches=1),
        checkpoint=CheckpointConfig(directory=str(tmp_path / f"peer{peer}"), every_steps=0),
    )


def test_phases_split_waiting_from_communication_and_add_up_to_wall_time(
    tmp_path: Path,
) -> None:
    group = InProcessGroup(2, timeout_s=20)
    strategies = [
        SyncStrategy(group.averager(), run_id="split"),
        SyncStrategy(SlowAverager(group.averager()), run_id="split"),
    ]
    metrics = [PeerMetrics(), PeerMetrics()]
    recorders = [SpanRecorder(peer=f"p{i}") for i in range(2)]
    configs = [_config(tmp_path, i) for i in range(2)]  # the corpus is written once, here
    wall_s = [0.0, 0.0]
    errors: list[BaseException] = []

    def peer(index: int) -> None:
        try:
            started = time.monotonic()
            with Trainer(
                configs[index],
                strategy=strategies[index],
                spans=recorders[index],
                metrics=metrics[index],
            ) as trainer:
                trainer.run()
            wall_s[index] = time.monotonic() - started
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=peer, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert all(not t.is_alive() for t in threads)

    def seconds(index: int, phase: str) -> float:
        value = metrics[index].registry.get_sample_value
        return value("gossamer_time_seconds_total", {"phase": phase}) or 0.0

    for index in range(2):
        total = sum(seconds(index, phase) for phase in PHASES)
        assert 0 < total <= wall_s[index], (index, total, wall_s[index])
        assert seconds(index, "compute") > 0
        assert seconds(index, "sync") > 0  # setup and the end-of-run agreement
    # The fast peer waited for the slow one every step; the slow one hardly waited.
    assert seconds(0, "waiting") >= 0.5 * STEPS * DELAY_S
    assert seconds(1, "waiting") < seconds(0, "waiting") / 2
    # The slow peer's pause is its own hook time (communication), not waiting.
    assert seconds(1, "communication") >= STEPS * DELAY_S
    assert seconds(0, "communication") < seconds(0, "waiting")
    # Every waiting span sits inside the hook span it interrupted.
    waits = [s for s in recorders[0].spans() if s.name == "waiting"]
    assert len(waits) == STEPS
    assert {s.within for s in waits} == {"communication"}
    assert {s.step for s in waits} == set(range(STEPS))
    assert sum(s.duration_s for s in waits) == pytest.approx(seconds(0, "waiting"))


class _LosesItsFirstRound(LocalStrategy):
    """A peer whose first round went on without it: the round's steps are thrown away, and
    the strategy takes them back from goodput in its hook, as the swarm strategies do."""

    def __init__(self, metrics: PeerMetrics, steps_per_round: int, tokens_per_step: int) -> None:
        self.metrics = metrics
        self.steps_per_round = steps_per_round
        self.tokens_per_step = tokens_per_step

    def on_step_end(self, model: torch.nn.Module, step: int) -> int | None:
        if step + 1 == self.steps_per_round:
            self.metrics.goodput.discard(self.steps_per_round * self.tokens_per_step)
        return None


@pytest.mark.parametrize("steps_per_round", [1, 3])
def test_a_step_thrown_away_in_its_own_hook_is_not_counted_as_kept(
    tmp_path: Path, steps_per_round: int
) -> None:
    # The loop counted a step after its hook: a take-back of the step in flight found nothing
    # of it to take, and a peer's lost first round (a newcomer's, a restarted one's) stayed kept.
    config = _config(tmp_path, 0)
    metrics = PeerMetrics()
    tokens_per_step = config.train.batch_size * config.model.context
    strategy = _LosesItsFirstRound(metrics, steps_per_round, tokens_per_step)
    with Trainer(config, strategy=strategy, metrics=metrics) as trainer:
        trainer.run(stop_at_step=steps_per_round)
    figures = metrics.goodput.snapshot()
    assert figures.tokens_processed == steps_per_round * tokens_per_step
    assert figures.tokens_kept == 0
    assert figures.tokens_discarded == figures.tokens_processed
