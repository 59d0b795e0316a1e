"""DHT requests on the control connection (``Node.control_pool``) beside an upload, on loopback.

A peer whose direct data connection uploads gets the DHT's requests on a small connection of
their own. These pin what that connection costs and counts: a frozen peer is given up within
the requests' own deadlines, its calls are in the node's metrics (but it is not one of the
node's connections), and timeouts a thin link explains do not open its breaker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from typing import Any

import pytest

from gossamer.core.errors import DeadlineExceededError, PeerUnavailableError
from gossamer.net.config import BreakerConfig, DhtConfig, NodeConfig
from gossamer.net.connections import DialTarget
from gossamer.net.dht_service import DHT_METHODS, DhtServicer
from gossamer.net.node import Node

SECRET = b"dht-control-pool-test-secret-0123456789"
RPC_S = 0.5
THRESHOLD = 2


def _config() -> NodeConfig:
    return NodeConfig(
        listen_address="127.0.0.1:0",
        swarm_secret=SECRET,
        connect_timeout_s=5.0,
        dht=DhtConfig(rpc_timeout_s=RPC_S),
        breaker=BreakerConfig(failure_threshold=THRESHOLD, open_s=60.0),
    )


def test_a_frozen_peer_under_an_upload_is_given_up_within_the_requests_deadlines() -> None:
    """The control connection was dialled under the node's connect deadline (5 s), outside its
    breaker: every request to a frozen peer took 5 s instead of its own 0.5 s, and none was
    ever refused. Here the data connection's target is a socket that takes TCP connections and
    never answers (as a SIGSTOPped peer's kernel does). While the detector does not report the
    peer gone the link explains a dial's timeout: each gets twice the request's deadline and
    counts neither way; once it is reported gone, each takes the request's deadline and
    counts."""

    async def scenario() -> None:
        with socket.socket() as frozen:
            frozen.bind(("127.0.0.1", 0))
            frozen.listen(16)
            frozen_at = f"127.0.0.1:{frozen.getsockname()[1]}"
            async with Node(_config()) as a, Node(_config()) as b:
                data = await a.pool.dial(DialTarget(b.addresses[0]), expected_peer_id=b.peer_id)
                moved = dataclasses.replace(data, target=DialTarget(frozen_at), num_uploads=1)
                a.pool._connections[b.peer_id] = moved  # (its control connection dials there)
                gone = False
                a.control._reported_gone = lambda _: gone
                took_s: list[float] = []
                for _ in range(THRESHOLD + 1):
                    started = time.monotonic()
                    with pytest.raises(DeadlineExceededError):
                        await a._transport.find_node(b.peer_id, b"t" * 32)
                    took_s.append(time.monotonic() - started)
                assert max(took_s) < 2 * RPC_S + 0.5, took_s
                assert a.control_pool.breakers[b.peer_id].state == "closed"
                gone = True  # (its heartbeats went unanswered: the link does not explain it)
                took_s = []
                for _ in range(THRESHOLD):
                    started = time.monotonic()
                    with pytest.raises(DeadlineExceededError):
                        await a._transport.find_node(b.peer_id, b"t" * 32)
                    took_s.append(time.monotonic() - started)
                assert max(took_s) < RPC_S + 0.5, took_s  # (the old code: 5 s each)
                started = time.monotonic()
                with pytest.raises(PeerUnavailableError, match="circuit open"):
                    await a._transport.find_node(b.peer_id, b"t" * 32)
                assert time.monotonic() - started < 0.2
                assert a.pool.breakers[b.peer_id].state == "closed"  # (bulk sends unaffected)
                a.pool._connections[b.peer_id] = data

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_a_control_connection_to_a_restarted_peer_s_old_incarnation_is_dialled_afresh() -> None:
    """A peer restarted (here on a new port) within ``CONTROL_IDLE_S`` of its last control
    connection: kept, that connection answered the first request of the next upload with
    UNAVAILABLE, a failure in its breaker."""

    async def scenario() -> None:
        async with Node(_config()) as a:
            b = Node(_config())
            await b.start()
            identity = b.identity
            try:
                a.directory.learn(b.own_record())
                data = await a.pool.connection(b.peer_id)
                data.num_uploads += 1
                await a._transport.find_node(b.peer_id, b"t" * 32)
                data.num_uploads -= 1
                old = a.control_pool.get(b.peer_id)
                assert old is not None
            finally:
                await b.stop()
            async with Node(_config(), identity=identity) as b2:
                a.directory.learn(b2.own_record())
                await a.pool.drop(b2.peer_id)
                data = await a.pool.connection(b2.peer_id)
                data.num_uploads += 1
                try:
                    await a._transport.find_node(b2.peer_id, b"t" * 32)  # (the old code: failed)
                    control = a.control_pool.get(b2.peer_id)
                    assert control is not None
                    assert control is not old
                    assert control.target.address == data.target.address
                    assert a.control_pool.breakers[b2.peer_id].num_consecutive_failures == 0
                finally:
                    data.num_uploads -= 1

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_requests_on_the_control_connection_are_counted_in_the_node_s_calls_not_connections() -> (
    None
):
    async def scenario() -> None:
        async with Node(_config()) as a, Node(_config()) as b:
            data = await a.pool.dial(DialTarget(b.addresses[0]), expected_peer_id=b.peer_id)
            before = a.counters.snapshot()
            data.num_uploads += 1
            try:
                for _ in range(3):
                    await a._transport.find_node(b.peer_id, b"t" * 32)
                assert a.control_pool.get(b.peer_id) is not None
            finally:
                data.num_uploads -= 1
            after = a.counters.snapshot()
            find_node = DHT_METHODS["FindNode"]
            calls = after["rpc_calls"].get(find_node, 0) - before["rpc_calls"].get(find_node, 0)
            assert calls == 3  # (the old code: 0, in a throwaway NetCounters)
            assert after["rpc_latency"][find_node]["num_calls"] >= 3
            traffic = after["peers"][b.peer_id]  # (the old code: no traffic with b at all)
            assert traffic["bytes_sent"] > 0
            assert traffic["bytes_received"] > 0
            assert traffic["num_rpcs_sent"] == 3
            # (the gossamer_net_connections gauge: the data connection alone)
            assert after["connections"] == {"direct": 1}, after["connections"]

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_timeouts_on_the_control_connection_behind_an_upload_do_not_open_its_breaker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A thin link's queue holds a FindNode past its deadline while the data connection
    uploads: counted, a few of them opened the control connection's breaker and the next small
    Store to the live peer was refused."""
    answer_late = asyncio.Event()
    answer_late.set()
    find_node = DhtServicer.FindNode

    async def late_find_node(self: DhtServicer, request: Any, context: Any) -> Any:
        if answer_late.is_set():
            await asyncio.sleep(2 * RPC_S)  # (a queue, not a synchronisation)
        return await find_node(self, request, context)

    monkeypatch.setattr(DhtServicer, "FindNode", late_find_node)

    async def scenario() -> None:
        async with Node(_config()) as a, Node(_config()) as b:
            data = await a.pool.dial(DialTarget(b.addresses[0]), expected_peer_id=b.peer_id)
            data.num_uploads += 1
            try:
                for _ in range(THRESHOLD + 1):
                    with pytest.raises(DeadlineExceededError):
                        await a._transport.find_node(b.peer_id, b"t" * 32)
                assert a.control_pool.get(b.peer_id) is not None
                assert a.control_pool.breakers[b.peer_id].state == "closed"
                answer_late.clear()
                # (the old code: refused, circuit open)
                await a._transport.ping(b.peer_id, with_record=False, timeout_s=RPC_S)
            finally:
                data.num_uploads -= 1

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))
