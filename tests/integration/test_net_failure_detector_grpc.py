"""The failure detector on loopback gRPC: a stall of the watcher's own event loop in the turn a
heartbeat is sent is not the peer's silence."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gossamer.net.config import HeartbeatConfig, NodeConfig
from gossamer.net.connections import ConnectionPool, DialTarget, PeerConnection
from gossamer.net.dht_service import DHT_METHODS
from gossamer.net.identity import Identity
from gossamer.net.node import Node
from loopback_nodes import until

SECRET = b"failure-detector-test-secret-0123456789"
HEARTBEAT = HeartbeatConfig(interval_s=0.5, timeout_s=2.5)


def _config() -> NodeConfig:
    return NodeConfig(listen_address="127.0.0.1:0", swarm_secret=SECRET, heartbeat=HEARTBEAT)


async def _watch_over_a_data_connection(a: Node, b: Node) -> PeerConnection:
    """Dial ``a``'s data connection to ``b``, then watch ``b`` until its heartbeats have been
    answered for a second; returns the data connection."""
    data = await a.pool.dial(DialTarget(b.addresses[0]), expected_peer_id=b.peer_id)
    a.detector.watch(b.peer_id)
    liveness = a.detector.liveness(b.peer_id)
    assert liveness is not None
    start = time.monotonic()
    await until(lambda: liveness.last_answer_s > start + 1.0, 10, "answered heartbeats")
    return data


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
            call = a.heartbeat_pool.call

            async def stalling_call(peer_id: str, method: str, *args: Any, **kwargs: Any) -> Any:
                is_heartbeat = method == DHT_METHODS["Ping"] and not kwargs.get("use_breaker", True)
                if is_heartbeat and len(stalled_at) == 1:  # armed: this heartbeat's turn stalls
                    stalled_at.append(time.monotonic())
                    # another task's synchronous step, run before the request is sent
                    loop.call_soon(time.sleep, 2.1)
                return await call(peer_id, method, *args, **kwargs)

            monkeypatch.setattr(a.heartbeat_pool, "call", stalling_call)
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
            data = await _watch_over_a_data_connection(a, b)
            beating = a.heartbeat_pool.get(b.peer_id)
            assert beating is not None
            assert beating is not data
            assert a.pool.get(b.peer_id) is data
            assert dict(a.counters.connections) == {"direct": 1}, a.counters.connections
            await a.detector.unwatch(b.peer_id)
            assert a.heartbeat_pool.get(b.peer_id) is None
            assert a.pool.get(b.peer_id) is data

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_heartbeats_and_dht_requests_during_an_upload_go_on_two_connections_beside_the_data() -> (
    None
):
    """Sharing one control connection, a FindValue answer of up to 1 MiB held the heartbeat
    answers behind it: on 2 Mbit/s links a live peer was reported gone for 10 s. A peer both
    watched and uploaded to holds three connections (data, heartbeats, DHT), none of the two
    small ones counted among the node's connections; the DHT's goes once unused, not with the
    watch."""

    async def scenario() -> None:
        async with Node(_config()) as a, Node(_config()) as b:
            data = await _watch_over_a_data_connection(a, b)
            data.num_uploads += 1  # (as an upload under way does: DHT requests leave it)
            try:
                await a.ping(b.peer_id)  # (the DHT's Ping, through its transport)
                pools = [v for v in vars(a).values() if isinstance(v, ConnectionPool)]
                beside = [p.get(b.peer_id) for p in pools if p is not a.pool]
                opened = [c for c in beside if c is not None]
                assert len(opened) == 2, f"{len(opened)} connections beside the data one"
                beating = a.heartbeat_pool.get(b.peer_id)
                requesting = a.control_pool.get(b.peer_id)
                assert beating is not None
                assert requesting is not None
                assert len({id(beating), id(requesting), id(data)}) == 3
                assert dict(a.counters.connections) == {"direct": 1}, a.counters.connections
                await a.detector.unwatch(b.peer_id)
                assert a.heartbeat_pool.get(b.peer_id) is None
                assert a.control_pool.get(b.peer_id) is requesting
            finally:
                data.num_uploads -= 1

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_a_watched_peer_that_restarts_on_a_new_port_is_seen_alive_again() -> None:
    """Heartbeats dialled only where the old data connection went: a peer that restarted (same
    key) on another port stayed reported gone however long it answered at its new address.
    The heartbeat connection dials the directory's addresses after the old one."""

    async def scenario() -> None:
        identity = Identity.generate()
        async with Node(_config()) as a:
            b = Node(_config(), identity=identity)
            async with b:
                a.directory.learn(b.own_record())
                await a.pool.connection(b.peer_id)
                changes: list[bool] = []
                a.detector.add_observer(lambda peer_id, alive: changes.append(alive))
                a.detector.watch(b.peer_id)
                liveness = a.detector.liveness(b.peer_id)
                assert liveness is not None
                start = time.monotonic()
                await until(lambda: liveness.last_answer_s > start, 10, "answered heartbeats")
            await until(lambda: changes == [False], 15, "the stopped peer reported gone")
            async with Node(_config(), identity=identity) as b2:
                assert b2.addresses != b.addresses
                a.directory.learn(b2.own_record())
                await until(lambda: changes == [False, True], 20, "the restarted peer back")

    asyncio.run(asyncio.wait_for(scenario(), timeout=90))
