"""DHT requests to a peer whose direct data connection uploads go on a control connection.

On the data connection a request waited in the socket's send buffer behind the upload's
megabytes: on a 2 Mbit/s uplink every Store and FindNode to the peer ran past its deadline, and
the records a peer published while it sent reached nobody. The transport now sends them on a
small connection of their own (``Node.control_pool``, not the heartbeats' one) while an upload
is under way on a direct data connection, and closes that connection once it went unused for
``CONTROL_IDLE_S``. It is dialled within the request's own deadline and through its breaker,
and a timeout there while the data connection uploads is not counted in that breaker.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from gossamer.core.clock import FakeClock
from gossamer.core.errors import DeadlineExceededError, PeerUnavailableError
from gossamer.net.config import NodeConfig
from gossamer.net.connections import ConnectionPool, DialTarget, PeerConnection
from gossamer.net.control_connections import CONTROL_IDLE_S, DhtControlConnections
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
        self.late = False
        """Answer every call with DEADLINE_EXCEEDED (a request a link's queue held too long)."""

    def unary_unary(self, method: str, **kwargs: Any) -> Any:
        async def call(request: Any, **call_kwargs: Any) -> Any:
            self.methods.append(method)
            if self.late:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata()
                )
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
    clock: FakeClock, counters: NetCounters | None = None, gone: set[str] | None = None
) -> tuple[GrpcDhtTransport, ConnectionPool, ConnectionPool, DhtControlConnections]:
    data = _pool(clock)
    gone_ = gone if gone is not None else set()
    connections = DhtControlConnections(
        Identity.generate(), CONFIG, clock, data, counters or NetCounters(), lambda: None,
        reported_gone=lambda peer_id: peer_id in gone_,
    )  # fmt: skip
    control = connections.pool
    return GrpcDhtTransport(data, CONFIG.dht, connections), data, control, connections


async def _store(transport: GrpcDhtTransport) -> bool:
    record = net_pb2.SignedRecord(key=b"k" * 32, value=b"v")
    return await transport.store(PEER, record)


def _uploading(
    gone: set[str] | None = None, counters: NetCounters | None = None
) -> tuple[GrpcDhtTransport, ConnectionPool, ConnectionPool]:
    """A transport whose direct data connection to ``PEER`` has an upload under way (so its
    requests go on the control pool): the transport, its data pool and its control pool."""
    transport, data, control, _ = _transport(FakeClock(), counters, gone)
    connection, _ = _connect(data)
    connection.num_uploads = 1
    return transport, data, control


def _record_dials(control: ConnectionPool) -> list[float | None]:
    """Replace the control pool's connection lookup with one that opens a fake connection
    where none is open; returns the deadline of each lookup, in order."""
    dials: list[float | None] = []

    async def dial(peer_id: str, timeout_s: float | None = None) -> PeerConnection:
        dials.append(timeout_s)
        opened = control.get(peer_id)
        return opened if opened is not None else _connect(control)[0]

    control.connection = dial  # type: ignore[method-assign]
    return dials


def _fail_dials(control: ConnectionPool, failure: Exception) -> list[float | None]:
    """Replace the control pool's connection lookup with one that raises ``failure``; returns
    the deadline of each lookup, in order."""
    dials: list[float | None] = []

    async def dial(peer_id: str, timeout_s: float | None = None) -> PeerConnection:
        dials.append(timeout_s)
        raise failure

    control.connection = dial  # type: ignore[method-assign]
    return dials


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
        transport, data, control = _uploading()
        _, on_control = _connect(control)
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


def test_a_control_connection_is_dialled_within_the_request_s_own_deadline() -> None:
    # Under the node's connect deadline (5 s), every request to a frozen peer took 5 s instead
    # of its own 2 s. The request then gets its own deadline again: twice it at most.
    async def scenario() -> None:
        transport, _, control = _uploading()
        dials = _record_dials(control)
        assert await _store(transport)
        assert await _store(transport)
        # (the first dialled, then each request looks up the open connection under its own;
        # the dial gets twice the request's deadline, its handshake queued behind the upload)
        rpc_s = CONFIG.dht.rpc_timeout_s
        assert dials == [min(CONFIG.connect_timeout_s, 2 * rpc_s), rpc_s, rpc_s]

    asyncio.run(scenario())


