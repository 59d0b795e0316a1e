"""The tasks an object started, cancelled and awaited on its close (no orphaned tasks), and
whether the running task is being cancelled."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any

__all__ = ["OwnedTasks", "being_cancelled"]


class OwnedTasks:
    """Tasks this object started and must cancel and await on close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coroutine: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel_all(self) -> None:
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()


def being_cancelled() -> bool:
    """Whether the running task has been asked to cancel (its own cancellation, not a
    ``CancelledError`` gRPC raised for a call that ended under it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
