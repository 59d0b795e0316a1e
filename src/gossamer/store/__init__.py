"""Storage: content-addressed blobs and the verified, atomic checkpoint format."""

from gossamer.store.checkpoint import (
    CheckpointDiskFullError,
    CheckpointInfo,
    CheckpointReadError,
    CheckpointState,
    CheckpointStore,
    CheckpointWriteError,
    flatten_optimizer_state,
    rng_state_capture,
    rng_state_restore,
    unflatten_optimizer_state,
)

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
