"""A connection that heartbeats time out on, and that shows no other life, is closed.

gRPC leaves a connection whose packets are silently lost (NAT or conntrack state gone, a
partition that healed) in use until ``unacked_data_timeout_s``; heartbeats kept going over it,
so a live peer that a fresh dial reached was reported back only ~60 s later. One with a bulk
upload under way is kept: a chunk shows no life until it is through. Nor do calls that run out
of time behind such an upload count in the peer's circuit breaker.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from gossamer.core.clock import FakeClock
from gossamer.core.errors import DeadlineExceededError, PeerUnavailableError
from gossamer.net.bulk import PUSH_METHOD, PUSH_ONE_METHOD, send_bulk
from gossamer.net.config import NodeConfig
from gossamer.net.connections import ConnectionPool, DialTarget, PeerConnection
from gossamer.net.counters import NetCounters
from gossamer.net.identity import Identity
from gossamer.net.node import Node
from gossamer.proto import net_pb2

PEER = "peer-under-test"
PING = "/gossamer.net.v1.Dht/Ping"
FIND_NODE = "/gossamer.net.v1.Dht/FindNode"


class _FakeChannel:
    """Answers unary calls as told; consumes streaming requests; records its closing. With
    ``hold_uploads``, a bulk upload (PushOne, or Push after its first message) is held until
    ``upload_through`` is set, then fails if ``upload_fails``."""

    def __init__(self) -> None:
        self.answers = True
        self.closed = False
        self.upload_started = asyncio.Event()
        self.upload_through = asyncio.Event()
        self.upload_fails = False
        self.hold_uploads = False
        self.call_sent = asyncio.Event()
        self.call_timed_out: asyncio.Event | None = None
        """When set, an unanswered call runs out of time only once this is set."""

    async def _upload(self) -> Any:
        if not self.hold_uploads:
            return net_pb2.BulkAck(transfer_complete=True)
        self.upload_started.set()
        await self.upload_through.wait()
        if self.upload_fails:
            raise _deadline_exceeded()
        return net_pb2.BulkAck(transfer_complete=True)

    def unary_unary(self, method: str, **kwargs: Any) -> Any:
        async def call(request: Any, **call_kwargs: Any) -> Any:
            if method == PUSH_ONE_METHOD:
                return await self._upload()
            if not self.answers:
                self.call_sent.set()
                if self.call_timed_out is not None:
                    await self.call_timed_out.wait()
                raise _deadline_exceeded()
            return net_pb2.PingResponse()

        return call

    def stream_unary(self, method: str, **kwargs: Any) -> Any:
        async def call(requests: Any, **call_kwargs: Any) -> Any:
            requests = aiter(requests)
            await anext(requests)
            ack = await self._upload()
            async for _ in requests:
                pass
            return ack

        return call

    async def close(self, grace: float | None) -> None:
        self.closed = True


def _deadline_exceeded() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="Deadline Exceeded",
    )


CONFIG = NodeConfig(keepalive_interval_s=10.0, keepalive_timeout_s=5.0)


def _pool_with(
    clock: FakeClock, *, watch_streams: bool = False, pool: ConnectionPool | None = None
) -> tuple[ConnectionPool, PeerConnection, _FakeChannel]:
    """A pool (``pool``, or a fresh one) holding one connection to PEER (opened at the clock's
    start) over a fake channel; with ``watch_streams``, the channel a dial makes (streaming
    progress noted as life)."""
    if pool is None:
        pool = ConnectionPool(
            Identity.generate(), CONFIG, clock, NetCounters(), lambda _: [], lambda: None
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


def test_any_call_past_its_deadline_closes_a_connection_that_showed_no_life() -> None:
    # Heartbeats go on connections of their own now: with only theirs closing a silent
    # connection, a data connection whose packets were silently lost stayed 71 s.
    async def scenario() -> None:
        clock = FakeClock()
        pool, connection, fake = _pool_with(clock)
        fake.answers = False
        clock.advance(5.0)  # (life 5 s ago: kept)
        with pytest.raises(DeadlineExceededError):
            await pool.call(PEER, PING, net_pb2.PingRequest(), net_pb2.PingResponse, retry=False)
        assert pool.get(PEER) is connection
        clock.advance(30.0)
        with pytest.raises(DeadlineExceededError):
            await pool.call(PEER, PING, net_pb2.PingRequest(), net_pb2.PingResponse, retry=False)
        assert pool.get(PEER) is None

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


@pytest.mark.parametrize(
    ("num_bytes", "method"), [(100, PUSH_ONE_METHOD), (5000, PUSH_METHOD)], ids=["one", "stream"]
)
def test_a_bulk_upload_under_way_keeps_a_connection_whose_heartbeats_time_out(
    num_bytes: int, method: str
) -> None:
    # One chunk (up to 4 MiB, ~35 s at 1 Mbit/s) shows no life until it is through, and the
    # heartbeats queued behind it time out: the connection was closed under the upload, which
    # failed every time.
    async def scenario() -> None:
        clock = FakeClock()
        pool, connection, fake = _pool_with(clock)
        fake.answers = False
        fake.hold_uploads = True
        upload = asyncio.create_task(
            send_bulk(
                pool,
                PEER,
                "t",
                b"x" * num_bytes,
                chunk_bytes=1024,
                timeout_s=60.0,
                counters=NetCounters(),
            )
        )
        await fake.upload_started.wait()
        clock.advance(30.0)
        with pytest.raises(DeadlineExceededError):
            await _heartbeat(pool)
        assert pool.get(PEER) is connection, "the connection was closed under the upload"
        assert not fake.closed
        fake.upload_through.set()
        await upload
        assert connection.num_uploads == 0
        assert connection.last_life_s == clock.monotonic(), "a completed upload is life"
        clock.advance(16.0)  # (silent again, and no upload: closed as before)
        with pytest.raises(DeadlineExceededError):
            await _heartbeat(pool)
        assert pool.get(PEER) is None
        assert fake.closed

    asyncio.run(scenario())


def test_a_failed_upload_leaves_a_silent_connection_to_be_closed() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        pool, _, fake = _pool_with(clock)
        fake.answers = False
        fake.hold_uploads = fake.upload_fails = True
        upload = asyncio.create_task(
            send_bulk(
                pool, PEER, "t", b"x", chunk_bytes=1024, timeout_s=60.0, counters=NetCounters()
            )
        )
        await fake.upload_started.wait()
        clock.advance(30.0)
        fake.upload_through.set()
        with pytest.raises(DeadlineExceededError):
            await upload
        with pytest.raises(DeadlineExceededError):
            await _heartbeat(pool)
        assert pool.get(PEER) is None, "a dead connection stayed in use after its upload failed"
        assert fake.closed

    asyncio.run(scenario())


async def _timed_out_call(pool: ConnectionPool) -> None:
    """A call through the peer's breaker (a DHT FindNode refresh, say) that runs out of time."""
    with pytest.raises(DeadlineExceededError):
        await pool.call(
            PEER, FIND_NODE, net_pb2.PingRequest(), net_pb2.PingResponse, timeout_s=2.0, retry=False
        )


