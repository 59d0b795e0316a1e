"""Real gRPC over TLS on 127.0.0.1: authentication, refusals, errors, services, bulk streams."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from gossamer.core.errors import (
    AuthenticationError,
    ConfigError,
    DeadlineExceededError,
    PeerLostError,
    PeerUnavailableError,
    ProtocolError,
)
from gossamer.net.advertised_host import routable_host
from gossamer.net.bulk import PUSH_METHOD, PUSH_ONE_METHOD
from gossamer.net.config import BreakerConfig, LimitsConfig, NodeConfig, RetryConfig
from gossamer.net.connections import DialTarget
from gossamer.net.dht_service import DHT_METHODS
from gossamer.net.identity import Identity
from gossamer.net.node import Node
from gossamer.net.reachability import DIAL_BACK_METHOD
from gossamer.net.records import sign_peer_record
from gossamer.net.server import current_session
from gossamer.net.tls import TLS_SERVER_NAME, cert_pem_of_der, probe_server_certificate
from gossamer.proto import net_pb2, net_pb2_grpc
from loopback_nodes import until

SECRET = b"integration-secret-0123456789"


def _config(**overrides: Any) -> NodeConfig:
    return NodeConfig(listen_address="127.0.0.1:0", swarm_secret=SECRET, **overrides)


def _run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_two_peers_authenticate_and_call_each_other() -> None:
    async def scenario() -> None:
        async with Node(_config()) as a, Node(_config()) as b:
            connection = await b.pool.dial(DialTarget(a.addresses[0]), expected_peer_id=a.peer_id)
            assert connection.peer_id == a.peer_id
            await b.ping(a.peer_id)
            assert b.peer_id in a.directory  # a learned b's record from the handshake
            assert a.counters.peers[b.peer_id].num_rpcs_received >= 1
            assert b.counters.peers[a.peer_id].bytes_sent > 0
            assert b.counters.connections["direct"] == 1

    _run(scenario)


def _has_default_route() -> bool:
    with open("/proc/net/route") as routes:
        return any(line.split()[1] == "00000000" for line in list(routes)[1:] if line.strip())


@pytest.mark.skipif(not _has_default_route(), reason="this machine has no default route")
def test_a_first_peer_on_every_interface_advertises_an_address_other_machines_can_dial() -> None:
    # With no bootstrap peer to find its way out by, it advertised 127.0.0.1: a second machine
    # given its printed address dialled itself.
    async def scenario() -> None:
        async with Node(NodeConfig(listen_address="0.0.0.0:0", swarm_secret=SECRET)) as first:
            host = first.addresses[0].rpartition(":")[0]
            assert not ipaddress.ip_address(host).is_loopback, first.addresses
            async with Node(_config(bootstrap=(f"{first.peer_id}@{first.addresses[0]}",))) as b:
                await b.ping(first.peer_id)

    _run(scenario)


@pytest.mark.skipif(not _has_default_route(), reason="this machine has no default route")
def test_the_ipv6_wildcard_written_bracketed_is_a_wildcard_too() -> None:
    # "[::]:7000" advertised "[::]:7000", an address nobody can dial.
    for wildcard in ("[::]", "::", "0.0.0.0"):
        host = routable_host(wildcard, ())
        assert not ipaddress.ip_address(host.strip("[]")).is_unspecified, wildcard
    assert routable_host("[fd00::2]", ()) == "[fd00::2]"  # not a wildcard: as given


def test_peer_without_the_swarm_secret_is_refused_with_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async with Node(_config()) as a, Node(NodeConfig(listen_address="127.0.0.1:0")) as open_:
            with pytest.raises(AuthenticationError):
                await open_.pool.dial(DialTarget(a.addresses[0]), expected_peer_id=None)
            assert a.counters.num_handshakes_refused == 1
            assert a.server.authority.num_sessions == 0

    with caplog.at_level(logging.WARNING):
        _run(scenario)
    assert "does not know the swarm secret" in caplog.text


def test_peer_claiming_another_id_is_refused() -> None:
    async def scenario() -> None:
        async with Node(_config()) as a, Node(_config()) as b:
            impostor_claim = Identity.generate().peer_id
            with pytest.raises(AuthenticationError, match="expected peer"):
                await b.pool.dial(DialTarget(a.addresses[0]), expected_peer_id=impostor_claim)

    _run(scenario)


def test_call_without_a_session_is_refused_before_decoding() -> None:
    async def scenario() -> None:
        async with Node(_config()) as a:
            cert = a.tls.cert_der
            async with grpc.aio.secure_channel(
                a.addresses[0],
                grpc.ssl_channel_credentials(root_certificates=cert_pem_of_der(cert)),
                options=[("grpc.ssl_target_name_override", TLS_SERVER_NAME)],
            ) as channel:
                raw = channel.unary_unary(DHT_METHODS["FindNode"])
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await raw(b"\xff\x00garbage", timeout=5)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert a.counters.num_handshakes_refused == 1

    _run(scenario)


def test_a_call_without_a_session_is_refused_before_its_message_arrives() -> None:
    """gRPC read a unary call's whole message before the refusal ran: a caller with no session
    that sent all but the last byte of 8 MiB messages on many streams had the server hold 8 MiB
    each (4 GiB for 512 streams on 4 connections). Here the caller sends nothing at all."""

    async def scenario() -> None:
        async with (
            Node(_config()) as a,
            grpc.aio.secure_channel(
                a.addresses[0],
                grpc.ssl_channel_credentials(root_certificates=cert_pem_of_der(a.tls.cert_der)),
                options=[("grpc.ssl_target_name_override", TLS_SERVER_NAME)],
            ) as channel,
        ):
            for method in (DHT_METHODS["Ping"], PUSH_ONE_METHOD, PUSH_METHOD):
                call = channel.stream_unary(method)(timeout=10)  # no message, never closed
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, method

    _run(scenario)


def test_one_connection_carries_at_most_its_limit_of_calls_at_once() -> None:
    """No limit was set: one connection could open any number of calls, each holding up to a
    whole message in gRPC. Calls past the limit wait on the caller's side (or are refused)."""

    async def scenario() -> None:
        limits = LimitsConfig(max_concurrent_streams=16)
        async with Node(_config(limits=limits)) as a, Node(_config()) as b:
            await b.pool.dial(DialTarget(a.addresses[0]), expected_peer_id=a.peer_id)
            await b.ping(a.peer_id)
            running, peak, release, full = 0, 0, asyncio.Event(), asyncio.Event()

            async def held(sender: str, topic: str, payload: bytearray) -> None:
                nonlocal running, peak
                running += 1
                peak = max(peak, running)
                if peak >= 16:
                    full.set()
                await release.wait()
                running -= 1

            a.on_bulk("held", held)
            sends = [
                asyncio.create_task(b.send_bulk(a.peer_id, "held", b"x", timeout_s=30))
                for _ in range(24)
            ]
            await asyncio.wait_for(full.wait(), 10)
            await asyncio.sleep(0.5)  # a window to watch in: a 17th call would start in it
            assert peak == 16
            release.set()
            results = await asyncio.gather(*sends, return_exceptions=True)
            assert peak == 16
            # The rest went through once calls ended, or, where the caller saw a slot free
            # before the server did, were refused (HTTP/2's REFUSED_STREAM): never run. The
            # connection stays: dropping it failed the calls on it too (13 of the 24).
            failed = [r for r in results if isinstance(r, BaseException)]
            assert all(isinstance(r, PeerUnavailableError) for r in failed), failed
            assert len(failed) <= len(sends) - 16, failed

    _run(scenario)


