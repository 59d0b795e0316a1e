"""A connection that heartbeats time out on, and that shows no other life, is closed.

gRPC leaves a connection whose packets are silently lost (NAT or conntrack state gone, a
partition that healed) in use until ``unacked_data_timeout_s``; heartbeats kept going over it,
so a live peer that a fresh dial reached was reported back only ~60 s later.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from gossamer.core.clock import FakeClock
from gossamer.core.errors import DeadlineExceededError
from gossamer.net.config import NodeConfig
from gossamer.net.connections import ConnectionPool, DialTarget, PeerConnection
from gossamer.net.counters import NetCounters
from gossamer.net.identity import Identity
from gossamer.proto import net_pb2

PEER = "peer-under-test"
PING = "/gossamer.net.v1.Dht/Ping"


class _FakeChannel:
    """Answers unary calls as told; consumes streaming requests; records its closing."""

    def __init__(self) -> None:
        self.answers = True
        self.closed = False

    def unary_unary(self, method: str, **kwargs: Any) -> Any:
        async def call(request: Any, **call_kwargs: Any) -> Any:
            if not self.answers:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details="Deadline Exceeded",
                )
            return net_pb2.PingResponse()

        return call

    def stream_unary(self, method: str, **kwargs: Any) -> Any:
        async def call(requests: Any, **call_kwargs: Any) -> Any:
            async for _ in requests:
                pass
            return net_pb2.BulkAck()

        return call

    async def close(self, grace: float | None) -> None:
        self.closed = True


def _pool_with(
    clock: FakeClock, *, watch_streams: bool = False
) -> tuple[ConnectionPool, PeerConnection, _FakeChannel]:
    """A pool holding one connection to PEER (opened at the clock's start) over a fake channel;
    with ``watch_streams``, the channel a dial makes (streaming progress noted as life)."""
    config = NodeConfig(keepalive_interval_s=10.0, keepalive_timeout_s=5.0)
    pool = ConnectionPool(
        Identity.generate(), config, clock, NetCounters(), lambda _: [], lambda: None
    )
    fake = _FakeChannel()
    channel: Any = fake
    if watch_streams:
        from gossamer.net.connections import _LivelyChannel

        channel = _LivelyChannel(fake, clock)
    connection = PeerConnection(
        peer_id=PEER,
        target=DialTarget("127.0.0.1:9"),
        channel=channel,
        metadata=(),
        opened_at_s=clock.monotonic(),
    )
    if watch_streams:
        channel.connection = connection
    pool._connections[PEER] = connection
    return pool, connection, fake


async def _heartbeat(pool: ConnectionPool) -> None:
    await pool.call(
        PEER,
        PING,
        net_pb2.PingRequest(),
        net_pb2.PingResponse,
        timeout_s=2.5,
        retry=False,
        use_breaker=False,
    )


def test_a_heartbeat_past_its_deadline_closes_a_connection_silent_for_the_keepalive_window() -> (
    None
):
    async def scenario() -> None:
        clock = FakeClock()
        pool, connection, fake = _pool_with(clock)
        await _heartbeat(pool)  # answered at 0
        fake.answers = False
        clock.advance(14.0)  # silent under keepalive_interval_s + keepalive_timeout_s: kept
        with pytest.raises(DeadlineExceededError):
            await _heartbeat(pool)
        assert pool.get(PEER) is connection
        clock.advance(1.5)
        with pytest.raises(DeadlineExceededError):
            await _heartbeat(pool)
        assert pool.get(PEER) is None, "the silent connection stayed in use"
        assert fake.closed

    asyncio.run(scenario())


def test_other_calls_past_their_deadlines_do_not_close_the_connection() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        pool, connection, fake = _pool_with(clock)
        fake.answers = False
        clock.advance(30.0)
        with pytest.raises(DeadlineExceededError):
            await pool.call(PEER, PING, net_pb2.PingRequest(), net_pb2.PingResponse, retry=False)
        assert pool.get(PEER) is connection

    asyncio.run(scenario())


def test_a_bulk_transfer_making_progress_keeps_a_connection_whose_heartbeats_time_out() -> None:
    # On a thin link busy both ways a heartbeat's answer queues behind the bulk data: the
    # transfer must not be killed for it.
    async def scenario() -> None:
        clock = FakeClock()
        pool, connection, fake = _pool_with(clock, watch_streams=True)
        fake.answers = False
        clock.advance(30.0)
        push = connection.channel.stream_unary("/gossamer.net.v1.Bulk/Push")
        await push(iter([b"a", b"b", b"c"]), timeout=60.0)
        assert connection.last_life_s == clock.monotonic()
        clock.advance(2.5)
        with pytest.raises(DeadlineExceededError):
            await _heartbeat(pool)
        assert pool.get(PEER) is connection
        assert not fake.closed

    asyncio.run(scenario())
