"""What a training run tells the outside: the events a :class:`TrainingListener` receives as
the run goes (each step's :class:`ProgressEvent`, evaluations, checkpoints) and the
:class:`TrainResult` :class:`~gossamer.train.loop.Trainer` returns at its end."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProgressEvent", "TrainResult", "TrainingListener"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ProgressEvent:
    """One finished optimizer step, as a progress display sees it."""

    step: int
    """Steps done so far in the run (1 after the first step)."""
    max_steps: int
    """The run's total steps."""
    loss: float
    """Mean training loss over the step's micro-batches."""
    lr: float
    """Learning rate used for the step."""
    tokens_per_s: float
    """Training tokens per second of training time, since this process started."""
    elapsed_s: float
    """Wall seconds since this process started the run."""
    eta_s: float
    """Estimated wall seconds to the end (of the step budget or the time budget, if sooner)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainResult:
    """What a run did."""

    start_step: int
    """Step the run started from (non-zero after a resume)."""
    steps_done: int
    """Step reached at the end (steps in the whole run, resumes included)."""
    tokens_trained: int
    """Training tokens consumed in the whole run, resumes included."""
    tokens_this_session: int
    """Training tokens consumed by this process."""
    train_seconds: float
    """Seconds spent in training steps by this process (no evaluation, no checkpointing)."""
    wall_seconds: float
    """Wall seconds of this process's run, evaluation and checkpointing included."""
    val_loss_before: float
    """Validation loss when this process started (after any resume)."""
    val_loss_after: float
    """Validation loss at the end (NaN where the run was interrupted: none is measured then)."""
    final_train_loss: float
    """Training loss of the last step (NaN if no step ran)."""
    checkpoint_path: Path | None
    """The checkpoint written at the end."""
    resumed_from: Path | None
    """The checkpoint this process resumed from, if any."""
    stopped_by_time_budget: bool
    """True if ``train.max_seconds`` ended the run before ``train.max_steps``."""
    num_parameters: int
    """Distinct trainable parameters of the model."""
    interrupted: bool = False
    """True if a stop was asked for (Ctrl-C, SIGTERM) and the run paused before its end: its
    checkpoint is of the step reached, and the same command resumes it."""

    @property
    def tokens_per_s(self) -> float:
        """Training throughput of this process: tokens per second of training time."""
        return self.tokens_this_session / self.train_seconds if self.train_seconds > 0 else 0.0


class TrainingListener:
    """Receives the run's events; subclass and override what you need (all do nothing here)."""

    def on_start(self, *, start_step: int, max_steps: int, num_parameters: int) -> None:
        """The run is about to take its first step."""

    def on_eval(self, *, step: int, val_loss: float) -> None:
        """A validation loss was measured at ``step``."""

    def on_step(self, event: ProgressEvent) -> None:
        """An optimizer step finished."""

    def on_checkpoint(self, *, step: int, path: Path) -> None:
        """A checkpoint was written."""
