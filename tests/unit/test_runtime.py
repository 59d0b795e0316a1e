"""The start-up heap freeze of peer processes (in a child process: it changes the whole one)."""

from __future__ import annotations

import subprocess
import sys

_CHILD = """
import gc
import weakref

from gossamer.core.runtime import freeze_startup_heap


class Node:
    pass


alive = [Node() for _ in range(1000)]
garbage = Node()
garbage.self = garbage  # a reference cycle: only the cyclic collector frees it
dead = weakref.ref(garbage)
del garbage
frozen = freeze_startup_heap()
assert dead() is None, "garbage alive at the freeze stays forever: collect it first"
assert frozen == gc.get_freeze_count() >= 1000
# Later collections walk only what was allocated since: none of the objects alive at the freeze.
assert len(gc.get_objects()) < 100
print("ok", frozen)
"""


def test_start_up_objects_are_frozen_after_garbage_is_collected() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")
