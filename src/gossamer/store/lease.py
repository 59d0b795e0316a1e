"""One process at a time in a run's checkpoint directory.

Two ``gossamer train`` processes given the same directory (two peers started from the same
config on one machine, say) shared its checkpoints, each saving its steps over the other's,
and a swarm peer's identity (its key file lives there by default), so both peers had one peer
id and one data stream. The first process to use the directory holds it until it exits.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from gossamer.core.errors import ConfigError

__all__ = ["IN_USE_NAME", "directory_lease"]

IN_USE_NAME = ".in-use"
"""The file a process holds a lock on while it uses the directory (its pid written in it)."""

_log = logging.getLogger(__name__)

_held: dict[Path, tuple[int, int]] = {}
"""Directories this process holds: resolved path -> (descriptor, holders in this process)."""
_held_lock = threading.Lock()


@contextlib.contextmanager
def directory_lease(directory: Path, key: str = "checkpoint.directory") -> Iterator[None]:
    """Hold ``directory`` for this process for the block (made if needed); holders within one
    process share it.

    Raises:
        ConfigError: another process holds it (named by ``key``, with that process's pid).
    """
    path = _acquire(directory, key)
    try:
        yield
    finally:
        _release(path)


def _acquire(directory: Path, key: str) -> Path:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{key}: {directory} cannot be made ({exc.strerror or exc}); give a folder this "
            "user can write"
        ) from exc
    path = directory.resolve()
    with _held_lock:
        if path in _held:
            fd, holders = _held[path]
            _held[path] = (fd, holders + 1)
            return path
        fd = _open_in_use_file(path / IN_USE_NAME, key)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _pid_in(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                # A file system without locks (some NFS and FUSE mounts): trained there before.
                _log.warning("%s: %s cannot be locked (%s); not guarded", key, path, exc)
                return _hold_nothing(path)
            raise ConfigError(
                f"{key}: {directory} is in use by another Gossamer process"
                f"{f' (pid {holder})' if holder else ''}; give each run, and each peer on this "
                "machine, its own directory"
            ) from None
        with contextlib.suppress(OSError):  # (opened read-only: another user made the file)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[path] = (fd, 1)
        return path


def _open_in_use_file(path: Path, key: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError as exc:
        if path.exists():  # another user's, in a shared folder: a lock needs no write
            return os.open(path, os.O_RDONLY)
        raise ConfigError(
            f"{key}: {path.parent} cannot be written ({exc.strerror}); give a folder this "
            "user can write"
        ) from exc


def _hold_nothing(path: Path) -> Path:
    """Count a holder of ``path`` with no lock behind it (a file system without locks)."""
    _held[path] = (-1, 1)
    return path


def _release(path: Path) -> None:
    with _held_lock:
        fd, holders = _held[path]
        if holders > 1:
            _held[path] = (fd, holders - 1)
            return
        del _held[path]
        if fd >= 0:
            os.close(fd)  # (the lock goes with it; the file stays, empty of meaning)


def _pid_in(fd: int) -> str:
    """The holder's pid as the file says it, where that process lives (a holder that opened
    the file read-only could not write its own: the pid there may be an earlier holder's)."""
    with contextlib.suppress(OSError, UnicodeDecodeError, ValueError):
        text = os.pread(fd, 32, 0).decode().strip()
        if text.isdigit():
            os.kill(int(text), 0)  # (ProcessLookupError where it is gone)
            return text
    return ""