def test_a_control_connection_to_a_peer_reported_gone_is_dialled_within_the_deadline() -> None:
    async def scenario() -> None:
        transport, _, control = _uploading(gone={PEER})
        dials = _record_dials(control)
        assert await _store(transport)
        assert dials[0] == CONFIG.dht.rpc_timeout_s

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("failure", "gone"),
    [
        (PeerUnavailableError("connection refused"), False),
        (DeadlineExceededError("connecting ran past its deadline"), True),
    ],
    ids=["refused", "timed-out-peer-reported-gone"],
)
def test_failed_dials_of_a_control_connection_open_its_breaker(
    failure: Exception, gone: bool
) -> None:
    # (outside the breaker, a frozen peer was dialled afresh by every request, never refused)
    async def scenario() -> None:
        transport, data, control = _uploading(gone={PEER} if gone else set())
        dials = _fail_dials(control, failure)
        for _ in range(CONFIG.breaker.failure_threshold):
            with pytest.raises(type(failure)):
                await _store(transport)
        with pytest.raises(PeerUnavailableError, match="circuit open"):
            await _store(transport)
        assert len(dials) == CONFIG.breaker.failure_threshold
        assert data.breakers[PEER].state == "closed"  # (bulk sends to the peer unaffected)

    asyncio.run(scenario())


def test_dials_that_time_out_behind_the_upload_do_not_open_the_breaker() -> None:
    # (the handshake queues behind the upload as the requests do: that says nothing of the peer)
    async def scenario() -> None:
        transport, _, control = _uploading()
        _fail_dials(control, DeadlineExceededError("connecting ran past its deadline"))
        for _ in range(2 * CONFIG.breaker.failure_threshold):
            with pytest.raises(DeadlineExceededError):
                await _store(transport)
        assert control.breakers[PEER].num_consecutive_failures == 0

    asyncio.run(scenario())


class _SlowDials:
    """Dials of the control pool that wait for :attr:`release`, then fail with ``failure``."""

    def __init__(self, control: ConnectionPool, failure: Exception) -> None:
        self.release = asyncio.Event()
        self.dialling = asyncio.Event()
        self.num_dials = 0
        self.num_waiting = 0
        self._failure = failure
        control.dial = self.dial  # type: ignore[method-assign]

    async def dial(self, target: DialTarget, **kwargs: Any) -> PeerConnection:
        self.num_dials += 1
        self.dialling.set()
        await self.release.wait()
        raise self._failure

    async def find_nodes(self, transport: GrpcDhtTransport) -> list[object]:
        """As many concurrent FindNodes as open a breaker, all started before the first dial
        is let through: what each returned or raised."""
        requests = [
            asyncio.create_task(transport.find_node(PEER, b"t" * 32))
            for _ in range(CONFIG.breaker.failure_threshold)
        ]
        async with asyncio.timeout(5.0):
            await self.dialling.wait()
        for _ in range(10):  # (the others, started with it, reach their wait for the dial)
            await asyncio.sleep(0)
        self.release.set()
        return await asyncio.gather(*requests, return_exceptions=True)


@pytest.mark.parametrize("gone", [False, True], ids=["live", "reported-gone"])
def test_requests_waiting_on_one_slow_dial_count_one_failure(gone: bool) -> None:
    # Five concurrent FindNodes behind one slow dial to a live peer counted five failures and
    # opened the breaker: its requests were refused for seconds. Now the one that dialled
    # counts it (only if the link does not explain a timeout); the others wait and count none.
    async def scenario() -> None:
        transport, _, control = _uploading(gone={PEER} if gone else set())
        dials = _SlowDials(control, PeerUnavailableError("connection refused"))
        results = await dials.find_nodes(transport)
        assert all(isinstance(r, PeerUnavailableError) for r in results), results
        assert dials.num_dials == 1  # (the old code: each waiter dialled again)
        breaker = control.breakers[PEER]
        assert breaker.num_consecutive_failures == 1  # (the old code: 5, and open)
        assert breaker.state == "closed"

    asyncio.run(scenario())


def test_requests_waiting_on_one_slow_dial_that_times_out_behind_the_upload_count_none() -> None:
    async def scenario() -> None:
        transport, _, control = _uploading()
        dials = _SlowDials(control, DeadlineExceededError("connecting ran past its deadline"))
        results = await dials.find_nodes(transport)
        assert all(isinstance(r, DeadlineExceededError) for r in results), results
        assert control.breakers[PEER].num_consecutive_failures == 0
        assert control.breakers[PEER].state == "closed"

    asyncio.run(scenario())


