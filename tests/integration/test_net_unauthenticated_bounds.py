"""What a caller with no swarm secret can make a node hold or write: handshake requests read under
a deadline and caps, connections closed when idle or never set up, refusals logged once a minute
per host. Real gRPC on loopback; the misbehaving caller speaks raw HTTP/2 (``raw_http2``)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from gossamer.core.errors import PeerUnavailableError
from gossamer.net import server as server_module
from gossamer.net.config import LimitsConfig, NodeConfig
from gossamer.net.connections import DialTarget
from gossamer.net.dht_service import DHT_METHODS
from gossamer.net.node import Node
from gossamer.net.tls import TLS_SERVER_NAME, cert_pem_of_der
from gossamer.proto import net_pb2
from loopback_nodes import until
from raw_http2 import RawHttp2Connection

SECRET = os.urandom(32)
HELLO = "/gossamer.net.v1.Handshake/Hello"
PROVE = "/gossamer.net.v1.Handshake/Prove"


def _config(**limits: Any) -> NodeConfig:
    return NodeConfig(
        listen_address="127.0.0.1:0", swarm_secret=SECRET, limits=LimitsConfig(**limits)
    )


def _run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def _host_port(node: Node) -> tuple[str, int]:
    host, _, port = node.addresses[0].rpartition(":")
    return host, int(port)


def _stalled_message(announced_bytes: int, sent_bytes: int) -> bytes:
    """The start of a gRPC message that announces ``announced_bytes`` and never ends."""
    return b"\x00" + announced_bytes.to_bytes(4, "big") + b"\x0a" * (sent_bytes - 5)


def test_a_handshake_request_that_stalls_is_cut_off_at_its_deadline() -> None:
    """Hello and Prove were served as unary calls: gRPC buffered the announced message (up to
    8 MiB) before the handler ran, with no deadline, so a caller with no secret that stalled
    one byte short held it for good (128 such streams: 1,115 MiB, nothing reset)."""

    async def scenario() -> None:
        async with Node(_config(handshake_read_timeout_s=0.5)) as a:
            host, port = _host_port(a)
            async with RawHttp2Connection() as raw:
                await raw.open(host, port)
                streams = [raw.start_stream(method) for method in (HELLO, PROVE)]
                for stream in streams:
                    await raw.send(stream, _stalled_message(8 << 20, 32 * 1024), timeout_s=5)
                for stream in streams:
                    assert await raw.wait_until("ended", stream, timeout_s=5), stream
            assert a.counters.errors["DeadlineExceededError"] == 2
            assert a.counters.num_handshakes_refused == 2
            assert a.server.handshake_reads.num_reading == 0

    _run(scenario)


def _num_ended(*connections: RawHttp2Connection) -> int:
    return sum(len(c.ended) for c in connections)


def test_handshake_reads_past_the_caps_take_the_place_of_the_oldest() -> None:
    """At most ``max_handshake_reads_per_host`` requests from one address are read at once, and
    ``max_handshake_reads`` in all; one more takes the place of the oldest (its host's, else
    the oldest of all), which is refused (UNAVAILABLE: try again)."""

    async def scenario() -> None:
        limits = {"max_handshake_reads": 4, "max_handshake_reads_per_host": 2}
        async with Node(_config(handshake_read_timeout_s=30.0, **limits)) as a:
            host, port = _host_port(a)
            async with (
                RawHttp2Connection() as first,
                RawHttp2Connection() as second,
                RawHttp2Connection() as third,
            ):
                await first.open(host, port, local_host="127.0.0.2")
                await second.open(host, port, local_host="127.0.0.3")
                await third.open(host, port, local_host="127.0.0.4")
                oldest = first.start_stream(HELLO)
                await until(lambda: a.server.handshake_reads.num_reading == 1, 5, "first read")
                for _ in range(2):  # one past the cap of its host: its oldest gives way
                    first.start_stream(HELLO)
                await until(lambda: oldest in first.ended, 5, "the host's oldest given way")
                older = second.start_stream(PROVE)
                await until(lambda: a.server.handshake_reads.num_reading == 3, 5, "third read")
                second.start_stream(PROVE)
                third.start_stream(HELLO)  # 5 streams now for 4 places: the oldest of all goes
                await until(lambda: _num_ended(first, second, third) == 2, 5, "one more ended")
                assert a.counters.num_handshakes_refused == 2
                assert a.server.handshake_reads.num_evicted == 2
                assert a.server.handshake_reads.num_reading == 4
                assert older not in second.ended  # (the stalled ones of the first host went)
            await until(lambda: a.server.handshake_reads.num_reading == 0, 5, "reads ended")

    _run(scenario)


def test_honest_peers_join_while_four_addresses_keep_every_place_stalled() -> None:
    """The review's attack on refusing newcomers: four addresses with no secret each keep
    their host's share of places stalled, each stream renewed as it ends; honest peers still
    join (before: every honest dial refused, RESOURCE_EXHAUSTED)."""

    async def scenario() -> None:
        async with Node(_config(handshake_read_timeout_s=30.0)) as a:
            host, port = _host_port(a)
            cap = a.config.limits.max_handshake_reads_per_host
            attackers = [RawHttp2Connection() for _ in range(4)]
            renewed = [0] * len(attackers)
            try:
                for index, raw in enumerate(attackers):
                    await raw.open(host, port, local_host=f"127.0.0.{index + 2}")
                    for _ in range(cap):
                        raw.start_stream(HELLO)
                await until(
                    lambda: a.server.handshake_reads.num_reading == 4 * cap, 5, "places taken"
                )
                for _ in range(5):
                    async with Node(_config()) as honest:
                        await honest.pool.dial(
                            DialTarget(a.addresses[0]), expected_peer_id=a.peer_id
                        )
                        await honest.ping(a.peer_id)
                    for index, raw in enumerate(attackers):  # renewed: the places stay taken
                        while renewed[index] < len(raw.ended):
                            raw.start_stream(HELLO)
                            renewed[index] += 1
            finally:
                for raw in attackers:
                    await raw.close()

    _run(scenario)


def test_an_honest_peer_connects_while_another_host_stalls_handshakes() -> None:
    """The review's control: a caller with no secret stalls handshake requests (announcing
    8 MiB, stopping short) on many streams; an honest peer on another address still connects
    and pings."""

    async def scenario() -> None:
        async with Node(_config(handshake_read_timeout_s=30.0)) as a, Node(_config()) as b:
            host, port = _host_port(a)
            async with RawHttp2Connection() as raw:
                await raw.open(host, port, local_host="127.0.0.2")
                streams = [raw.start_stream(HELLO) for _ in range(32)]
                await asyncio.gather(
                    *(raw.send(s, _stalled_message(8 << 20, 16 * 1024), 5) for s in streams)
                )
                cap = a.config.limits.max_handshake_reads_per_host
                await until(lambda: len(raw.ended) == len(streams) - cap, 5, "refused past cap")
                await b.pool.dial(DialTarget(a.addresses[0]), expected_peer_id=a.peer_id)
                await b.ping(a.peer_id)
                assert a.server.handshake_reads.num_reading == cap

    _run(scenario)


def test_a_connection_that_never_sets_up_tls_is_closed() -> None:
    """gRPC's default left a connection that sends nothing open for 120 s."""

    async def scenario() -> None:
        async with Node(_config(transport_handshake_timeout_s=1.0)) as a:
            reader, writer = await asyncio.open_connection(*_host_port(a))
            try:
                assert await asyncio.wait_for(reader.read(1), 10) == b""
            finally:
                writer.close()

    _run(scenario)


