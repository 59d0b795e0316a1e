"""Retries of the retryable errors only: exponential backoff with full jitter, a total deadline."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gossamer.core.clock import Clock
from gossamer.core.errors import DeadlineExceededError, is_retryable
from gossamer.net.config import RetryConfig

__all__ = ["backoff_s", "retry_async"]

_log = logging.getLogger(__name__)
T = TypeVar("T")


def backoff_s(attempt: int, config: RetryConfig, rng: random.Random) -> float:
    """The wait before retry ``attempt`` (1-based): uniform in [0, min(cap, base * 2^(n-1))]."""
    ceiling = min(config.max_backoff_s, config.initial_backoff_s * (2 ** (attempt - 1)))
    return rng.uniform(0.0, ceiling)


async def retry_async(
    operation: Callable[[], Awaitable[T]],
    *,
    config: RetryConfig,
    clock: Clock,
    what: str,
    rng: random.Random | None = None,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Run ``operation`` until it succeeds, retrying only retryable Gossamer errors.

    Fatal errors, assertion errors and cancellation propagate at once. No attempt starts after
    ``config.total_deadline_s``; a wait that would pass it is cut short and the last error raised.

    Args:
        operation: makes one attempt.
        config: attempts, backoff and the total deadline.
        clock: time source (a fake one in tests).
        what: names the operation in logs.
        rng: jitter source; a fresh one when omitted.
        on_retry: called with the error before each retry (for counters).

    Raises:
        The last error when attempts or time run out.
    """
    rng = rng or random.Random()
    deadline = clock.monotonic() + config.total_deadline_s
    attempt = 1
    while True:
        try:
            return await operation()
        except Exception as exc:
            if not is_retryable(exc) or attempt >= config.max_attempts:
                raise
            wait_s = backoff_s(attempt, config, rng)
            if clock.monotonic() + wait_s >= deadline:
                if isinstance(exc, DeadlineExceededError):
                    raise
                raise DeadlineExceededError(
                    f"{what}: gave up after {attempt} attempts within "
                    f"{config.total_deadline_s} s: {exc}"
                ) from exc
            _log.debug("%s: attempt %d failed (%s); retrying in %.3f s", what, attempt, exc, wait_s)
            if on_retry is not None:
                on_retry(exc)
            await clock.sleep_async(wait_s)
            attempt += 1
