"""Work handed to a node's loop that the loop never runs is closed, not left unawaited."""

from __future__ import annotations

import asyncio
import gc
import inspect

import pytest

from gossamer.core.errors import DeadlineExceededError
from gossamer.net.bridge import NodeThread


async def _work() -> None:
    pass


def _thread_of(loop: asyncio.AbstractEventLoop) -> NodeThread:
    thread = object.__new__(NodeThread)  # (only its loop: no node, no socket)
    thread._loop = loop
    return thread


def test_work_a_stopped_loop_never_ran_is_closed_at_its_deadline() -> None:
    # Left as it was, it warned "coroutine ... was never awaited" at garbage collection, in
    # whatever test ran then (a DiLoCo failure mark of a peer whose node had stopped).
    loop = asyncio.new_event_loop()
    try:
        coroutine = _work()
        with pytest.raises(DeadlineExceededError):
            _thread_of(loop)._submit(coroutine, 0.01)
        assert inspect.getcoroutinestate(coroutine) == inspect.CORO_CLOSED
        gc.collect()
    finally:
        loop.close()


def test_work_handed_to_a_closed_loop_is_closed() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    coroutine = _work()
    with pytest.raises(RuntimeError):
        _thread_of(loop)._submit(coroutine, 0.01)
    assert inspect.getcoroutinestate(coroutine) == inspect.CORO_CLOSED
