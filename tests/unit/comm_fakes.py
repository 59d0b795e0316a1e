"""Test helpers for comm: a fake clock that jumps only when the loop is idle, inline offload."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from gossamer.core.clock import FakeClock

T = TypeVar("T")


async def inline_offload(fn: Callable[[], T]) -> T:
    """Run numeric work on the loop: with the in-memory transport nothing then runs off-loop,
    so "the loop has nothing ready" means "everybody is waiting for time to pass"."""
    return fn()


class IdleJumpClock(FakeClock):
    """A FakeClock whose ``sleep_async`` parks until the loop is idle; then time jumps.

    Like trio's autojump MockClock: deadlines fire only once every peer is blocked, so a
    timeout in a test means "nothing else could have happened", never "the test machine was slow".
    It reads asyncio's private ready queue to tell idleness (test-only).
    """

    def __init__(self) -> None:
        super().__init__()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    async def sleep_async(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self.monotonic() + max(0.0, seconds), next(self._order), future)
        heapq.heappush(self._sleepers, entry)
        await future

    async def run(self, coro: Coroutine[Any, Any, T], max_jumps: int = 100_000) -> T:
        """Run ``coro``, moving time to the next sleeper whenever the loop is idle."""
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(coro)
        for _ in range(max_jumps):
            for _ in range(1_000_000):
                await asyncio.sleep(0)
                if task.done() or not loop._ready:  # type: ignore[attr-defined]
                    break
            if task.done():
                return task.result()
            while self._sleepers and self._sleepers[0][2].done():
                heapq.heappop(self._sleepers)
            if not self._sleepers:
                task.cancel()
                raise AssertionError("deadlock: nothing is ready and nothing sleeps")
            wake_at, _, future = heapq.heappop(self._sleepers)
            self.advance(max(0.0, wake_at - self.monotonic()))
            future.set_result(None)
        task.cancel()
        raise AssertionError(f"still running after {max_jumps} clock jumps")
