"""The file-system seam of the store: durable writes, directory fsyncs, atomic renames, safe reads.

Everything the checkpoint store does to the disk goes through these few functions, so tests can
swap one of them for a faulty version and so the durability rules live in one place: a file's bytes
are fsynced before it is renamed into place, and a directory is fsynced after an entry in it is
created, renamed or removed. Reads open a file through a handle on its folder, never through a
symlink and never blocking on a FIFO or device, so that a folder from elsewhere cannot make a reader
follow a link out of it or hang.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

__all__ = [
    "exchange_dirs",
    "fsync_dir",
    "locked",
    "open_folder",
    "open_for_reading",
    "remove_tree",
    "rename",
    "write_file_durably",
]

# renameat2(2) flag that swaps two existing paths atomically (Linux >= 3.15, glibc >= 2.28).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def write_file_durably(path: Path, data: bytes | memoryview) -> None:
    """Create ``path`` (which must not exist), write ``data`` and fsync it before returning."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename(source: Path, target: Path) -> None:
    """Atomically rename ``source`` to ``target``; for directories ``target`` must not exist."""
    os.rename(source, target)


def _load_renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        func = ctypes.CDLL(name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return cast(Callable[[int, bytes, int, bytes, int], int], func)


_renameat2 = _load_renameat2()


def exchange_dirs(first: Path, second: Path) -> bool:
    """Swap two existing directories in one atomic step, where the OS and file system can.

    Returns:
        True if the two were swapped; False if atomic exchange is not supported here (the caller
        then falls back to two renames). Other failures raise ``OSError``.
    """
    if _renameat2 is None:
        return False
    result = _renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(first), None, str(second))


def open_folder(path: Path) -> int:
    """Open directory ``path`` (following a symlink to it) as a handle to open its files through.

    Files opened through the handle come from that one folder even if it is renamed, replaced or
    removed meanwhile. The caller closes it with ``os.close``.
    """
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_for_reading(name: str, *, folder_fd: int) -> int:
    """Open the entry ``name`` of the folder ``folder_fd`` for reading, never following a symlink.

    It is opened non-blocking, so a FIFO or device put in a file's place cannot hang the caller;
    the caller checks with ``os.fstat`` that it is a regular file before reading it, and closes
    the returned descriptor.

    Raises:
        FileNotFoundError: there is no entry ``name``.
        OSError: with ``errno.ELOOP`` if ``name`` is a symlink; any other failure to open it.
    """
    return os.open(
        name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder_fd
    )


def remove_tree(path: Path) -> None:
    """Remove a directory and everything in it (a link to one: the link only); a path that is
    already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_symlink():
            path.unlink()
        else:
            shutil.rmtree(path)


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_path`` (created if needed) for the block."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
