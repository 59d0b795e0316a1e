"""Gossamer: train PyTorch models on machines that are heterogeneous, unreliable and far apart.

The public API is the short list in ``__all__``; everything else is reached through its layer.
"""

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
from gossamer.models import GPT
from gossamer.train import Trainer, TrainingListener, TrainResult, train

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
