"""Failures detected are counted when the failure detector reports them, not when scraped."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from gossamer.core.clock import FakeClock
from gossamer.core.errors import DeadlineExceededError
from gossamer.net.config import HeartbeatConfig
from gossamer.net.failure_detector import FailureDetector
from gossamer.net.metrics import LiveView, NetMetricsCollector


def test_a_failure_that_came_and_went_between_scrapes_is_counted() -> None:
    clock = FakeClock()
    config = HeartbeatConfig(interval_s=0.5, timeout_s=2.5)
    alive = {"a": True}
    registry = CollectorRegistry()
    collector = NetMetricsCollector(lambda: {}, LiveView)
    registry.register(collector)
    seen: list[tuple[str, bool]] = []

    def failures() -> float | None:
        return registry.get_sample_value("gossamer_net_failures_detected_total")

    async def heartbeat(peer_id: str, timeout_s: float) -> None:
        if not alive[peer_id]:
            clock.advance(timeout_s)  # a paused peer: the call runs to its deadline
            raise DeadlineExceededError("no answer")

    async def scenario() -> None:
        async with FailureDetector(heartbeat, config, clock) as detector:
            detector.add_observer(collector.count_liveness_change)
            detector.add_observer(lambda p, a: seen.append((p, a)))
            detector.watch("a")
            await detector.wait_for("a", alive=True, timeout_s=5)
            assert failures() == 0
            for _ in range(2):  # gone and back twice, never scraped in between
                alive["a"] = False
                await detector.wait_for("a", alive=False, timeout_s=5)
                alive["a"] = True
                await detector.wait_for("a", alive=True, timeout_s=5)
            assert failures() == 2  # the live view says all is well; the events were counted
            detector.remove_observer(collector.count_liveness_change)
            alive["a"] = False
            await detector.wait_for("a", alive=False, timeout_s=5)
            assert failures() == 2  # no longer observed
        assert seen == [("a", False), ("a", True)] * 2 + [("a", False)]

    asyncio.run(scenario())
