"""Keep freed message buffers in the process instead of giving them back to the kernel.

A round allocates and frees many multi-MiB message buffers. With glibc's defaults each one above
the mmap threshold is a fresh mapping, and the kernel zero-fills every page of it on first touch:
on the 2-core build VM that was about a quarter of a 100 MB loopback round's CPU (docs/comm.md).
Served from the heap, and with the heap not trimmed after every free, the same pages are reused
round after round. The process keeps its peak memory resident instead of returning it between
rounds; peak memory itself does not change.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

__all__ = ["keep_freed_memory"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20
"""glibc's largest mmap threshold on 64-bit systems; larger blocks are still mapped."""
_TRIM_THRESHOLD = 512 << 20

_lock = threading.Lock()
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Ask glibc to serve blocks up to 32 MiB from the heap and to keep up to 512 MiB freed.

    Applied once per process; later calls return the first answer.

    Returns:
        Whether the allocator took the settings (False where the C library is not glibc).
    """
    global _applied
    with _lock:
        if _applied is None:
            _applied = _apply()
        return _applied


def _apply() -> bool:
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )
    logger.debug("malloc settings for message buffers %s", "applied" if ok else "refused")
    return ok
