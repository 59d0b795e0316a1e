"""Gossamer: train PyTorch models on machines that are heterogeneous, unreliable and far apart.

The public API is the short list in ``__all__``; everything else is reached through its layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import gossamer.train as _training
from gossamer._version import __version__
from gossamer.core.config import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from gossamer.core.config_loader import load_run_config
from gossamer.core.errors import FatalError, GossamerError, RetryableError
from gossamer.core.runtime import lazy_attributes

if TYPE_CHECKING:
    from gossamer.models import GPT
    from gossamer.train import Trainer, TrainingListener, TrainResult
    from gossamer.train.loop import ModelFactory

_LAZY = {
    "GPT": "gossamer.models",
    "Trainer": "gossamer.train",
    "TrainingListener": "gossamer.train",
    "TrainResult": "gossamer.train",
}
"""Names imported on first use: they bring torch, which commands that only speak to the
network (``gossamer peer``, ``doctor``, ``lab``) need not load (seconds, or tens of seconds with
a cold file cache)."""


# The subpackage is imported above (no torch yet) so that its first import, which binds the
# package's attribute ``train`` to it, comes before this function takes the name.
def train(
    config: RunConfig | None = None,
    *,
    model_factory: ModelFactory | None = None,
    listener: TrainingListener | None = None,
    stop_at_step: int | None = None,
) -> TrainResult:
    """Train a model on one peer, resuming from the newest valid checkpoint if there is one
    (see :func:`gossamer.train.loop.train`)."""
    return _training.train(
        config, model_factory=model_factory, listener=listener, stop_at_step=stop_at_step
    )


__getattr__ = lazy_attributes(globals(), _LAZY)


__all__ = [
    "GPT",
    "CheckpointConfig",
    "DataConfig",
    "FatalError",
    "GossamerError",
    "ModelConfig",
    "OptimConfig",
    "RetryableError",
    "RunConfig",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingListener",
    "__version__",
    "load_run_config",
    "train",
]