@pytest.mark.parametrize("restart", ["new-port", "same-port"])
def test_a_control_connection_left_from_before_a_redial_of_the_data_one_is_dialled_afresh(
    restart: str,
) -> None:
    # (kept, it reached the peer's old incarnation: the first request of the new one's upload
    # failed UNAVAILABLE and counted a breaker failure, for up to CONTROL_IDLE_S)
    async def scenario() -> None:
        clock = FakeClock()
        transport, data, control, _ = _transport(clock)
        old_data, _ = _connect(data)
        old_control, on_old = _connect(control)
        clock.advance(10.0)
        address = "127.0.0.1:10" if restart == "new-port" else old_data.target.address
        new_data = PeerConnection(
            peer_id=PEER,
            target=DialTarget(address, "direct"),
            channel=old_data.channel,
            metadata=(),
            opened_at_s=clock.monotonic(),
        )
        data._connections[PEER] = new_data
        new_data.num_uploads = 1
        dialled: list[str] = []

        async def dial(target: DialTarget, **kwargs: Any) -> PeerConnection:
            dialled.append(target.address)
            return _connect(control)[0]

        control.dial = dial  # type: ignore[method-assign]
        await transport.find_node(PEER, b"t" * 32)
        assert on_old.closed
        assert on_old.methods == []  # (the old code: the request went on it)
        assert dialled == [address]
        assert control.get(PEER) is not old_control
        assert control.breakers[PEER].num_consecutive_failures == 0

    asyncio.run(scenario())


def test_a_control_connection_beside_its_data_connection_is_kept() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        transport, data, control, _ = _transport(clock)
        connection, _ = _connect(data)
        clock.advance(1.0)
        kept, on_control = _connect(control)
        connection.num_uploads = 1
        clock.advance(10.0)
        await transport.find_node(PEER, b"t" * 32)
        assert control.get(PEER) is kept
        assert not on_control.closed
        assert on_control.methods == [DHT_METHODS["FindNode"]]

    asyncio.run(scenario())


def test_timeouts_on_a_control_connection_while_the_data_one_uploads_do_not_open_its_breaker() -> (
    None
):
    # (the link's queue behind the upload explains them: counted, they opened the breaker and
    # small Stores to a live peer were refused)
    async def scenario() -> None:
        transport, _, control = _uploading()
        _, on_control = _connect(control)
        on_control.late = True
        for _ in range(2 * CONFIG.breaker.failure_threshold):
            with pytest.raises(DeadlineExceededError):
                await transport.find_node(PEER, b"t" * 32)
        assert control.breakers[PEER].state == "closed"
        on_control.late = False
        assert await _store(transport)

    asyncio.run(scenario())


def test_timeouts_on_a_control_connection_count_while_the_detector_reports_the_peer_gone() -> None:
    # (its heartbeats, on their own connection beside the same upload, went unanswered: the
    # link does not explain the timeouts, a frozen peer does)
    async def scenario() -> None:
        transport, _, control = _uploading(gone={PEER})
        _, on_control = _connect(control)
        on_control.late = True
        for _ in range(CONFIG.breaker.failure_threshold):
            with pytest.raises(DeadlineExceededError):
                await transport.find_node(PEER, b"t" * 32)
        with pytest.raises(PeerUnavailableError, match="circuit open"):
            await transport.find_node(PEER, b"t" * 32)

    asyncio.run(scenario())


def test_timeouts_on_a_control_connection_count_once_the_upload_is_over() -> None:
    # (a request that chose it just before the upload ended, on a link no longer busy)
    async def scenario() -> None:
        _, data, control, _ = _transport(FakeClock())
        connection, _ = _connect(data)
        _, on_control = _connect(control)
        on_control.late = True
        for _ in range(CONFIG.breaker.failure_threshold):
            with pytest.raises(DeadlineExceededError):
                await control.call(
                    PEER, DHT_METHODS["Ping"], net_pb2.PingRequest(), net_pb2.PingResponse,
                    timeout_s=1.0, retry=False,
                )  # fmt: skip
        assert control.breakers[PEER].state == "open"
        assert connection.num_uploads == 0

    asyncio.run(scenario())


def test_calls_on_a_control_connection_are_counted_in_the_node_s_counters_not_its_connections() -> (
    None
):
    async def scenario() -> None:
        counters = NetCounters()
        transport, _, control = _uploading(counters=counters)
        _, on_control = _connect(control)
        assert await _store(transport)
        on_control.late = True
        with pytest.raises(DeadlineExceededError):
            await _store(transport)
        assert counters.rpc_calls[DHT_METHODS["Store"]] == 2
        assert counters.rpc_latency[DHT_METHODS["Store"]].num_calls == 2
        assert counters.peers[PEER].num_errors == 1
        assert counters.errors["DeadlineExceededError"] == 1
        assert counters.peers[PEER].bytes_sent > 0
        assert dict(counters.connections) == {}

    asyncio.run(scenario())
