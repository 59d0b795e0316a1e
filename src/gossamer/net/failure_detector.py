"""Failure detection by heartbeats between peers that work together.

Each watched peer gets its own heartbeat loop. A heartbeat waits at most until the peer's gone
deadline (``timeout_s`` after its last answered heartbeat), so a peer that was killed (calls fail
at once) or paused (calls hang) is reported gone ``timeout_s`` after it last answered, not later.
A gone peer keeps being probed; when it answers again (for instance restarted with the same key,
so the same peer id) it is reported back. One gone for ``forget_after_s`` is no longer watched.
A stall of this node's own event loop is not the peer's silence: the first heartbeat after one
gets a full ``timeout_s``, and a peer is reported gone only after a heartbeat that had a real
budget went unanswered. The loop's lag is measured across each heartbeat's wait: one whose
budget the loop's own stall ate (the call was issued, then the loop stalled before it sent the
request) is not counted either, but only while the peer's silence is short, so that a stopped
peer is still reported gone within ``3 * timeout_s`` (and the stalls in progress then) however
the loop stalls. Only the stall within a heartbeat's budget counts: one past its deadline, while
its failure waits to be seen, ate none of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gossamer.core.clock import Clock
from gossamer.core.errors import DeadlineExceededError, GossamerError
from gossamer.net.config import HeartbeatConfig
from gossamer.net.identity import short_peer_id

__all__ = ["FailureDetector", "PeerLiveness"]

_log = logging.getLogger(__name__)
Heartbeat = Callable[[str, float], Awaitable[None]]
_MAX_LAG_OF_INTERVAL = 0.5
"""A wait or a heartbeat that ends later than planned by over this share of the interval means
this node's own event loop stalled (the peer's silence in that time is not the peer's)."""
_MAX_EXCUSED_SILENCE_OF_TIMEOUT = 2.0
"""A heartbeat whose budget this node's stall ate is not counted only while the peer has been
silent for less than this many ``timeout_s``: a loop stalled through every heartbeat must not
keep a stopped peer from being reported gone."""


@dataclass(slots=True)
class PeerLiveness:
    """What the detector knows about one watched peer."""

    peer_id: str
    """The watched peer."""
    alive: bool
    """Whether it answered within the timeout."""
    last_answer_s: float
    """Monotonic time of its last answered heartbeat (or of the start of watching)."""
    changed_at_s: float
    """Monotonic time of the last change between alive and gone."""


class _LoopLag:
    """How long this node's event loop was held up (by its own stalls, not by waiting) within a
    window while something ran: a ticker task wakes every ``tick_s`` and sums how late each
    wake-up came, the part of it inside the window only (a stall after a heartbeat's deadline,
    while its failure waited to be seen, ate none of its budget).

    The ticker is due at once: if the loop turned at all, it ran before the awaited thing
    resumed. If it never ran, nothing was awaited, so no other task could hold the loop up.
    """

    def __init__(self, clock: Clock, tick_s: float, window_s: float) -> None:
        self._clock = clock
        self._tick_s = tick_s
        self._due_s = clock.monotonic()
        self._end_s = self._due_s + window_s
        self._started = False
        self.stalled_s = 0.0
        """Seconds the loop was held up past a wake-up within the window so far."""
        self._task = asyncio.get_running_loop().create_task(self._tick(), name="loop-lag")

    def _note(self) -> None:
        now = self._clock.monotonic()
        self.stalled_s += max(0.0, min(now, self._end_s) - self._due_s)
        self._due_s = max(self._due_s, now)

    async def _tick(self) -> None:
        self._started = True
        while True:
            self._note()
            self._due_s += self._tick_s
            await self._clock.sleep_async(self._tick_s)

    def stop(self) -> float:
        """Stop the ticker; returns the seconds of stall it measured (a wake-up overdue now
        included: the loop was held up until this call). Not awaited: a heartbeat costs its
        loop no extra turn, and a heartbeat's coroutine closed with its loop (never cancelled)
        has nothing to wait on in its ``finally``."""
        if self._started:
            self._note()
        self._task.cancel()
        return self.stalled_s