def test_a_connection_with_no_call_is_closed_when_idle() -> None:
    """Connections from callers with no session were never closed: 1,011 of them, idle, took
    every file descriptor of a node and honest pings failed."""

    async def scenario() -> None:
        async with Node(_config(idle_connection_timeout_s=1.0)) as a, RawHttp2Connection() as raw:
            await raw.open(*_host_port(a))
            assert await raw.wait_until("closed", None, timeout_s=10)
            assert raw.goaway

    _run(scenario)


def test_a_pool_connection_closed_when_idle_is_redialled_without_a_failed_call() -> None:
    async def scenario() -> None:
        async with Node(_config(idle_connection_timeout_s=1.0)) as a, Node(_config()) as b:
            connection = await b.pool.dial(DialTarget(a.addresses[0]), expected_peer_id=a.peer_id)

            def closed_by_a() -> bool:
                return bool(connection.channel.get_state() == grpc.ChannelConnectivity.IDLE)

            for _ in range(2):
                await b.ping(a.peer_id)
                await until(closed_by_a, 10, "the idle connection closed by a")
            await b.ping(a.peer_id)
            assert b.pool.get(a.peer_id) is connection
            assert not b.counters.errors
            assert b.counters.num_retries == 0

    _run(scenario)


def test_refusals_of_callers_with_no_session_warn_once_a_minute_per_host(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each refused call and refused Prove wrote a WARNING line: 3,000 from one caller with no
    secret wrote 513 KiB of log in 1.8 s. All are still counted."""

    async def scenario() -> None:
        async with Node(_config()) as a:
            credentials = grpc.ssl_channel_credentials(cert_pem_of_der(a.tls.cert_der))
            override = [("grpc.ssl_target_name_override", TLS_SERVER_NAME)]
            async with grpc.aio.secure_channel(a.addresses[0], credentials, override) as channel:
                ping = channel.unary_unary(DHT_METHODS["Ping"])
                prove = channel.unary_unary(PROVE)
                bad_prove = net_pb2.ProveRequest(server_nonce=os.urandom(32)).SerializeToString()
                for _ in range(20):
                    for call, request in ((ping, b""), (prove, bad_prove)):
                        with pytest.raises(grpc.aio.AioRpcError):
                            await call(request, timeout=5)
            assert a.counters.num_handshakes_refused == 40

    with caplog.at_level(logging.DEBUG, logger="gossamer.net"):
        _run(scenario)
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 40
    assert [r.levelno for r in refusals].count(logging.WARNING) == 1
    assert refusals[0].levelno == logging.WARNING


def test_a_node_with_a_guessable_swarm_secret_warns_once_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Any caller's Hello gets an HMAC under the secret over a transcript it knows: a team's
    passphrase was recovered offline in 1,144 guesses, and nothing said it was weak."""

    async def scenario() -> None:
        weak = NodeConfig(listen_address="127.0.0.1:0", swarm_secret=b"our-team-swarm-2026")
        async with Node(weak) as a, Node(weak) as b, Node(_config()):
            await b.pool.dial(DialTarget(a.addresses[0]), expected_peer_id=a.peer_id)

    with caplog.at_level(logging.WARNING, logger="gossamer.net"):
        _run(scenario)
    said = [r.getMessage() for r in caplog.records if "swarm secret" in r.getMessage()]
    assert len(said) == 2, said  # one for each of the nodes with that secret, at start
    assert "fewer than 32" in said[0]
    assert "openssl rand -hex 32 > swarm.secret" in said[0]


def test_a_handshake_whose_server_loop_stalls_past_the_deadline_still_succeeds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server's event loop held up past the read's deadline (a collection, a long callback)
    right as an honest Hello began: the request arrived meanwhile, but the loop's first look
    after the stall was the deadline's, and the peer was refused ("did not arrive within 2 s").
    The read gets one more short look."""
    begin = server_module._HandshakeReads.begin
    stalls: list[float] = []

    def stalling_begin(self: Any, host: str) -> Any:
        if not stalls:
            stalls.append(0.6)
            asyncio.get_running_loop().call_soon(time.sleep, 0.6)  # (the stall itself)
        return begin(self, host)

    monkeypatch.setattr(server_module._HandshakeReads, "begin", stalling_begin)

    async def scenario() -> None:
        async with Node(_config(handshake_read_timeout_s=0.3)) as a, Node(_config()) as b:
            await b.pool.dial(DialTarget(a.addresses[0]), expected_peer_id=a.peer_id)
            await b.ping(a.peer_id)
        assert stalls == [0.6]

    _run(scenario)


def test_an_honest_handshake_that_gave_way_is_told_to_try_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A read that gave way to newer ones (a flood) is refused as UNAVAILABLE, which the caller's
    retries dial again: as RESOURCE_EXHAUSTED it was a ProtocolError, never retried."""
    begin = server_module._HandshakeReads.begin
    evicted: list[str] = []

    def evicting_begin(self: Any, host: str) -> Any:
        read = begin(self, host)
        if not evicted:  # (the first read gives way at once, as under a flood)
            evicted.append(host)
            read.evicted.set()
        return read

    monkeypatch.setattr(server_module._HandshakeReads, "begin", evicting_begin)

    async def scenario() -> None:
        async with Node(_config()) as a, Node(_config()) as b:
            with pytest.raises(PeerUnavailableError, match="try again"):
                await b.pool.dial(DialTarget(a.addresses[0]), expected_peer_id=a.peer_id)
            await b.pool.dial(DialTarget(a.addresses[0]), expected_peer_id=a.peer_id)
            await b.ping(a.peer_id)
        assert len(evicted) == 1

    _run(scenario)
