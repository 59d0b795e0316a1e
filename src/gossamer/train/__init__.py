"""Training: the loop, strategies, and state sync for newcomers."""

from gossamer.train.loop import (
    ModelFactory,
    ProgressEvent,
    Trainer,
    TrainingListener,
    TrainResult,
    train,
)
from gossamer.train.strategy import LocalStrategy, TrainingStrategy

__all__ = [
    "LocalStrategy",
    "ModelFactory",
    "ProgressEvent",
    "TrainResult",
    "Trainer",
    "TrainingListener",
    "TrainingStrategy",
    "train",
]
