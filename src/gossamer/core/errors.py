"""The one error tree of Gossamer.

Every error Gossamer raises on purpose is a :class:`GossamerError`. Errors are split by what the
caller should do about them: a :class:`RetryableError` may go away if the same thing is tried again
later (a peer restarts, a link recovers); a :class:`FatalError` will not, and retrying only wastes
time. Library errors (gRPC, OS, safetensors) are mapped into this tree at the edge where they enter,
with ``raise ... from exc`` so the original stays visible.

::

    GossamerError
    ├── RetryableError                 try again, with backoff and a total deadline
    │   ├── PeerUnavailableError       could not reach the peer (refused, no route, relay down)
    │   ├── DeadlineExceededError      an operation ran past its deadline
    │   └── PeerLostError              a peer went away while working with us
    └── FatalError                     retrying will not help; fix the cause
        ├── ConfigError                a config key, type or value is wrong (also a ValueError)
        ├── DataError                  a data path is missing, empty or unreadable
        ├── TrainingDivergedError      the loss or the gradients became NaN or infinite
        ├── AveragingStalledError      one round failed on every member attempt after attempt
        ├── CorruptedDataError         bytes failed a hash or size check
        │   └── CheckpointCorruptedError   a checkpoint file is torn, truncated or altered
        ├── IncompatibleCheckpointError    a checkpoint was made for another model or format
        ├── CheckpointReadError        a checkpoint file or folder cannot be read (also an OSError)
        ├── CheckpointWriteError       a checkpoint could not be written (also an OSError)
        │   └── CheckpointDiskFullError    no room for it, even after removing older checkpoints
        ├── AuthenticationError        a peer could not prove its identity or the swarm secret
        ├── ProtocolError              a peer sent a malformed or oversized message
        │   └── NotInRoundError        the peer runs no such averaging round (alone, other group)
        └── MissingDependencyError     a system tool or package the feature needs is absent
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "AveragingStalledError",
    "CheckpointCorruptedError",
    "CheckpointDiskFullError",
    "CheckpointReadError",
    "CheckpointWriteError",
    "ConfigError",
    "CorruptedDataError",
    "DataError",
    "DeadlineExceededError",
    "FatalError",
    "GossamerError",
    "IncompatibleCheckpointError",
    "MissingDependencyError",
    "NotInRoundError",
    "PeerLostError",
    "PeerUnavailableError",
    "ProtocolError",
    "RetryableError",
    "TrainingDivergedError",
    "is_retryable",
]


class GossamerError(Exception):
    """Base of every error Gossamer raises on purpose."""


class RetryableError(GossamerError):
    """The same operation may succeed if tried again later."""


class PeerUnavailableError(RetryableError):
    """A peer could not be reached (connection refused, no route, relay gone)."""


class DeadlineExceededError(RetryableError):
    """An operation did not finish before its deadline."""


class PeerLostError(RetryableError):
    """A peer stopped answering while an operation with it was in flight."""


class FatalError(GossamerError):
    """Retrying will not help: the cause has to be fixed first."""


class ConfigError(FatalError, ValueError):
    """A config key, type or value is wrong. The message names the key and the fix."""


class DataError(FatalError):
    """A dataset path is missing, empty or unreadable."""


class TrainingDivergedError(FatalError):
    """The loss or the gradients became NaN or infinite: stepping on would spread them."""


class AveragingStalledError(FatalError):
    """One averaging round failed on every member attempt after attempt: nobody's global
    weights move, and training on would throw every peer's work away at the end."""


class CorruptedDataError(FatalError):
    """Bytes failed a hash, size or format check."""


class CheckpointCorruptedError(CorruptedDataError):
    """A checkpoint file is torn, truncated or altered."""


class CheckpointReadError(FatalError, OSError):
    """A checkpoint's folder or one of its files cannot be read (no permission, an I/O error):
    no proof that it is damaged, so it is never deleted for it. Also an ``OSError``: callers
    that caught what the store let through before still catch it."""


class CheckpointWriteError(FatalError, OSError):
    """A checkpoint could not be written; nothing is left half written, and the checkpoints
    written before are kept. Also an ``OSError``, as :class:`CheckpointReadError` is."""


class CheckpointDiskFullError(CheckpointWriteError):
    """The disk (or the user's quota) has no room for a checkpoint, even after the older ones
    were removed. The message names the directory, the bytes needed and the bytes free."""


class IncompatibleCheckpointError(FatalError):
    """A checkpoint was written for another model config or an unknown format version."""


class AuthenticationError(FatalError):
    """A peer could not prove the key behind its id, or the swarm secret."""


class ProtocolError(FatalError):
    """A peer sent a message that is malformed, oversized or out of order."""


class NotInRoundError(ProtocolError):
    """A message of an averaging round reached a peer that runs no such round: it averaged
    alone or by other means, or it is in another group's round of the same key."""


class MissingDependencyError(FatalError):
    """A system tool or optional package that a feature needs is not installed."""


def is_retryable(exc: BaseException) -> bool:
    """Whether ``exc`` belongs to the retryable set (never assertion or cancellation errors)."""
    return isinstance(exc, RetryableError)