@pytest.mark.parametrize(
    ("refusal", "seen"),
    [
        (PeerUnavailableError("not receiving yet"), PeerUnavailableError),
        (RuntimeError("its handler failed"), PeerLostError),
    ],
)
def test_a_peer_that_answers_a_call_with_a_refusal_keeps_the_connection(
    refusal: Exception, seen: type[Exception]
) -> None:
    """A handler's own refusal (UNAVAILABLE, as a relay that is full or comm not receiving yet
    says it) read as a broken connection: the caller dropped it, and every other call on it
    failed with it."""

    async def scenario() -> None:
        async with Node(_config()) as a, Node(_config()) as b:
            await b.pool.dial(DialTarget(a.addresses[0]), expected_peer_id=a.peer_id)
            release, started = asyncio.Event(), asyncio.Event()

            async def held(sender: str, topic: str, payload: bytearray) -> None:
                started.set()
                await release.wait()

            async def refusing(sender: str, topic: str, payload: bytearray) -> None:
                raise refusal

            a.on_bulk("held", held)
            a.on_bulk("refusing", refusing)
            other = asyncio.create_task(b.send_bulk(a.peer_id, "held", b"x", timeout_s=30))
            await asyncio.wait_for(started.wait(), 10)
            connection = b.pool.get(a.peer_id)
            with pytest.raises(seen):
                await b.send_bulk(a.peer_id, "refusing", b"x", timeout_s=30)
            release.set()
            await asyncio.wait_for(other, 10)  # (it failed with the connection)
            assert b.pool.get(a.peer_id) is connection

    _run(scenario)


