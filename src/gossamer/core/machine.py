"""What the machine a process runs on offers."""

from __future__ import annotations

import os

__all__ = ["physical_memory_bytes"]


def physical_memory_bytes() -> int | None:
    """This machine's memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # (no sysconf, or no such name: Windows)
        return None
