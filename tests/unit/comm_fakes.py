"""Test helpers for comm: a fake clock that jumps only when the loop is idle, inline offload, and
fake peers whose uplink has a rate."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from gossamer.comm.fake_transport import FakeNetwork, FakeTransport
from gossamer.comm.transport import Message, message_nbytes
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


class RateLimitedTransport(FakeTransport):
    """A fake peer whose uplink moves ``bytes_per_s``: one message on the wire at a time, each
    taking its size over the rate on the network's clock, then delivered (like a tbf-capped link
    that the peer's sends to every destination share).
    """

    def __init__(self, network: FakeNetwork, peer_id: str, bytes_per_s: float) -> None:
        super().__init__(network, peer_id)
        self.bytes_per_s = bytes_per_s
        self._wire = asyncio.Lock()

    @classmethod
    def join(cls, network: FakeNetwork, peer_id: str, bytes_per_s: float) -> RateLimitedTransport:
        """A new peer on ``network`` with an uplink of ``bytes_per_s``."""
        if peer_id in network.transports:
            raise ValueError(f"peer {peer_id} is already on the fake network")
        made = cls(network, peer_id, bytes_per_s)
        network.transports[peer_id] = made
        return made

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        async with self._wire:
            await self.network.clock.sleep_async(message_nbytes(message) / self.bytes_per_s)
        await super().send(peer_id, message, timeout_s=timeout_s)