def test_random_bytes_to_every_method_get_clean_errors_and_the_node_survives() -> None:
    async def scenario() -> None:
        async with Node(_config()) as a, Node(_config()) as b:
            connection = await b.pool.dial(DialTarget(a.addresses[0]), expected_peer_id=None)
            rng = __import__("random").Random(7)
            methods = [
                *DHT_METHODS.values(),
                "/gossamer.net.v1.Reachability/DialBack",
                PUSH_ONE_METHOD,
            ]
            codes = []
            for method in methods:
                raw = connection.channel.unary_unary(method)
                for size in (1, 7, 100, 4096):
                    junk = bytes(rng.randrange(256) for _ in range(size))
                    try:
                        await raw(junk, timeout=5, metadata=connection.metadata)
                    except grpc.aio.AioRpcError as exc:
                        codes.append(exc.code())
            assert codes
            assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
            assert a.counters.num_protocol_errors == len(codes)
            await b.ping(a.peer_id)  # still serving

    _run(scenario)


def test_unreachable_peer_and_deadlines_map_to_retryable_errors() -> None:
    async def scenario() -> None:
        config = _config(retry=RetryConfig(max_attempts=2, total_deadline_s=2.0))
        async with Node(config) as a:
            with pytest.raises(PeerUnavailableError):
                await a.pool.dial(DialTarget("127.0.0.1:1"), expected_peer_id=None)

            class Slow(net_pb2_grpc.DhtServicer):
                async def FindNode(self, request: Any, context: Any) -> Any:
                    await asyncio.sleep(5)

            async with Node(_config()) as slow:
                slow.add_servicer(net_pb2_grpc.add_DhtServicer_to_server, Slow())
                await a.pool.dial(DialTarget(slow.addresses[0]), expected_peer_id=None)
                started = time.monotonic()
                with pytest.raises(DeadlineExceededError):
                    await a.call(
                        slow.peer_id,
                        DHT_METHODS["FindNode"],
                        net_pb2.FindNodeRequest(),
                        net_pb2.FindNodeResponse,
                        timeout_s=0.3,
                        retry=False,
                    )
                assert time.monotonic() - started < 2

    _run(scenario)


