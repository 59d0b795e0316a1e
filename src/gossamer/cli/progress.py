"""A live progress bar for training runs (step, loss, tokens/s, time left).

Its writes never end a run: a terminal that closed (the SIGHUP a run checkpoints at) fails every
write to it with EIO, and one before the signal's handler pointed the output elsewhere killed
the run before its checkpoint.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from gossamer.train import ProgressEvent, TrainingListener

__all__ = ["RichProgressListener"]


def _format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class RichProgressListener(TrainingListener):
    """Shows a run's progress on the terminal; evaluation and checkpoint lines above the bar."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tokens_per_s]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("left {task.fields[left]}"),
            console=self.console,
            transient=False,
        )
        self._task: TaskID | None = None
        self._checkpointed_step: int | None = None

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(OSError):
            self._progress.stop()

    def on_start(self, *, start_step: int, max_steps: int, num_parameters: int) -> None:
        with contextlib.suppress(OSError):  # (see the module's docstring)
            if start_step >= max_steps:  # ("steps 10 -> 4", and a bar at 10/4)
                self.console.print(
                    f"model: {num_parameters / 1e6:.2f}M parameters; already at step {start_step} "
                    f"of train.max_steps {max_steps}: nothing to train (raise train.max_steps to "
                    "go on)"
                )
                return
            self.console.print(
                f"model: {num_parameters / 1e6:.2f}M parameters; steps {start_step} -> {max_steps}"
            )
            self._task = self._progress.add_task(
                "train",
                total=max_steps,
                completed=start_step,
                loss="-",
                tokens_per_s="-",
                left="-",
            )

    def on_eval(self, *, step: int, val_loss: float) -> None:
        with contextlib.suppress(OSError):  # (see the module's docstring)
            self.console.print(f"step {step}: validation loss {val_loss:.4f}")

    def on_step(self, event: ProgressEvent) -> None:
        with contextlib.suppress(OSError):  # (see the module's docstring)
            if self._task is None:
                return
            self._progress.update(
                self._task,
                total=event.max_steps,
                completed=event.step,
                loss=f"{event.loss:.3f}",
                tokens_per_s=f"{event.tokens_per_s:,.0f}",
                left=_format_seconds(event.eta_s),
            )

    def on_checkpoint(self, *, step: int, path: Path) -> None:
        with contextlib.suppress(OSError):  # (see the module's docstring)
            # A step's checkpoint written again in one session: the run's last round (a swarm
            # peer's) replaced the weights after it.
            again = " (written again: the last round replaced the weights)"
            self.console.print(
                f"step {step}: checkpoint {path}{again if step == self._checkpointed_step else ''}"
            )
            self._checkpointed_step = step
