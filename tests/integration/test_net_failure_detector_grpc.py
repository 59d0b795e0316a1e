"""The failure detector on loopback gRPC: a stall of the watcher's own event loop in the turn a
heartbeat is sent is not the peer's silence."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gossamer.net.config import HeartbeatConfig, NodeConfig
from gossamer.net.connections import ConnectionPool, DialTarget
from gossamer.net.dht_service import DHT_METHODS
from gossamer.net.node import Node
from loopback_nodes import until

SECRET = b"failure-detector-test-secret-0123456789"
HEARTBEAT = HeartbeatConfig(interval_s=0.5, timeout_s=2.5)


def _config() -> NodeConfig:
    return NodeConfig(listen_address="127.0.0.1:0", swarm_secret=SECRET, heartbeat=HEARTBEAT)


def test_a_stall_in_the_turn_a_heartbeat_is_sent_does_not_report_the_live_peer_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The call was issued, then the loop stalled 2.1 s before the request went out: it ran past
    the heartbeat's 2.0 s budget, seen too soon after it to look like a stall, and the live peer
    was reported gone and back (a flap)."""

    async def scenario() -> None:
        async with Node(_config()) as a, Node(_config()) as b:
            await a.pool.dial(DialTarget(b.addresses[0]), expected_peer_id=b.peer_id)
            changes: list[bool] = []
            a.detector.add_observer(lambda peer_id, alive: changes.append(alive))
            loop = asyncio.get_running_loop()
            stalled_at: list[float] = []
            call = a.control_pool.call

            async def stalling_call(peer_id: str, method: str, *args: Any, **kwargs: Any) -> Any:
                is_heartbeat = method == DHT_METHODS["Ping"] and not kwargs.get("use_breaker", True)
                if is_heartbeat and len(stalled_at) == 1:  # armed: this heartbeat's turn stalls
                    stalled_at.append(time.monotonic())
                    # another task's synchronous step, run before the request is sent
                    loop.call_soon(time.sleep, 2.1)
                return await call(peer_id, method, *args, **kwargs)

            monkeypatch.setattr(a.control_pool, "call", stalling_call)
            a.detector.watch(b.peer_id)
            liveness = a.detector.liveness(b.peer_id)
            assert liveness is not None
            start = time.monotonic()
            await until(lambda: liveness.last_answer_s > start + 1.0, 10, "answered heartbeats")
            stalled_at.append(0.0)  # arm it
            await until(lambda: len(stalled_at) == 2, 5, "a heartbeat into the stall")
            await until(
                lambda: liveness.last_answer_s > stalled_at[1] + 3.0 or bool(changes),
                15,
                "heartbeats answered after the stall",
            )
            assert changes == [], "the live peer was reported gone for this node's own stall"

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_heartbeats_go_on_a_connection_of_their_own_closed_once_the_peer_is_unwatched() -> None:
    """Behind a round's megabytes on the data connection a heartbeat waited in the send
    buffer: on 2 Mbit/s links the detector reported every member of a round gone. Its own
    connection is not counted among the node's connections, and goes with the watch."""

    async def scenario() -> None:
        async with Node(_config()) as a, Node(_config()) as b:
            data = await a.pool.dial(DialTarget(b.addresses[0]), expected_peer_id=b.peer_id)
            a.detector.watch(b.peer_id)
            liveness = a.detector.liveness(b.peer_id)
            assert liveness is not None
            start = time.monotonic()
            await until(lambda: liveness.last_answer_s > start + 1.0, 10, "answered heartbeats")
            beating = a.control_pool.get(b.peer_id)
            assert beating is not None
            assert beating is not data
            assert a.pool.get(b.peer_id) is data
            assert dict(a.counters.connections) == {"direct": 1}, a.counters.connections
            await a.detector.unwatch(b.peer_id)
            assert a.control_pool.get(b.peer_id) is None
            assert a.pool.get(b.peer_id) is data

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_a_watched_peer_that_gets_dht_requests_during_an_upload_holds_one_control_connection() -> (
    None
):
    """Heartbeats and the DHT's requests behind an upload each had a connection of their own:
    a peer both watched and uploaded to held three (the data one, and two small ones). They
    share one now; the detector letting the peer go leaves it to the requests that used it."""

    async def scenario() -> None:
        async with Node(_config()) as a, Node(_config()) as b:
            data = await a.pool.dial(DialTarget(b.addresses[0]), expected_peer_id=b.peer_id)
            a.detector.watch(b.peer_id)
            liveness = a.detector.liveness(b.peer_id)
            assert liveness is not None
            start = time.monotonic()
            await until(lambda: liveness.last_answer_s > start + 1.0, 10, "answered heartbeats")
            data.num_uploads += 1  # (as an upload under way does: DHT requests leave it)
            try:
                await a.ping(b.peer_id)  # (the DHT's Ping, through its transport)
                pools = [v for v in vars(a).values() if isinstance(v, ConnectionPool)]
                beside = [p for p in pools if p is not a.pool and p.get(b.peer_id) is not None]
                assert len(beside) == 1, f"{len(beside)} connections beside the data one"
                control = beside[0].get(b.peer_id)
                assert control is not None
                assert control is not data
                assert a.pool.get(b.peer_id) is data
                assert dict(a.counters.connections) == {"direct": 1}, a.counters.connections
                await a.detector.unwatch(b.peer_id)
                assert beside[0].get(b.peer_id) is control, "closed under the DHT's requests"
                await a.ping(b.peer_id)
                assert beside[0].get(b.peer_id) is control
            finally:
                data.num_uploads -= 1

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))