def test_calls_timing_out_behind_a_bulk_upload_leave_the_breaker_closed() -> None:
    # On a 1-3 Mbit/s link the DHT's own calls to the peer queue behind an upload's chunk and
    # run out of time: counted as failures, they opened the breaker and kept it open, and every
    # send_bulk to the peer after it (all-reduce messages, state replies) was refused at once
    # with "circuit open", so comm failed a healthy member.
    async def scenario() -> None:
        clock = FakeClock()
        node = Node(CONFIG, clock=clock)
        _, connection, fake = _pool_with(clock, pool=node.pool)
        fake.answers = False
        fake.hold_uploads = True
        first = asyncio.create_task(node.send_bulk(PEER, "t", b"x" * 100, timeout_s=60.0))
        await fake.upload_started.wait()
        for _ in range(2 * CONFIG.breaker.failure_threshold):
            await _timed_out_call(pool=node.pool)
        # One that started behind the upload and ran out of time after it was through:
        fake.call_timed_out = asyncio.Event()
        fake.call_sent.clear()
        late = asyncio.create_task(_timed_out_call(node.pool))
        await fake.call_sent.wait()
        fake.upload_through.set()
        await first
        assert connection.num_uploads == 0
        fake.call_timed_out.set()
        await late
        breaker = node.pool.breakers[PEER]
        assert breaker.state == "closed"
        assert breaker.num_consecutive_failures == 0, "a timeout behind the upload was counted"
        await node.send_bulk(PEER, "t", b"y" * 100, timeout_s=60.0)  # not refused

    asyncio.run(scenario())


def test_calls_timing_out_on_an_idle_connection_still_open_the_breaker() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        node = Node(CONFIG, clock=clock)
        _, connection, fake = _pool_with(clock, pool=node.pool)
        fake.answers = False
        for _ in range(CONFIG.breaker.failure_threshold):
            await _timed_out_call(node.pool)
        assert connection.num_uploads == 0
        assert node.pool.breakers[PEER].state == "open"
        with pytest.raises(PeerUnavailableError, match="circuit open"):
            await node.send_bulk(PEER, "t", b"y" * 100, timeout_s=60.0)

    asyncio.run(scenario())
