"""DiLoCo across a stop: a peer paused, killed or run again ends as one left alone."""

from __future__ import annotations

import concurrent.futures
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from train_listeners import CrashAfterCheckpoint

from gossamer.core.config import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from gossamer.core.hashing import sha256_state
from gossamer.train import Trainer
from gossamer.train.averaging import InProcessGroup
from gossamer.train.diloco import DiLoCoStrategy
from gossamer.train.diloco_config import DiLoCoConfig
from gossamer.train.run_events import ProgressEvent, TrainingListener

H = 4


def _config(tmp_path: Path, name: str, *, max_steps: int, every_steps: int = 0) -> RunConfig:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("def f(x):\n    return x + 1\n" * 300 + "import sys\n" * 200)
    return RunConfig(
        model=ModelConfig(num_layers=1, num_heads=2, width=32, context=32),
        data=DataConfig(source="text", path=str(corpus)),
        optim=OptimConfig(lr=1e-2, warmup_steps=2),
        train=TrainConfig(max_steps=max_steps, batch_size=4, eval_every=0, eval_batches=2),
        checkpoint=CheckpointConfig(
            directory=str(tmp_path / name), every_steps=every_steps, keep_last=5
        ),
    )


def _diloco(**options: bool) -> DiLoCoStrategy:
    return DiLoCoStrategy(DiLoCoConfig(inner_steps=H, **options), InProcessGroup(1).averager())


def _hash(trainer: Trainer) -> str:
    return sha256_state(trainer.model.state_dict())


def test_a_forming_peer_killed_after_its_last_boundary_runs_the_round_begun_there(
    tmp_path: Path,
) -> None:
    # 12 steps, H = 4, training while the group forms: the round of steps 9-11 begins forming
    # at the end of step 11 and is averaged in finish(). Killed after the checkpoint of step
    # 12, the restarted peer (nothing left to train) never began that round again and threw
    # steps 9-11 away: 2 outer steps instead of 3.
    with Trainer(
        _config(tmp_path, "straight", max_steps=12), strategy=_diloco(train_while_forming=True)
    ) as trainer:
        trainer.run()
        expected = _hash(trainer)
    killed = _config(tmp_path, "killed", max_steps=12, every_steps=4)
    with (
        Trainer(
            killed,
            strategy=_diloco(train_while_forming=True),
            listener=CrashAfterCheckpoint(12),
        ) as trainer,
        pytest.raises(KeyboardInterrupt),
    ):
        trainer.run()
    restarted = _diloco(train_while_forming=True)
    with Trainer(killed, strategy=restarted) as trainer:
        trainer.run()
        assert restarted.outer_step == 3
        assert _hash(trainer) == expected


def test_a_forming_and_averaging_peer_killed_after_its_last_boundary_runs_that_round(
    tmp_path: Path,
) -> None:
    # The swarm's defaults: where a round averaging in the background lands depends on a
    # thread's timing, so the outer steps are compared, not the weights.
    options = {"train_while_forming": True, "train_while_averaging": True}
    killed = _config(tmp_path, "killed", max_steps=12, every_steps=4)
    with (
        Trainer(killed, strategy=_diloco(**options), listener=CrashAfterCheckpoint(12)) as t,
        pytest.raises(KeyboardInterrupt),
    ):
        t.run()
    restarted = _diloco(**options)
    with Trainer(killed, strategy=restarted) as trainer:
        trainer.run()
        assert restarted.outer_step == 3  # (2: the round begun at step 11 was never run)


@pytest.mark.parametrize(
    "options",
    [{"train_while_forming": True}, {}, {"overlap": True}],
    ids=["forming", "blocking", "overlap"],
)
def test_a_finished_diloco_run_run_again_has_nothing_to_train(
    tmp_path: Path, options: dict[str, bool]
) -> None:
    # 10 steps, H = 4: a last round averages steps 8-9. Run again, a forming peer ran another
    # (empty) last round each time, bumped its outer step and wrote the final checkpoint again.
    config = _config(tmp_path, "run", max_steps=10)
    first = _diloco(**options)
    with Trainer(config, strategy=first) as trainer:
        finished = trainer.run()
        expected = _hash(trainer)
    assert finished.checkpoint_path is not None
    manifest = (finished.checkpoint_path / "manifest.json").read_bytes()
    for _ in range(2):
        again = _diloco(**options)
        with Trainer(config, strategy=again) as trainer:
            result = trainer.run()
            assert _hash(trainer) == expected
        assert again.outer_step == first.outer_step == 3
        assert result.steps_done == result.start_step == 10
        assert result.checkpoint_path == finished.checkpoint_path
        assert (finished.checkpoint_path / "manifest.json").read_bytes() == manifest


def test_a_finished_forming_run_extended_still_averages_its_last_steps(tmp_path: Path) -> None:
    # The mark that the run finished at step 10 holds there only: extended to 14 steps, steps
    # 12-13 go through a last round of their own.
    run = _diloco(train_while_forming=True)
    with Trainer(_config(tmp_path, "run", max_steps=10), strategy=run) as trainer:
        trainer.run()
    extended = _diloco(train_while_forming=True)
    with Trainer(_config(tmp_path, "run", max_steps=14), strategy=extended) as trainer:
        trainer.run()
    assert extended.outer_step == 5  # (rounds of steps 10-11 and of 12-13)


