"""The errors of a checkpoint that could not be read or written for a reason of the disk's.

They belong to the error tree of :mod:`gossamer.core.errors` (under :class:`FatalError`: the cause,
a full disk or a file's permissions, has to be fixed first) and subclass ``OSError`` too, so a
caller that caught the ``OSError`` the store let through before still catches them::

    FatalError
    ├── CheckpointReadError            a checkpoint file or folder cannot be read (EACCES, EIO)
    └── CheckpointWriteError           a checkpoint could not be written (EIO, EROFS, ...)
        └── CheckpointDiskFullError    no room for it, even after removing older checkpoints
"""

from __future__ import annotations

from gossamer.core.errors import FatalError

__all__ = ["CheckpointDiskFullError", "CheckpointReadError", "CheckpointWriteError"]


class CheckpointReadError(FatalError, OSError):
    """A checkpoint's folder or one of its files cannot be read (no permission, an I/O error):
    no proof that it is damaged, so it is never deleted for it."""


class CheckpointWriteError(FatalError, OSError):
    """A checkpoint could not be written; nothing is left half written, and the checkpoints
    written before are kept."""


class CheckpointDiskFullError(CheckpointWriteError):
    """The disk (or the user's quota) has no room for a checkpoint, even after the older ones
    were removed. The message names the directory, the bytes needed and the bytes free."""