@dataclass
class SilentListener:
    """Accepts TCP connections on ``host`` and never says a word."""

    port: int
    accepted: list[asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def silent_listener(host: str = "127.0.0.1") -> AsyncIterator[SilentListener]:
    accepted: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(hold, host, 0)
    try:
        yield SilentListener(server.sockets[0].getsockname()[1], accepted)
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


def test_a_record_listing_many_silent_addresses_costs_one_dial_deadline() -> None:
    """Four listeners that accept TCP and never speak, each listed four times: a connection
    gave every address the whole deadline in turn (16 deadlines)."""

    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            listeners = [await stack.enter_async_context(silent_listener()) for _ in range(4)]
            a = await stack.enter_async_context(Node(_config()))
            other = Identity.generate()
            addresses = [f"127.0.0.1:{listener.port}" for listener in listeners] * 4
            value = net_pb2.PeerRecordValue(addresses=addresses)
            a.dht.learn(sign_peer_record(other, value, now_s=time.time(), ttl_s=60))
            started = time.monotonic()
            with pytest.raises(DeadlineExceededError):
                await a.pool.connection(other.peer_id, timeout_s=0.5)
            assert time.monotonic() - started < 1.5

    _run(scenario)


def test_a_peer_whose_first_address_is_silent_is_reached_at_its_second() -> None:
    async def scenario() -> None:
        async with silent_listener() as silent, Node(_config()) as a, Node(_config()) as b:
            value = net_pb2.PeerRecordValue(
                addresses=[f"127.0.0.1:{silent.port}", b.addresses[0]],
                tls_cert_der=b.tls.cert_der,
            )
            a.dht.learn(sign_peer_record(b.identity, value, now_s=time.time(), ttl_s=60))
            connection = await a.pool.connection(b.peer_id, timeout_s=2.0)
            assert connection.peer_id == b.peer_id
            assert silent.accepted, "the silent address was not tried first"

    _run(scenario)


def test_a_dial_back_dials_only_the_caller_and_leaves_the_open_connection_alone() -> None:
    """A helper dialled every HOST:PORT a caller named (any third party, a port-scan oracle),
    and a dial that worked replaced its open connection to the caller, cutting its calls."""

    async def scenario() -> None:
        async with (
            silent_listener("127.0.0.2") as third_party,
            Node(_config()) as helper,
            Node(_config()) as caller,
        ):
            await caller.bootstrap([f"{helper.peer_id}@{helper.addresses[0]}"])
            await helper.ping(caller.peer_id)
            before = helper.pool.get(caller.peer_id)
            assert before is not None
            # (a port of 5,000 digits: int() raises on it, and the helper answered INTERNAL)
            named = [caller.addresses[0], f"127.0.0.2:{third_party.port}", f"h:{'1' * 5000}"]
            response = await caller.call(
                helper.peer_id,
                DIAL_BACK_METHOD,
                net_pb2.DialBackRequest(addresses=named),
                net_pb2.DialBackResponse,
                timeout_s=10,
                retry=False,
            )
            assert list(response.reachable_addresses) == [caller.addresses[0]]
            assert third_party.accepted == []  # it heard nothing
            assert helper.pool.get(caller.peer_id) is before

    _run(scenario)


def test_what_the_pool_keeps_about_a_peer_goes_when_its_record_expires() -> None:
    async def scenario() -> None:
        async with Node(_config()) as a:
            gone = Identity.generate()
            value = net_pb2.PeerRecordValue(addresses=["127.0.0.1:1"])
            a.dht.learn(sign_peer_record(gone, value, now_s=time.time(), ttl_s=0.5))
            with pytest.raises(PeerUnavailableError):
                await a.pool.connection(gone.peer_id, timeout_s=0.3)
            a.pool.breakers[gone.peer_id].failed()
            assert gone.peer_id in a.pool.breakers
            await asyncio.sleep(0.6)
            a.directory.expire()
            assert gone.peer_id not in a.directory
            assert gone.peer_id not in a.pool.breakers

    _run(scenario)


def test_services_of_other_layers_register_after_start_and_see_the_caller() -> None:
    async def scenario() -> None:
        async with Node(_config()) as a, Node(_config()) as b:

            class Echo(net_pb2_grpc.ReachabilityServicer):
                async def DialBack(self, request: Any, context: Any) -> Any:
                    caller = current_session().peer_id
                    return net_pb2.DialBackResponse(detail=caller)

            a.add_servicer(net_pb2_grpc.add_ReachabilityServicer_to_server, Echo())
            await b.pool.dial(DialTarget(a.addresses[0]), expected_peer_id=None)
            response = await b.call(
                a.peer_id,
                "/gossamer.net.v1.Reachability/DialBack",
                net_pb2.DialBackRequest(),
                net_pb2.DialBackResponse,
            )
            assert response.detail == b.peer_id

    _run(scenario)


@pytest.mark.parametrize("num_streams", [1, 4])
def test_bulk_stream_of_64_mib_arrives_intact(num_streams: int) -> None:
    payload = os.urandom(64 << 20)

    async def scenario() -> None:
        async with Node(_config()) as a, Node(_config()) as b:
            received: list[bytes] = []

            async def handler(sender: str, topic: str, data: bytearray) -> None:
                assert sender == a.peer_id
                received.append(hashlib.sha256(data).digest())

            b.on_bulk("tensor", handler)
            await a.pool.dial(DialTarget(b.addresses[0]), expected_peer_id=b.peer_id)
            started = time.perf_counter()
            await a.send_bulk(b.peer_id, "tensor", payload, num_streams=num_streams)
            elapsed = time.perf_counter() - started
            assert received == [hashlib.sha256(payload).digest()]
            assert b.counters.peers[a.peer_id].bytes_received == len(payload)
            print(f"\nbulk 64 MiB over {num_streams} streams: {64 / elapsed:.0f} MiB/s")
            with pytest.raises(ProtocolError, match="no handler"):
                await a.send_bulk(b.peer_id, "nobody-listens", b"x", timeout_s=5)

    _run(scenario)


def test_a_one_chunk_transfer_goes_as_one_unary_call_and_a_larger_one_as_a_stream() -> None:
    async def scenario() -> None:
        config = _config(limits=LimitsConfig(bulk_chunk_bytes=1 << 20))
        async with Node(config) as a, Node(config) as b:
            received: list[bytes] = []

            async def handler(sender: str, topic: str, data: bytearray | memoryview) -> None:
                received.append(bytes(data))

            b.on_bulk_read_only("t", handler)
            await a.pool.dial(DialTarget(b.addresses[0]), expected_peer_id=b.peer_id)
            small, large = os.urandom(1 << 20), os.urandom(3 << 20)
            await a.send_bulk(b.peer_id, "t", [small[:100], memoryview(small)[100:]])
            assert b.counters.rpc_calls[PUSH_ONE_METHOD] == 1
            await a.send_bulk(b.peer_id, "t", large)
            assert b.counters.rpc_calls[PUSH_METHOD] == 1
            assert received == [small, large]

    _run(scenario)


def test_a_second_peer_on_a_port_in_use_is_refused() -> None:
    """gRPC sets SO_REUSEPORT: the second peer listened beside the first, and callers reached
    one or the other at random (a swarm split between them)."""

    async def scenario() -> None:
        async with Node(_config()) as first:
            taken = f"127.0.0.1:{first.port}"
            with pytest.raises(ConfigError, match=r"net\.listen_address: cannot listen"):
                async with Node(NodeConfig(listen_address=taken, swarm_secret=SECRET)):
                    pass

    _run(scenario)


class _LyingHelper(net_pb2_grpc.ReachabilityServicer):
    """A dial-back helper that says it reached the caller, at an address it names itself."""

    def __init__(self, host: str) -> None:
        self.host = host

    async def DialBack(self, request: Any, context: Any) -> Any:
        port = request.addresses[0].rpartition(":")[2]
        reached = [f"{self.host}:{port}", "203.0.113.9:4242"]  # (4242: a port never asked of)
        return net_pb2.DialBackResponse(observed_address=self.host, reachable_addresses=reached)


@pytest.mark.parametrize("dialable", [False, True])
def test_a_node_is_direct_where_most_helpers_reach_it_and_at_the_addresses_two_name(
    dialable: bool,
) -> None:
    # One helper's word made a node behind NAT direct (a liar's, or one on its LAN that reached
    # a private address): it published an address nobody else could dial and took no relay.
    # Here two honest helpers and one that says it reached the node (where it did not).
    async def scenario() -> None:
        advertised = () if dialable else ("127.0.0.1:9",)  # (dials to port 9 fail)
        async with (
            Node(_config()) as honest1,
            Node(_config()) as honest2,
            Node(_config()) as liar,
            Node(_config(advertise_addresses=advertised)) as node,
        ):
            liar.add_servicer(
                net_pb2_grpc.add_ReachabilityServicer_to_server, _LyingHelper("203.0.113.7")
            )
            own = node.addresses[0]
            for helper in (liar, honest1, honest2):
                await node.bootstrap([f"{helper.peer_id}@{helper.addresses[0]}"])
            assert await node.check_reachability(num_helpers=3, timeout_s=4.0) is dialable
            if not dialable:
                assert node.reachability == net_pb2.REACHABILITY_RELAYED
                assert node.addresses == ("127.0.0.1:9",)
                return
            assert node.reachability == net_pb2.REACHABILITY_DIRECT
            # what two helpers reached: the liar's address, named by it alone, is left out
            assert node.addresses == (own,)

    _run(scenario)


def test_a_call_waits_for_another_call_s_dial_of_the_peer_within_its_own_deadline() -> None:
    # A heartbeat (2.5 s) waited on the dial lock for a bulk transfer's dial (60 s) of the same
    # frozen peer: the peer was declared gone that late.
    async def scenario() -> None:
        async with silent_listener() as silent, Node(_config()) as a:
            other = Identity.generate()
            value = net_pb2.PeerRecordValue(addresses=[f"127.0.0.1:{silent.port}"])
            a.dht.learn(sign_peer_record(other, value, now_s=time.time(), ttl_s=60))
            long_dial = asyncio.ensure_future(a.pool.connection(other.peer_id, timeout_s=20.0))
            await until(lambda: bool(silent.accepted), 5.0, "the long dial reached the peer")
            started = time.monotonic()
            with pytest.raises(DeadlineExceededError, match="another dial of it"):
                await a.ping(other.peer_id, timeout_s=0.5)
            assert time.monotonic() - started < 1.5
            long_dial.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await long_dial

    _run(scenario)


def test_a_half_open_breaker_s_trial_cancelled_by_its_caller_lets_the_next_call_through() -> None:
    # The breaker kept the cancelled trial "in flight" and refused every later call: a live
    # peer was unreachable, and reported gone, for good.
    entered: list[int] = []

    async def slow(request: Any, context: Any) -> Any:
        entered.append(1)
        await asyncio.sleep(1.0)  # (a slow handler: what the calls wait on)
        return net_pb2.PingResponse()

    def add_slow(servicer: object, server: Any) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            slow,
            request_deserializer=net_pb2.PingRequest.FromString,
            response_serializer=net_pb2.PingResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("test.Slow", {"Sleep": handler})]
        )

    async def scenario() -> None:
        breaker_config = BreakerConfig(failure_threshold=1, open_s=0.2)
        async with Node(_config(breaker=breaker_config)) as a, Node(_config()) as b:
            b.add_servicer(add_slow, object())
            await a.pool.dial(DialTarget(b.addresses[0]), expected_peer_id=b.peer_id)

            async def slow_call(timeout_s: float) -> None:
                await a.call(
                    b.peer_id,
                    "/test.Slow/Sleep",
                    net_pb2.PingRequest(),
                    net_pb2.PingResponse,
                    timeout_s=timeout_s,
                    retry=False,
                )

            with pytest.raises(DeadlineExceededError):
                await slow_call(0.05)
            breaker = a.pool.breakers[b.peer_id]
            await until(lambda: breaker.state == "half-open", 5.0, "the breaker half-opened")
            trial = asyncio.ensure_future(slow_call(5.0))
            await until(lambda: len(entered) == 2, 5.0, "the trial reached the slow handler")
            trial.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trial
            await a.ping(b.peer_id)
            assert breaker.state == "closed"

    _run(scenario)


