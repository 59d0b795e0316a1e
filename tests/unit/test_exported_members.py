"""The public API is a short, deliberate list: changing it is a decision, not an accident."""

from __future__ import annotations

import gossamer

EXPECTED = {
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
}


def test_all_is_pinned() -> None:
    assert set(gossamer.__all__) == EXPECTED


def test_every_exported_name_exists() -> None:
    for name in gossamer.__all__:
        assert hasattr(gossamer, name), name
