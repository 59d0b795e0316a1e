"""Training listeners the loop's tests share."""

from __future__ import annotations

from pathlib import Path

from gossamer.train.run_events import TrainingListener


class CrashAfterCheckpoint(TrainingListener):
    """Raises right after the checkpoint of ``step`` is written, as a kill would land there."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, *, step: int, path: Path) -> None:
        if step == self.step:
            raise KeyboardInterrupt(f"killed after the checkpoint of step {step}")
