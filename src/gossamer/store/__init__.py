"""Storage: content-addressed blobs and the verified, atomic checkpoint format."""

from gossamer.core.errors import (
    CheckpointDiskFullError,
    CheckpointReadError,
    CheckpointWriteError,
)
from gossamer.store.checkpoint import CheckpointStore
from gossamer.store.checkpoint_state import CheckpointInfo, CheckpointState
from gossamer.store.optimizer_state import flatten_optimizer_state, unflatten_optimizer_state
from gossamer.store.rng_state import rng_state_capture, rng_state_restore

__all__ = [
    "CheckpointDiskFullError",
    "CheckpointInfo",
    "CheckpointReadError",
    "CheckpointState",
    "CheckpointStore",
    "CheckpointWriteError",
    "flatten_optimizer_state",
    "rng_state_capture",
    "rng_state_restore",
    "unflatten_optimizer_state",
]