class _LandsAtOnce(DiLoCoStrategy):
    """Lands a round launched in the background in the step end that launched it (a network
    with no delay), so a run does not depend on a thread's timing; except at step
    ``late_at``, where the round is left in flight."""

    def __init__(self, late_at: int | None = None, **options: bool) -> None:
        super().__init__(DiLoCoConfig(inner_steps=H, **options), InProcessGroup(1).averager())
        self.late_at = late_at
        self.in_flight_at_pause = False

    def on_step_end(self, model: torch.nn.Module, step: int) -> int | None:
        continue_from = super().on_step_end(model, step)
        if step != self.late_at:
            if self._averaging is not None:
                self._land_averaging()
            if self._inflight is not None:
                concurrent.futures.wait([self._inflight], timeout=60)
                self._land()
        return continue_from


class _StopAfter(TrainingListener):
    """Asks for a stop (as Ctrl-C does) once ``steps`` steps are done."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.trainer: Trainer | None = None

    def on_step(self, event: ProgressEvent) -> None:
        if event.step == self.steps:
            assert self.trainer is not None
            self.trainer.stop.set()


@pytest.mark.parametrize(
    ("options", "launched_at"),
    [
        # forming at the end of step 3, formed at step 4's: averaged in the background from there
        ({"train_while_forming": True, "train_while_averaging": True}, 4),
        ({"overlap": True}, 7),  # launched at the boundary
    ],
    ids=["while-averaging", "overlap"],
)
def test_a_pause_lands_the_round_averaging_in_the_background_before_its_checkpoint(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    options: dict[str, bool],
    launched_at: int,
) -> None:
    # Paused (Ctrl-C) with a round averaging in the background, the peer checkpointed without
    # it: resumed, it came back onto the old global weights and that round's steps were lost.
    with Trainer(
        _config(tmp_path, "straight", max_steps=12), strategy=_LandsAtOnce(**options)
    ) as trainer:
        trainer.run()
        expected = _hash(trainer)
    paused = _config(tmp_path, "paused", max_steps=12)
    stopper = _StopAfter(launched_at + 1)
    strategy = _LandsAtOnce(late_at=launched_at, **options)
    with (
        caplog.at_level(logging.WARNING, logger="gossamer.train.loop"),
        Trainer(paused, strategy=strategy, listener=stopper) as trainer,
    ):
        stopper.trainer = trainer
        result = trainer.run()
    assert result.interrupted
    assert result.steps_done == launched_at + 1
    assert "waiting for the DiLoCo round" in caplog.text
    assert not strategy.round_in_flight
    outer_steps_at_pause = strategy.outer_step
    with Trainer(paused, strategy=(resumed := _LandsAtOnce(**options))) as trainer:
        trainer.run()
        assert _hash(trainer) == expected
    assert outer_steps_at_pause == 2 if options.get("overlap") else 1
    assert resumed.outer_step == 3


def test_a_pause_with_no_round_in_flight_waits_for_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stopper = _StopAfter(2)
    with (
        caplog.at_level(logging.WARNING, logger="gossamer.train.loop"),
        Trainer(
            _config(tmp_path, "paused", max_steps=12),
            strategy=_diloco(train_while_forming=True, train_while_averaging=True),
            listener=stopper,
        ) as trainer,
    ):
        stopper.trainer = trainer
        assert trainer.run().interrupted
    assert "waiting for" not in caplog.text


class _HeldAverager:
    """An averager whose rounds wait until released (a round held up by a slow peer)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self._inner = InProcessGroup(1).averager()

    def average(self, tensors: list[torch.Tensor], *, round_key: str, weight: float) -> Any:
        self.entered.set()
        self.release.wait(timeout=60)
        return self._inner.average(tensors, round_key=round_key, weight=weight)


def test_a_second_stop_while_the_pause_waits_for_a_round_leaves_at_once(tmp_path: Path) -> None:
    # The KeyboardInterrupt of the second stop left the pause's wait, then the strategy's
    # close joined the round's thread and waited the round out all the same (minutes in a swarm).
    averager = _HeldAverager()
    strategy = DiLoCoStrategy(DiLoCoConfig(inner_steps=H, overlap=True), cast(Any, averager))
    stopper = _StopAfter(H + 1)  # the round launched at the boundary is in flight
    config = _config(tmp_path, "held", max_steps=40)

    def second_stop() -> None:
        if averager.entered.wait(timeout=60):
            time.sleep(0.5)  # (the pause's wait under way; the test's pace, not a sync point)
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    helper = threading.Thread(target=second_stop, daemon=True)
    helper.start()
    started = time.monotonic()
    interrupted = False
    try:
        with Trainer(config, strategy=strategy, listener=stopper) as trainer:
            stopper.trainer = trainer
            trainer.run()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        took = time.monotonic() - started
        averager.release.set()
        helper.join(timeout=60)
    assert interrupted
    assert took < 30.0  # the round is held for 60 s