def test_a_handshake_request_that_does_not_decode_is_refused_as_malformed_and_counted() -> None:
    async def scenario() -> None:
        async with Node(_config()) as a:
            der = await probe_server_certificate(a.addresses[0], 5.0)
            credentials = grpc.ssl_channel_credentials(cert_pem_of_der(der))
            override = [("grpc.ssl_target_name_override", TLS_SERVER_NAME)]
            async with grpc.aio.secure_channel(a.addresses[0], credentials, override) as channel:
                for method in ("Hello", "Prove"):
                    call = channel.unary_unary(f"/gossamer.net.v1.Handshake/{method}")
                    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
                        await call(b"\xff\xff\xff", timeout=5.0)
                    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert "does not decode" in (excinfo.value.details() or "")
            assert a.counters.num_protocol_errors == 2

    _run(scenario)


def test_a_bootstrap_peer_that_keeps_silent_is_warned_about_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The node tries its bootstrap peers again every few seconds while it knows nobody: a
    # warning each time (a dashboard's terminal: one every 5 s).
    async def scenario() -> None:
        with socket.socket() as closed:  # a port nobody listens on
            closed.bind(("127.0.0.1", 0))
            entry = f"127.0.0.1:{closed.getsockname()[1]}"
            async with Node(_config(connect_timeout_s=1.0)) as node:
                with caplog.at_level(logging.DEBUG, logger="gossamer.net.node"):
                    for _ in range(3):
                        assert await node.bootstrap([entry]) == 0
        said = [r for r in caplog.records if "did not answer" in r.getMessage()]
        assert [r.levelno for r in said] == [logging.WARNING, logging.DEBUG, logging.DEBUG]

    _run(scenario)
