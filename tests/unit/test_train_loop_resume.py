"""What a resume carries over of a run's time budget, and what it says of a changed config."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from gossamer.core.clock import FakeClock
from gossamer.core.config import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from gossamer.store import CheckpointStore
from gossamer.train import Trainer
from gossamer.train.optim import learning_rate_at

TEXT = "def add(a, b):\n    return a + b\n\n" * 200 + "class Point:\n    x: int\n    y: int\n" * 100


def _config(tmp_path: Path, folder: str, **train: object) -> RunConfig:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(TEXT)
    fields: dict[str, object] = {
        "max_steps": 12,
        "batch_size": 4,
        "eval_every": 0,
        "eval_batches": 2,
        "seed": 3,
    }
    fields.update(train)
    return RunConfig(
        model=ModelConfig(num_layers=1, num_heads=2, width=32, context=32),
        data=DataConfig(source="text", path=str(corpus), validation_fraction=0.1),
        optim=OptimConfig(lr=1e-2, warmup_steps=2),
        train=TrainConfig(**fields),  # type: ignore[arg-type]
        checkpoint=CheckpointConfig(directory=str(tmp_path / folder), every_steps=0),
    )


class _SlowClock(FakeClock):
    """Every reading is 50 ms after the one before: a step rate the budget fit can measure."""

    def monotonic(self) -> float:
        self.advance(0.05)
        return super().monotonic()


def test_a_budget_paused_before_its_schedule_is_fitted_is_not_spent_again(
    tmp_path: Path,
) -> None:
    # The budget spent was saved only once the schedule was fitted (after 20 steps): paused
    # at step 10, the resumed run had its whole budget again (8 s: 57 steps in all, not 47).
    with Trainer(
        _config(tmp_path, "alone", max_steps=5000, max_seconds=8.0), clock=_SlowClock()
    ) as t:
        whole = t.run()
    paused = _config(tmp_path, "paused", max_steps=5000, max_seconds=8.0)
    with Trainer(paused, clock=_SlowClock()) as first:
        first.run(stop_at_step=10)
    state = CheckpointStore(tmp_path / "paused").load_latest()
    assert state is not None
    assert state.meta["schedule_steps"] is None  # (not fitted yet)
    assert state.meta["schedule_spent_s"] > 0
    with Trainer(paused, clock=_SlowClock()) as resumed:
        result = resumed.run()
    assert result.stopped_by_time_budget
    # (the resumed session evaluates once more at its start: it may fit a step or two fewer)
    assert whole.steps_done - 3 <= result.steps_done <= whole.steps_done


def test_a_budget_given_anew_on_resume_starts_anew(tmp_path: Path) -> None:
    # Another train.max_seconds is another budget: what the last one spent does not count.
    first = _config(tmp_path, "run", max_steps=5000, max_seconds=8.0)
    with Trainer(first, clock=_SlowClock()) as trainer:
        trainer.run(stop_at_step=10)
    longer = _config(tmp_path, "run", max_steps=5000, max_seconds=9.0)
    with Trainer(longer, clock=_SlowClock()) as trainer:
        assert trainer.run_state.schedule_spent_s == 0.0


def test_a_resume_with_another_schedule_or_batch_says_so_in_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A finished 12-step run extended to 24 steps went from a learning rate of 0.0012 at its
    # last step back up to 0.0061, and a changed optim.lr took effect, with nothing said.
    with Trainer(_config(tmp_path, "run")) as trainer:
        trainer.run()
        last_lr = trainer.run_state.optimizer.param_groups[0]["lr"]
    same = _config(tmp_path, "run")
    with caplog.at_level(logging.WARNING, logger="gossamer.train.loop"), Trainer(same):
        pass
    assert "settings other than" not in caplog.text
    extended = _config(tmp_path, "run", max_steps=24, batch_size=8)
    extended = dataclasses.replace(extended, optim=dataclasses.replace(extended.optim, lr=2e-2))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gossamer.train.loop"), Trainer(extended):
        pass
    warnings = [r.getMessage() for r in caplog.records if "settings other than" in r.getMessage()]
    assert len(warnings) == 1
    (warning,) = warnings
    assert "step 12" in warning
    assert "train.max_steps 12 -> 24" in warning
    assert "train.batch_size 4 -> 8" in warning
    assert "optim.lr 0.01 -> 0.02" in warning
    assert "optim.warmup_steps" not in warning  # (unchanged)
    next_lr = learning_rate_at(12, config=extended.optim, max_steps=24)
    assert f"from {last_lr:.3g} (its last step) to {next_lr:.3g} (the next step)" in warning
