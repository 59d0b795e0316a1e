"""Training: the loop, strategies, and state sync for newcomers.

The names below load on first use (they import torch), so that importing a module of this
package that needs none, or the ``gossamer`` package itself, costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gossamer.core.runtime import lazy_attributes

if TYPE_CHECKING:
    from gossamer.train.loop import ModelFactory, Trainer, train
    from gossamer.train.run_events import ProgressEvent, TrainingListener, TrainResult
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

_HOMES = {
    "LocalStrategy": "gossamer.train.strategy",
    "TrainingStrategy": "gossamer.train.strategy",
    "ModelFactory": "gossamer.train.loop",
    "ProgressEvent": "gossamer.train.run_events",
    "TrainResult": "gossamer.train.run_events",
    "Trainer": "gossamer.train.loop",
    "TrainingListener": "gossamer.train.run_events",
    "train": "gossamer.train.loop",
}


__getattr__ = lazy_attributes(globals(), _HOMES)
