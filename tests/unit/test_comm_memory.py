"""The allocator settings for message buffers: applied once, harmless to repeat."""

from __future__ import annotations

import ctypes.util

from gossamer.comm.memory import keep_freed_memory


def test_applied_on_glibc_and_idempotent() -> None:
    first = keep_freed_memory()
    assert keep_freed_memory() is first
    if ctypes.util.find_library("c") is not None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        if hasattr(libc, "gnu_get_libc_version"):  # glibc: mallopt takes the settings
            assert first is True
