"""A swarm peer's status file: a small JSON record of its progress, for live tables.

:class:`StatusFileListener` is the training listener behind ``swarm.status_file``: it writes the
peer's step, loss, bytes on the wire, rounds, resyncs, goodput and longest pauses, atomically,
at most every ``min_interval_s`` and at the run's end.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from gossamer.obs.goodput import GoodputTracker
from gossamer.train.run_events import ProgressEvent, TrainingListener, TrainResult
from gossamer.train.strategy import TrainingStrategy
from gossamer.train.swarm_averager import SwarmAverager

__all__ = ["StatusFileListener"]

_NOTED_PAUSE_S = 1.0
"""Pauses between steps at least this long are listed in the status file (``pauses``)."""
_NOTED_PAUSES = 32
"""How many of the latest such pauses the status file lists."""


class StatusFileListener(TrainingListener):
    """Keeps a small JSON status of this peer in a file (written atomically), for live tables.

    Args:
        path: the status file.
        peer_id: this peer's id.
        strategy: read for bytes sent, rounds and resyncs.
        goodput: read for kept and processed tokens, compute and wall time.
        min_interval_s: write at most this often (the last step is always written).
    """

    def __init__(
        self,
        path: Path,
        *,
        peer_id: str,
        strategy: TrainingStrategy,
        goodput: GoodputTracker | None = None,
        min_interval_s: float = 0.5,
    ) -> None:
        self.path = path
        self.peer_id = peer_id
        self.strategy = strategy
        self.goodput = goodput
        self.min_interval_s = min_interval_s
        self._last_write = 0.0
        self._last_step_at: float | None = None
        self.status: dict[str, Any] = {
            "peer_id": peer_id,
            "state": "starting",
            "pid": os.getpid(),
            "longest_pause_s": 0.0,
            "longest_pause_step": None,
            "pauses": [],
        }
        self._write()

    def publish(self, **fields: Any) -> None:
        """Add ``fields`` (the peer's address, say) and write them at once: others may wait
        for them before training starts here."""
        self.status.update(fields)
        self._write()

    def _write(self) -> None:
        self.status["updated_unix_s"] = time.time()
        self.status["bytes_sent"] = int(getattr(self.strategy, "bytes_sent", 0))
        self.status["bytes_received"] = int(getattr(self.strategy, "bytes_received", 0))
        self.status["outer_step"] = int(getattr(self.strategy, "outer_step", 0))
        self.status["group_size"] = int(getattr(self.strategy, "last_group_size", 0))
        self.status["resyncs"] = int(getattr(self.strategy, "resyncs", 0))
        self.status["stall_s"] = float(getattr(self.strategy, "seconds_lost_to_failures", 0.0))
        ttp = getattr(self.strategy, "time_to_productive_s", None)
        self.status["time_to_productive_s"] = ttp
        averager = getattr(self.strategy, "swarm_averager", None)
        if isinstance(averager, SwarmAverager):
            self.status["rounds_by_backend"] = dict(averager.rounds_by_backend)
            self.status["torch_failures"] = averager.torch_failures
        if self.goodput is not None:
            snap = self.goodput.snapshot()
            self.status["goodput"] = {
                "wall_s": snap.wall_s,
                "compute_s": snap.compute_s,
                "tokens_processed": snap.tokens_processed,
                "tokens_kept": snap.tokens_kept,
                "tokens_per_s": snap.goodput_tokens_per_s,
                "compute_tokens_per_s": snap.compute_tokens_per_s,
                "ratio": snap.goodput_ratio,
            }
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.status))
        os.replace(tmp, self.path)
        self._last_write = time.monotonic()

    def on_start(self, *, start_step: int, max_steps: int, num_parameters: int) -> None:
        self.status.update(state="training", step=start_step, max_steps=max_steps)
        self._write()

    def on_eval(self, *, step: int, val_loss: float) -> None:
        self.status.setdefault("val_loss_first", val_loss)
        self.status["val_loss"] = val_loss
        self._write()

    def on_step(self, event: ProgressEvent) -> None:
        # The longest wall time between two step ends: what a failure (or anything else) cost
        # training at worst, rounds and state downloads included, start-up not.
        now = time.monotonic()
        if self._last_step_at is not None:
            pause = now - self._last_step_at
            if pause > self.status["longest_pause_s"]:
                self.status["longest_pause_s"] = pause
                self.status["longest_pause_step"] = event.step
            if pause >= _NOTED_PAUSE_S:  # when, how long, at which step (the last few)
                pauses = self.status["pauses"]
                pauses.append([time.time(), round(pause, 3), event.step])
                del pauses[:-_NOTED_PAUSES]
        self._last_step_at = now
        self.status.update(
            step=event.step,
            max_steps=event.max_steps,
            loss=event.loss,
            tokens_per_s=event.tokens_per_s,
        )
        if time.monotonic() - self._last_write >= self.min_interval_s:
            self._write()

    def on_checkpoint(self, *, step: int, path: Path) -> None:
        self.status["checkpoint"] = str(path)
        self._write()

    def finish(self, result: TrainResult | None, error: str | None = None) -> None:
        """Record the end of the run (or its pause: Ctrl-C, SIGTERM)."""
        interrupted = result is not None and result.interrupted
        self.status["state"] = "failed" if error else "interrupted" if interrupted else "done"
        if error:
            self.status["error"] = error
        if result is not None:
            after = result.val_loss_after
            self.status.update(
                step=result.steps_done,
                tokens_trained=result.tokens_trained,
                val_loss=after if math.isfinite(after) else None,  # (not measured at a pause)
                val_loss_first=result.val_loss_before,
                checkpoint=str(result.checkpoint_path),
            )
        self._write()
