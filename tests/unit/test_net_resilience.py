"""Retries, the circuit breaker, the failure detector and error mapping, on a fake clock."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import grpc
import pytest

from gossamer.core.clock import FakeClock
from gossamer.core.errors import (
    AuthenticationError,
    DeadlineExceededError,
    NotInRoundError,
    PeerLostError,
    PeerUnavailableError,
    ProtocolError,
)
from gossamer.net.circuit_breaker import CircuitBreaker
from gossamer.net.config import BreakerConfig, HeartbeatConfig, RetryConfig
from gossamer.net.failure_detector import FailureDetector
from gossamer.net.grpc_errors import error_of_rpc_error, status_of_error
from gossamer.net.retry import backoff_s, retry_async

RETRY = RetryConfig(max_attempts=5, initial_backoff_s=0.1, max_backoff_s=1.0, total_deadline_s=10)


def test_retry_retries_retryable_errors_then_succeeds() -> None:
    clock = FakeClock()
    attempts: list[float] = []

    async def flaky() -> str:
        attempts.append(clock.monotonic())
        if len(attempts) < 3:
            raise PeerUnavailableError("down")
        return "ok"

    assert asyncio.run(retry_async(flaky, config=RETRY, clock=clock, what="t")) == "ok"
    assert len(attempts) == 3


@pytest.mark.parametrize(
    "error", [AuthenticationError("no"), ProtocolError("bad"), AssertionError()]
)
def test_retry_never_retries_fatal_errors(error: BaseException) -> None:
    calls = 0

    async def fails() -> None:
        nonlocal calls
        calls += 1
        raise error

    with pytest.raises(type(error)):
        asyncio.run(retry_async(fails, config=RETRY, clock=FakeClock(), what="t"))
    assert calls == 1


def test_retry_gives_up_at_the_total_deadline() -> None:
    clock = FakeClock()
    config = RetryConfig(
        max_attempts=1000, initial_backoff_s=1, max_backoff_s=4, total_deadline_s=10
    )

    async def always_down() -> None:
        raise PeerLostError("gone")

    with pytest.raises(DeadlineExceededError, match="gave up"):
        asyncio.run(retry_async(always_down, config=config, clock=clock, what="t"))
    assert clock.monotonic() <= 10


def test_backoff_grows_exponentially_with_jitter_under_the_cap() -> None:
    rng = random.Random(0)
    for attempt in range(1, 10):
        ceiling = min(RETRY.max_backoff_s, RETRY.initial_backoff_s * 2 ** (attempt - 1))
        waits = [backoff_s(attempt, RETRY, rng) for _ in range(50)]
        assert all(0 <= w <= ceiling for w in waits)
        assert len(set(waits)) > 1


def test_breaker_opens_after_threshold_half_opens_and_closes() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("p" * 52, BreakerConfig(failure_threshold=3, open_s=5), clock)
    for _ in range(3):
        breaker.before_call()
        breaker.failed()
    assert breaker.state == "open"
    with pytest.raises(PeerUnavailableError, match="circuit open"):
        breaker.before_call()
    clock.advance(5)
    assert breaker.state == "half-open"
    breaker.before_call()  # the one trial call
    with pytest.raises(PeerUnavailableError):
        breaker.before_call()
    breaker.succeeded()
    assert breaker.state == "closed"


def test_a_half_open_trial_that_ends_with_no_verdict_lets_the_next_call_try() -> None:
    # Its caller cancelled, or an error that says nothing of the peer: the trial stayed "in
    # flight" and the breaker refused every call after it, for good.
    clock = FakeClock()
    breaker = CircuitBreaker("p" * 52, BreakerConfig(failure_threshold=1, open_s=5), clock)
    assert not breaker.before_call()  # (closed: no trial)
    breaker.failed()
    clock.advance(5)
    assert breaker.before_call()  # the trial, cancelled
    breaker.settled()
    assert breaker.state == "half-open"
    assert breaker.before_call()  # the next one tries
    with pytest.raises(PeerUnavailableError):
        breaker.before_call()
    breaker.failed()
    breaker.settled()
    assert breaker.state == "open"


def test_a_fresh_connection_lets_one_trial_call_through_an_open_breaker_not_all() -> None:
    # Closed at once for every fresh connection, a peer that answers handshakes and hangs on
    # calls got five more calls to wait out their deadlines at each one.
    clock = FakeClock()
    breaker = CircuitBreaker("p" * 52, BreakerConfig(failure_threshold=3, open_s=30), clock)
    for _ in range(3):
        breaker.failed()
    assert breaker.state == "open"
    breaker.half_open()  # a fresh connection
    assert breaker.before_call()  # one trial
    with pytest.raises(PeerUnavailableError):
        breaker.before_call()  # and no more while it runs
    breaker.failed()  # it hung too
    breaker.settled()
    assert breaker.state == "open"  # for its whole open time again
    clock.advance(29)
    assert breaker.state == "open"
    breaker.half_open()
    assert breaker.before_call()
    breaker.succeeded()  # a live peer back on a new connection
    breaker.settled()
    assert breaker.state == "closed"
    breaker.half_open()  # (a closed breaker stays closed)
    assert breaker.state == "closed"


def _rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="d")


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (grpc.StatusCode.UNAVAILABLE, PeerUnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
        (grpc.StatusCode.UNAUTHENTICATED, AuthenticationError),
        (grpc.StatusCode.INVALID_ARGUMENT, ProtocolError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ProtocolError),
        (grpc.StatusCode.CANCELLED, PeerLostError),
        (grpc.StatusCode.INTERNAL, PeerLostError),
    ],
)
def test_grpc_errors_map_into_the_error_tree(code: grpc.StatusCode, kind: type) -> None:
    error = error_of_rpc_error(_rpc_error(code), "peer", "/x/Y")
    assert type(error) is kind
    assert "/x/Y to peer failed" in str(error)


def test_a_peer_gone_for_the_forget_time_is_no_longer_watched() -> None:
    # Every peer a long run ever averaged with kept a heartbeat loop (and a peer_up series).
    async def scenario() -> None:
        clock = FakeClock()
        config = HeartbeatConfig(interval_s=0.5, timeout_s=2.5, forget_after_s=60.0)
        calls: list[float] = []

        async def heartbeat(peer_id: str, timeout_s: float) -> None:
            calls.append(clock.monotonic())
            raise PeerUnavailableError("refused")  # killed: calls fail at once

        async with FailureDetector(heartbeat, config, clock) as detector:
            detector.watch("dead")
            gone_at = await detector.wait_for("dead", alive=False, timeout_s=5)
            for _ in range(10_000):  # fake time: bounded, each pass half a second
                if "dead" not in detector.watched:
                    break
                await asyncio.sleep(0)
            assert detector.watched == []
            assert detector.liveness("dead") is None
            assert calls[-1] - gone_at == pytest.approx(60.0, abs=0.6)
            made = len(calls)
            for _ in range(100):
                await asyncio.sleep(0)
            assert len(calls) == made  # no more heartbeats
            detector.watch("dead")  # watching again starts afresh
            assert detector.watched == ["dead"]

    asyncio.run(scenario())


def test_our_errors_map_to_statuses() -> None:
    assert status_of_error(AuthenticationError("a"))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert status_of_error(ProtocolError("p"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    # (a peer in no such round says so apart from a malformed message, and it arrives so)
    assert status_of_error(NotInRoundError("n"))[0] == grpc.StatusCode.FAILED_PRECONDITION
    refused = error_of_rpc_error(_rpc_error(grpc.StatusCode.FAILED_PRECONDITION), "p", "/x/Y")
    assert type(refused) is NotInRoundError
    assert status_of_error(PeerUnavailableError("u"))[0] == grpc.StatusCode.UNAVAILABLE
    assert status_of_error(RuntimeError("r"))[0] == grpc.StatusCode.INTERNAL


def test_detector_reports_a_silent_peer_gone_at_the_timeout_and_back_when_it_answers() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        config = HeartbeatConfig(interval_s=0.5, timeout_s=2.5)
        alive = {"a": True}
        changes: list[tuple[str, bool, float]] = []

        async def heartbeat(peer_id: str, timeout_s: float) -> None:
            if not alive[peer_id]:
                clock.advance(timeout_s)  # a paused peer: the call runs to its deadline
                raise DeadlineExceededError("no answer")

        async with FailureDetector(
            heartbeat, config, clock, lambda p, a: changes.append((p, a, clock.monotonic()))
        ) as detector:
            detector.watch("a")
            await detector.wait_for("a", alive=True, timeout_s=5)
            for _ in range(100):  # let a few heartbeats pass (fake time, bounded)
                await asyncio.sleep(0)
            alive["a"] = False
            silent_since = detector.liveness("a").last_answer_s  # type: ignore[union-attr]
            gone_at = await detector.wait_for("a", alive=False, timeout_s=5)
            assert gone_at - silent_since == pytest.approx(config.timeout_s, abs=0.01)
            alive["a"] = True
            await detector.wait_for("a", alive=True, timeout_s=5)
        assert [(p, a) for p, a, _ in changes] == [("a", False), ("a", True)]
        assert detector.watched == []

    asyncio.run(scenario())


class _StallingClock(FakeClock):
    """A fake clock whose next wait, once armed, overruns by ``stall_s``: the event loop of the
    node running it stalled (a GC pause, a long synchronous step)."""

    def __init__(self) -> None:
        super().__init__()
        self.stall_s = 0.0
        self.num_stalls = 0

    async def sleep_async(self, seconds: float) -> None:
        stall_s, self.stall_s = self.stall_s, 0.0
        self.num_stalls += stall_s > 0
        await super().sleep_async(seconds + stall_s)


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Let the detector's loop run (fake time) until ``condition``, within a bounded number of
    passes."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(what)


def test_a_stall_of_the_watcher_s_own_loop_does_not_report_a_live_peer_gone() -> None:
    # After the watcher's loop stalled past timeout - interval, the next heartbeat got 10 ms:
    # a peer with a longer round trip was reported gone, though it was never asked meanwhile.
    async def scenario() -> None:
        clock = _StallingClock()
        config = HeartbeatConfig(interval_s=0.5, timeout_s=2.5)
        round_trip_s = 0.03
        budgets: list[tuple[float, int]] = []  # (budget, stalls before it)
        changes: list[bool] = []

        async def heartbeat(peer_id: str, timeout_s: float) -> None:
            budgets.append((timeout_s, clock.num_stalls))
            if timeout_s < round_trip_s:
                clock.advance(timeout_s)
                raise DeadlineExceededError("no answer within the deadline")
            clock.advance(round_trip_s)

        async with FailureDetector(
            heartbeat, config, clock, lambda p, alive: changes.append(alive)
        ) as detector:
            detector.watch("far")
            await _until(lambda: len(budgets) >= 3, "three heartbeats")
            clock.stall_s = 3.2
            await _until(lambda: sum(n for _, n in budgets) >= 5, "five heartbeats after it")
            assert changes == []
            after_stall = next(budget for budget, n in budgets if n)
            assert after_stall == pytest.approx(config.timeout_s)  # a full budget
            assert detector.liveness("far").alive  # type: ignore[union-attr]

    asyncio.run(scenario())


def test_a_heartbeat_that_ends_far_past_a_short_deadline_is_not_a_verdict() -> None:
    # The watcher's loop stalled while a heartbeat with what was left of the budget was in
    # flight (the one before failed at once): the stall, not the peer, may have eaten it.
    async def scenario() -> None:
        clock = FakeClock()
        config = HeartbeatConfig(interval_s=0.5, timeout_s=2.5)
        calls: list[float] = []
        changes: list[bool] = []

        async def heartbeat(peer_id: str, timeout_s: float) -> None:
            calls.append(timeout_s)
            if len(calls) == 3:
                raise PeerUnavailableError("connection reset")  # (at once)
            if len(calls) == 4:
                assert timeout_s < config.timeout_s
                clock.advance(timeout_s + 3.0)
                raise DeadlineExceededError("no answer seen")

        async with FailureDetector(
            heartbeat, config, clock, lambda p, alive: changes.append(alive)
        ) as detector:
            detector.watch("p")
            await _until(lambda: len(calls) >= 6, "six heartbeats")
            assert changes == []
            assert calls[4] == pytest.approx(config.timeout_s)

    asyncio.run(scenario())


def test_a_stopped_peer_is_reported_gone_though_every_failure_is_seen_late() -> None:
    # The watcher's loop stalled every few seconds, so each heartbeat to a stopped peer failed
    # late; each was excused, the next sent at once into the next stall: never reported gone.
    async def scenario() -> None:
        clock = FakeClock()
        config = HeartbeatConfig(interval_s=0.5, timeout_s=2.5)
        num_calls = 0

        async def heartbeat(peer_id: str, timeout_s: float) -> None:
            nonlocal num_calls
            num_calls += 1
            if num_calls > 2:  # stopped: each call runs to its deadline, seen 0.6 s late
                clock.advance(timeout_s + 0.6)
                raise DeadlineExceededError("no answer")

        async with FailureDetector(heartbeat, config, clock) as detector:
            detector.watch("p")
            await _until(lambda: num_calls >= 2, "two answered heartbeats")
            stopped_at = clock.monotonic()
            gone_at = await detector.wait_for("p", alive=False, timeout_s=30)
            # (one failure on a budget shorter than the timeout is excused, once; the next,
            # on a full budget, counts)
            assert gone_at - stopped_at <= 2 * config.timeout_s + 2 * 0.6

    asyncio.run(scenario())


def test_a_peer_paused_during_the_watcher_s_stall_is_reported_gone_after_a_full_heartbeat() -> None:
    async def scenario() -> None:
        clock = _StallingClock()
        config = HeartbeatConfig(interval_s=0.5, timeout_s=2.5)
        calls: list[tuple[float, float]] = []  # (sent at, budget) after the stall

        async def heartbeat(peer_id: str, timeout_s: float) -> None:
            if clock.num_stalls:  # paused since: the call runs to its deadline
                calls.append((clock.monotonic(), timeout_s))
                clock.advance(timeout_s)
                raise DeadlineExceededError("no answer")

        async with FailureDetector(heartbeat, config, clock) as detector:
            detector.watch("p")
            await detector.wait_for("p", alive=True, timeout_s=5)
            clock.stall_s = 3.2
            gone_at = await detector.wait_for("p", alive=False, timeout_s=5)
            assert len(calls) == 1
            sent_at_s, budget_s = calls[0]
            assert budget_s == pytest.approx(config.timeout_s)
            assert gone_at == pytest.approx(sent_at_s + config.timeout_s)

    asyncio.run(scenario())