class FailureDetector:
    """Heartbeats to watched peers (an async context manager that owns their tasks).

    Args:
        heartbeat: sends one heartbeat to a peer with a deadline in seconds; raises a Gossamer
            error if it was not answered.
        config: interval and timeout.
        clock: time source.
        on_change: called with (peer id, alive) each time a peer goes or comes back.
        own_peer_id: this node's id, for logs.
        on_unwatched: awaited with a peer's id once it is no longer watched (unwatched, or
            gone for ``forget_after_s``): what was kept for its heartbeats can go.
    """

    def __init__(
        self,
        heartbeat: Heartbeat,
        config: HeartbeatConfig,
        clock: Clock,
        on_change: Callable[[str, bool], None] | None = None,
        own_peer_id: str = "",
        on_unwatched: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._heartbeat = heartbeat
        self._on_unwatched = on_unwatched
        self._config = config
        self._clock = clock
        self._on_change = on_change
        self._own = short_peer_id(own_peer_id)
        self._observers: list[Callable[[str, bool], None]] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._liveness: dict[str, PeerLiveness] = {}
        self._changed = asyncio.Condition()

    def watch(self, peer_id: str) -> None:
        """Start heartbeats to ``peer_id`` (no-op if already watched)."""
        if peer_id in self._tasks:
            return
        now = self._clock.monotonic()
        self._liveness[peer_id] = PeerLiveness(peer_id, True, now, now)
        self._tasks[peer_id] = asyncio.get_running_loop().create_task(
            self._run(peer_id), name=f"heartbeat-{short_peer_id(peer_id)}"
        )

    async def unwatch(self, peer_id: str) -> None:
        """Stop heartbeats to ``peer_id`` and forget it."""
        task = self._tasks.pop(peer_id, None)
        self._liveness.pop(peer_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._on_unwatched is not None:
            await self._on_unwatched(peer_id)

    def add_observer(self, observer: Callable[[str, bool], None]) -> None:
        """Also call ``observer`` with (peer id, alive) at each change (metrics count them).

        It runs on the event loop, after ``on_change``; it must be quick and never raise.
        """
        self._observers.append(observer)

    def remove_observer(self, observer: Callable[[str, bool], None]) -> None:
        """Stop calling ``observer`` (no-op if it was not added)."""
        if observer in self._observers:
            self._observers.remove(observer)

    def liveness(self, peer_id: str) -> PeerLiveness | None:
        """The state of a watched peer."""
        return self._liveness.get(peer_id)

    @property
    def watched(self) -> list[str]:
        """Peers being watched."""
        return list(self._tasks)

    async def wait_for(self, peer_id: str, *, alive: bool, timeout_s: float) -> float:
        """Wait until ``peer_id`` is reported alive (or gone); returns the monotonic time it was.

        Raises:
            DeadlineExceededError: it did not happen within ``timeout_s``.
        """
        try:
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(
                    lambda: (s := self._liveness.get(peer_id)) is not None and s.alive == alive
                )
        except TimeoutError as exc:
            state = "alive" if alive else "gone"
            raise DeadlineExceededError(
                f"peer {short_peer_id(peer_id)} was not reported {state} within {timeout_s} s"
            ) from exc
        return self._liveness[peer_id].changed_at_s

    async def _run(self, peer_id: str) -> None:
        interval_s, timeout_s = self._config.interval_s, self._config.timeout_s
        max_lag_s = interval_s * _MAX_LAG_OF_INTERVAL
        lagged = False  # this node's own event loop stalled since the last heartbeat that counted
        excused = False  # a late failure was excused since the peer last answered
        while True:
            state = self._liveness[peer_id]
            started = self._clock.monotonic()
            # Never wait past the moment the peer would be declared gone; but after a stall of
            # this node's own loop (a GC pause, a long synchronous step) that moment may have
            # passed while no heartbeat was sent: the next one gets a full budget (it got
            # 10 ms, and a peer farther than that was declared gone for this node's stall).
            budget_s = state.last_answer_s + timeout_s - started if state.alive else interval_s
            if lagged and state.alive:
                budget_s = timeout_s
            budget_s = max(min(budget_s, timeout_s), 0.01)
            # (The call is issued in this turn and its request sent in a later one: a stall in
            # between ate a budget of 2.0 s, and the failure, seen 2.1 s after it was sent,
            # was counted: the live peer was reported gone and back.)
            lag = _LoopLag(self._clock, max_lag_s / 2, budget_s)
            try:
                await self._heartbeat(peer_id, budget_s)
                answered = True
            except GossamerError as exc:
                answered = False
                _log.debug("peer %s: heartbeat to %s failed: %s", self._own, peer_id[:12], exc)
            finally:
                stalled_s = lag.stop()
            now = self._clock.monotonic()
            # A failed heartbeat that ended well past a budget shorter than timeout_s: this
            # loop's stall may have eaten the budget, so it says nothing of the peer, once per
            # silence. One with the full budget is the peer's silence however late it is seen
            # (gRPC's core holds the deadline on its own threads, and an answer within it
            # completes the call): excused too, a stopped peer was never reported gone while
            # the watcher's loop stalled every few seconds (each failure seen late).
            late = (
                not answered
                and budget_s < timeout_s - 1e-3
                and not excused
                and now - started - budget_s > max_lag_s
            )
            excused = (excused or late) and not answered
            # A failed heartbeat the loop's own stall left less than max_lag_s of its budget:
            # the peer was hardly asked. Not counted, however often, while the silence is short.
            eaten = (
                not answered
                and state.alive
                and stalled_s > max_lag_s
                and budget_s - stalled_s < max_lag_s
                and now - state.last_answer_s < _MAX_EXCUSED_SILENCE_OF_TIMEOUT * timeout_s
            )
            lagged = late or eaten
            if late:
                _log.info(
                    "peer %s: heartbeat to %s ended %.1f s past its deadline (this node's event "
                    "loop stalled); not counted",
                    self._own,
                    peer_id[:12],
                    now - started - budget_s,
                )
            elif eaten:
                _log.info(
                    "peer %s: this node's event loop stalled %.1f s of the %.1f s heartbeat to "
                    "%s; not counted",
                    self._own,
                    stalled_s,
                    budget_s,
                    peer_id[:12],
                )
            elif answered:
                state.last_answer_s = now
                if not state.alive:
                    await self._set(state, True, now)
            elif state.alive and now - state.last_answer_s >= timeout_s - 1e-3:
                await self._set(state, False, now)
            elif not state.alive and now - state.changed_at_s >= self._config.forget_after_s:
                _log.info(
                    "peer %s: no longer watching %s (gone for %.0f s)",
                    self._own,
                    peer_id[:12],
                    now - state.changed_at_s,
                )
                del self._tasks[peer_id], self._liveness[peer_id]
                if self._on_unwatched is not None:
                    await self._on_unwatched(peer_id)
                return
            wait_s = 0.0 if lagged else max(0.0, interval_s - (now - started))
            await self._clock.sleep_async(wait_s)
            overshot_s = self._clock.monotonic() - now - wait_s
            if overshot_s > max_lag_s:
                lagged = True
                _log.info(
                    "peer %s: event loop stalled %.1f s; the next heartbeat to %s gets a full "
                    "%.1f s",
                    self._own,
                    overshot_s,
                    peer_id[:12],
                    timeout_s,
                )

    async def _set(self, state: PeerLiveness, alive: bool, now: float) -> None:
        state.alive = alive
        state.changed_at_s = now
        if alive:
            _log.info("peer %s: peer %s is back", self._own, state.peer_id)
        else:
            _log.warning(
                "peer %s: peer %s is gone (no heartbeat answered for %.1f s)",
                self._own,
                state.peer_id,
                now - state.last_answer_s,
            )
        if self._on_change is not None:
            self._on_change(state.peer_id, alive)
        for observer in list(self._observers):
            observer(state.peer_id, alive)
        async with self._changed:
            self._changed.notify_all()

    async def close(self) -> None:
        """Stop every heartbeat loop and wait for it to end."""
        for peer_id in list(self._tasks):
            await self.unwatch(peer_id)

    async def __aenter__(self) -> FailureDetector:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
