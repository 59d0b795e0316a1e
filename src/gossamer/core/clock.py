"""Time as an injectable dependency, so coordination logic can be tested with a fake clock."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

__all__ = ["Clock", "FakeClock", "Pacer", "SystemClock"]


class Clock(Protocol):
    """What coordination code needs from time: a monotonic reading, wall time and sleeping."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin; never goes backwards."""
        ...

    def wall(self) -> float:
        """Seconds since the Unix epoch (for records and logs, not for deadlines)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block the calling thread for ``seconds``."""
        ...

    async def sleep_async(self, seconds: float) -> None:
        """Suspend the calling coroutine for ``seconds``."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    async def sleep_async(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class FakeClock:
    """A clock that moves only when told to; sleeping advances it instantly.

    Args:
        start_s: the initial monotonic reading.
        wall_start_s: the initial wall-clock reading.
    """

    def __init__(self, start_s: float = 0.0, wall_start_s: float = 1_700_000_000.0) -> None:
        self._now = start_s
        self._wall_offset = wall_start_s - start_s

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go backwards (advance by {seconds} s)")
        self._now += seconds

    def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))

    async def sleep_async(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)


class Pacer:
    """Says, for each key, whether an event repeated without end (a warning about the same
    silent peer) is due again: at most once every ``interval_s``."""

    def __init__(self, interval_s: float, clock: Clock) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}

    def due(self, key: str) -> bool:
        """True the first time, then once ``interval_s`` has passed since the last True."""
        now = self._clock.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            return False
        self._last[key] = now
        return True

    def forget(self, key: str) -> None:
        """The next event of ``key`` is due at once (the trouble it was about ended)."""
        self._last.pop(key, None)
