"""DHT requests to a peer whose direct data connection uploads go on a control connection.

On the data connection a request waited in the socket's send buffer behind the upload's
megabytes: on a 2 Mbit/s uplink every Store and FindNode to the peer ran past its deadline, and
the records a peer published while it sent reached nobody. The transport now sends them on a
small connection of their own (``Node.control_pool``, which heartbeats share) while an upload is
under way on a direct data connection; that connection is closed once the peer is no longer
watched and no request chose it for ``CONTROL_IDLE_S``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gossamer.core.clock import FakeClock
from gossamer.core.errors import PeerUnavailableError
from gossamer.net.config import NodeConfig
from gossamer.net.connections import ConnectionPool, DialTarget, PeerConnection
from gossamer.net.control_connections import CONTROL_IDLE_S, ControlConnections
from gossamer.net.counters import NetCounters
from gossamer.net.dht_service import DHT_METHODS, GrpcDhtTransport
from gossamer.net.identity import Identity
from gossamer.proto import net_pb2

PEER = "peer-under-test"
CONFIG = NodeConfig()


class _FakeChannel:
    """Answers every unary call at once and records its method; records its closing."""

    def __init__(self) -> None:
        self.methods: list[str] = []
        self.closed = False

    def unary_unary(self, method: str, **kwargs: Any) -> Any:
        async def call(request: Any, **call_kwargs: Any) -> Any:
            self.methods.append(method)
            if method == DHT_METHODS["Store"]:
                return net_pb2.StoreResponse(stored=True)
            if method == DHT_METHODS["FindNode"]:
                return net_pb2.FindNodeResponse()
            if method == DHT_METHODS["FindValue"]:
                return net_pb2.FindValueResponse()
            return net_pb2.PingResponse()

        return call

    async def close(self, grace: float | None) -> None:
        self.closed = True


def _pool(clock: FakeClock) -> ConnectionPool:
    """A pool that cannot dial (no known address): only the connections put in it."""
    return ConnectionPool(
        Identity.generate(), CONFIG, clock, NetCounters(), lambda _: [], lambda: None
    )


def _connect(pool: ConnectionPool, kind: str = "direct") -> tuple[PeerConnection, _FakeChannel]:
    fake = _FakeChannel()
    channel: Any = fake
    connection = PeerConnection(
        peer_id=PEER,
        target=DialTarget("127.0.0.1:9", kind),
        channel=channel,
        metadata=(),
        opened_at_s=pool.clock.monotonic(),
    )
    pool._connections[PEER] = connection
    return connection, fake


def _transport(
    clock: FakeClock, watched: set[str] | None = None
) -> tuple[GrpcDhtTransport, ConnectionPool, ConnectionPool, ControlConnections]:
    data, control = _pool(clock), _pool(clock)
    watched_ = watched if watched is not None else set()
    connections = ControlConnections(data, control, is_watched=lambda p: p in watched_)
    return GrpcDhtTransport(data, CONFIG.dht, connections), data, control, connections


async def _store(transport: GrpcDhtTransport) -> bool:
    record = net_pb2.SignedRecord(key=b"k" * 32, value=b"v")
    return await transport.store(PEER, record)


def test_requests_go_on_the_data_connection_while_it_uploads_nothing() -> None:
    async def scenario() -> None:
        transport, data, control, _ = _transport(FakeClock())
        assert transport.pool_for(PEER) is data  # (none yet: the data pool dials it)
        _, on_data = _connect(data)
        assert await _store(transport)
        await transport.find_node(PEER, b"t" * 32)
        assert on_data.methods == [DHT_METHODS["Store"], DHT_METHODS["FindNode"]]
        assert control.peer_ids == []  # (no second connection to an idle contact)

    asyncio.run(scenario())


def test_requests_go_on_a_control_connection_while_the_direct_data_connection_uploads() -> None:
    async def scenario() -> None:
        transport, data, control, _ = _transport(FakeClock())
        connection, on_data = _connect(data)
        _, on_control = _connect(control)
        connection.num_uploads = 1
        assert transport.pool_for(PEER) is control
        assert await _store(transport)
        await transport.find_node(PEER, b"t" * 32)
        await transport.find_value(PEER, b"t" * 32)
        await transport.ping(PEER, with_record=True, timeout_s=1.0)
        # (the old code: all four behind the upload, on the data connection)
        assert on_data.methods == []
        assert on_control.methods == [
            DHT_METHODS[name] for name in ("Store", "FindNode", "FindValue", "Ping")
        ]
        connection.num_uploads = 0  # (the upload is through: back on the data connection)
        assert await _store(transport)
        assert on_data.methods == [DHT_METHODS["Store"]]

    asyncio.run(scenario())


def test_a_relayed_data_connection_keeps_carrying_requests_while_it_uploads() -> None:
    # (its tunnels share one connection to the relay, and a second tunnel takes one of the
    # relay's few places per dialer)
    async def scenario() -> None:
        transport, data, control, _ = _transport(FakeClock())
        connection, on_data = _connect(data, kind="relayed")
        connection.num_uploads = 1
        assert transport.pool_for(PEER) is data
        assert await _store(transport)
        assert on_data.methods == [DHT_METHODS["Store"]]
        assert control.peer_ids == []

    asyncio.run(scenario())


def test_an_open_breaker_of_the_peer_still_refuses_requests_at_once() -> None:
    async def scenario() -> None:
        transport, data, control, _ = _transport(FakeClock())
        connection, _ = _connect(data)
        _, on_control = _connect(control)
        connection.num_uploads = 1
        breaker = data.breakers[PEER]
        for _ in range(CONFIG.breaker.failure_threshold):
            breaker.failed()
        assert breaker.state == "open"
        with pytest.raises(PeerUnavailableError, match="circuit open"):
            await _store(transport)
        assert on_control.methods == []

    asyncio.run(scenario())


def test_a_control_connection_unused_for_the_idle_time_is_closed() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        transport, data, control, connections = _transport(clock)
        connection, _ = _connect(data)
        _, on_control = _connect(control)
        connection.num_uploads = 1
        assert await _store(transport)
        clock.advance(CONTROL_IDLE_S - 1.0)
        await connections.close_idle()
        assert control.get(PEER) is not None, "closed while still in use"
        assert await _store(transport)  # (chosen again: its idle time starts over)
        clock.advance(CONTROL_IDLE_S - 1.0)
        await connections.close_idle()
        assert control.get(PEER) is not None
        clock.advance(1.0)
        await connections.close_idle()
        assert control.get(PEER) is None, "an unused control connection stayed open"
        assert on_control.closed
        assert data.get(PEER) is connection  # (the data connection is not the transport's)

    asyncio.run(scenario())


def test_a_control_connection_is_dialled_under_the_connect_deadline_not_the_request_s() -> None:
    # Its handshake's round trips wait in the same full link queue as the request: within the
    # request's 2 s, the dial and the request together came within a few tenths of it.
    async def scenario() -> None:
        transport, data, control, _ = _transport(FakeClock())
        connection, _ = _connect(data)
        connection.num_uploads = 1
        dials: list[float | None] = []

        async def dial(peer_id: str, timeout_s: float | None = None) -> PeerConnection:
            dials.append(timeout_s)
            opened = control.get(peer_id)
            return opened if opened is not None else _connect(control)[0]

        control.connection = dial  # type: ignore[method-assign]
        assert await _store(transport)
        assert await _store(transport)
        # (the first dialled under the connect deadline, then each request looks up the open
        # connection under its own; the old code: the dial under the request's 2 s)
        rpc_s = CONFIG.dht.rpc_timeout_s
        assert dials == [CONFIG.connect_timeout_s, rpc_s, rpc_s]
        assert CONFIG.connect_timeout_s > rpc_s

    asyncio.run(scenario())


def test_a_peer_no_longer_watched_keeps_a_control_connection_a_request_chose_until_idle() -> None:
    # (heartbeats and DHT requests share it: the detector letting the peer go must not close
    # it under the requests that go on it while the upload lasts)
    async def scenario() -> None:
        clock = FakeClock()
        watched = {PEER}
        transport, data, control, connections = _transport(clock, watched)
        connection, _ = _connect(data)
        opened, on_control = _connect(control)
        connection.num_uploads = 1
        assert await _store(transport)
        clock.advance(CONTROL_IDLE_S - 1.0)
        watched.clear()
        await connections.release_for_heartbeats(PEER)  # (the detector's on_unwatched)
        assert control.get(PEER) is opened, "closed under the DHT requests that use it"
        await connections.close_idle()
        assert control.get(PEER) is opened
        clock.advance(1.0)
        await connections.close_idle()
        assert control.get(PEER) is None, "an unwatched, unused control connection stayed open"
        assert on_control.closed

    asyncio.run(scenario())


def test_a_watched_peer_keeps_its_control_connection_however_long_no_request_chose_it() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        watched = {PEER}
        transport, data, control, connections = _transport(clock, watched)
        connection, _ = _connect(data)
        opened, on_control = _connect(control)
        connection.num_uploads = 1
        assert await _store(transport)
        clock.advance(10 * CONTROL_IDLE_S)
        await connections.close_idle()
        assert control.get(PEER) is opened, "closed under the heartbeats that use it"
        await connections.heartbeat(PEER, 1.0)
        assert on_control.methods[-1] == DHT_METHODS["Ping"]
        watched.clear()
        await connections.release_for_heartbeats(PEER)  # (unwatched, and idle: closed at once)
        assert control.get(PEER) is None
        assert on_control.closed

    asyncio.run(scenario())


def test_heartbeats_and_requests_share_one_control_connection() -> None:
    async def scenario() -> None:
        transport, data, control, connections = _transport(FakeClock(), {PEER})
        connection, on_data = _connect(data)
        _, on_control = _connect(control)
        await connections.heartbeat(PEER, 1.0)
        connection.num_uploads = 1
        assert await _store(transport)
        await connections.heartbeat(PEER, 1.0)
        assert on_control.methods == [DHT_METHODS[name] for name in ("Ping", "Store", "Ping")]
        assert on_data.methods == []
        assert control.peer_ids == [PEER]

    asyncio.run(scenario())


def test_heartbeats_go_on_the_data_connection_where_it_is_relayed_and_release_the_control_one() -> (
    None
):
    async def scenario() -> None:
        _, data, control, connections = _transport(FakeClock(), {PEER})
        _, on_data = _connect(data, kind="relayed")
        _, on_control = _connect(control)  # (from when the data connection was direct)
        await connections.heartbeat(PEER, 1.0)
        assert on_data.methods == [DHT_METHODS["Ping"]]
        assert control.get(PEER) is None
        assert on_control.closed

    asyncio.run(scenario())


def test_heartbeats_the_detector_does_not_send_keep_the_control_connection_until_idle() -> None:
    # (a relay reservation's watchdog heartbeats its relay, which the detector may not watch:
    # a connection closed under one of those heartbeats ended the reservation)
    async def scenario() -> None:
        clock = FakeClock()
        _, data, control, connections = _transport(clock)
        _connect(data)
        opened, _ = _connect(control)
        await connections.heartbeat(PEER, 1.0)
        clock.advance(CONTROL_IDLE_S - 1.0)
        await connections.close_idle()
        assert control.get(PEER) is opened, "closed under a relay reservation's heartbeats"
        clock.advance(1.0)
        await connections.close_idle()
        assert control.get(PEER) is None

    asyncio.run(scenario())
