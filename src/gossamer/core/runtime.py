"""Process-wide settings for a long-running peer process.

A peer imports torch, gRPC and numpy before it does any work: some 185,000 objects that live
until the process ends. Python's cyclic garbage collector walks all of them at every full
collection (about 75 ms each on the 2-core build machine), and a busy peer allocates enough
containers (asyncio handles, gRPC calls, tensors' Python wrappers) to trigger full collections
while it averages. :func:`freeze_startup_heap` moves the objects alive after start-up into the
collector's permanent generation (:func:`gc.freeze`), so later collections walk only what the
peer allocated since. 4 peer processes averaging 100 MB over loopback used 4-9% less CPU per
round with it (5 alternating runs, 2026-12-04). It is for entry points of processes Gossamer
owns (the CLI's peer commands, the benchmark workers), not for a library call: it changes the
whole process.
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["freeze_startup_heap", "lazy_attributes"]


def freeze_startup_heap() -> int:
    """Collect garbage, then keep every object alive now out of later collections.

    Returns:
        How many objects are frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def lazy_attributes(namespace: dict[str, Any], homes: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports each name of ``homes`` (name -> module) on first
    use and keeps it in ``namespace`` (the module's ``globals()``), for names whose modules
    are slow to import (torch)."""
    where = namespace["__name__"]

    def get(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {where!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        namespace[name] = value
        return value

    return get
