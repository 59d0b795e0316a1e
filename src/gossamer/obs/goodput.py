"""Goodput: how much of a peer's time turned into training that was kept.

Throughput counts every token a peer pushed through its model; goodput counts only the tokens of
steps whose result was kept (a step rolled back by a failure, or a contribution dropped from a
round, is not goodput), over wall time. Its ratio to the peer's own compute-only rate says what
share of the machine's capacity the swarm turned into progress.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from gossamer.core.clock import Clock, SystemClock

__all__ = ["GoodputSnapshot", "GoodputTracker"]


@dataclass(frozen=True, kw_only=True, slots=True)
class GoodputSnapshot:
    """Goodput figures at one moment."""

    wall_s: float
    """Seconds since tracking started."""
    compute_s: float
    """Seconds spent computing (forward, backward, optimizer)."""
    tokens_processed: int
    """Every token pushed through the model."""
    tokens_kept: int
    """Tokens of steps whose result was kept."""
    tokens_discarded: int = 0
    """Tokens of steps whose result was thrown away (``tokens_processed - tokens_kept``)."""

    @property
    def goodput_tokens_per_s(self) -> float:
        """Kept tokens per wall second."""
        return self.tokens_kept / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def compute_tokens_per_s(self) -> float:
        """The peer's compute-only rate: tokens per second of compute, no communication."""
        return self.tokens_processed / self.compute_s if self.compute_s > 0 else 0.0

    @property
    def goodput_ratio(self) -> float:
        """Goodput over the compute-only rate: 1.0 means no time or work was lost."""
        rate = self.compute_tokens_per_s
        return self.goodput_tokens_per_s / rate if rate > 0 else 0.0


class GoodputTracker:
    """Counts processed and kept tokens and compute time; thread-safe.

    Args:
        clock: time source for wall time.
    """

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self._started = self._clock.monotonic()
        self._lock = threading.Lock()
        self._compute_s = 0.0
        self._processed = 0
        self._kept = 0
        self._discarded = 0

    def add_compute(self, seconds: float) -> None:
        """Count ``seconds`` of compute."""
        with self._lock:
            self._compute_s += seconds

    def add_step(self, tokens: int, *, kept: bool = True) -> None:
        """Count a step of ``tokens``; ``kept`` is False when its result was thrown away."""
        with self._lock:
            self._processed += tokens
            if kept:
                self._kept += tokens
            else:
                self._discarded += tokens

    def discard(self, tokens: int) -> None:
        """Take back ``tokens`` counted as kept (a later failure rolled them back)."""
        with self._lock:
            taken = min(self._kept, tokens)
            self._kept -= taken
            self._discarded += taken

    def snapshot(self) -> GoodputSnapshot:
        """The figures now."""
        with self._lock:
            return GoodputSnapshot(
                wall_s=self._clock.monotonic() - self._started,
                compute_s=self._compute_s,
                tokens_processed=self._processed,
                tokens_kept=self._kept,
                tokens_discarded=self._discarded,
            )
