"""Relays on loopback: a peer marked unreachable is reached through a relay with the same API."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from gossamer.core.clock import SystemClock
from gossamer.core.errors import PeerUnavailableError
from gossamer.net import tunnels
from gossamer.net.accepted_tunnels import MAX_ACCEPTED_TUNNELS_PER_RESERVATION
from gossamer.net.config import NodeConfig, RelayConfig
from gossamer.net.counters import NetCounters
from gossamer.net.directory import PeerDirectory
from gossamer.net.identity import Identity
from gossamer.net.node import Node
from gossamer.net.records import sign_peer_record
from gossamer.net.relay import CONNECT_METHOD, RelayServicer
from gossamer.net.relay_dialer import MAX_IDLE_ENTRANCES, RelayDialer
from gossamer.net.tls import TlsCertificate
from gossamer.net.tunnel_carry import carry_socket_over_call
from gossamer.proto import net_pb2, net_pb2_grpc
from loopback_nodes import until
from relay_nodes import learn_record_of, make_unreachable, ping

SECRET = b"relay-test-secret-0123456789"


def _config(**overrides: Any) -> NodeConfig:
    return NodeConfig(listen_address="127.0.0.1:0", swarm_secret=SECRET, **overrides)


def _run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_unreachable_peer_is_reached_through_a_relay_with_the_same_api() -> None:
    payload = os.urandom(8 << 20)

    async def scenario() -> None:
        async with (
            Node(_config()) as relay,
            Node(_config(advertise_addresses=("127.0.0.1:9",))) as hidden,
            Node(_config()) as dialer,
        ):
            await make_unreachable(hidden, relay)
            assert hidden.relays == [(relay.peer_id, relay.addresses[0])]
            record = hidden.own_record()
            assert record is not None
            dialer.dht.learn(record)
            received: list[bytes] = []

            async def handler(sender: str, topic: str, data: bytearray) -> None:
                received.append(hashlib.sha256(data).digest())

            hidden.on_bulk("t", handler)
            await dialer.ping(hidden.peer_id)
            await dialer.send_bulk(hidden.peer_id, "t", payload, num_streams=2)
            assert received == [hashlib.sha256(payload).digest()]
            connection = dialer.pool.get(hidden.peer_id)
            assert connection is not None
            assert connection.target.kind == "relayed"
            assert dialer.counters.connections["relayed"] == 1
            assert relay.counters.relayed_bytes[hidden.peer_id] >= len(payload)
            assert relay.counters.relay_reservations == 1
            # the relayed peer can call back as well (its own relayed or direct connection)
            await hidden.ping(dialer.peer_id)
            # the relay itself dials the hidden peer through its own reservation
            relay.dht.learn(record)
            received.clear()
            await relay.send_bulk(hidden.peer_id, "t", payload[: 1 << 20])
            assert received == [hashlib.sha256(payload[: 1 << 20]).digest()]

    _run(scenario)


def test_relay_that_opted_out_refuses_and_the_dial_fails_cleanly() -> None:
    async def scenario() -> None:
        async with (
            Node(_config(relay=RelayConfig(serve=False))) as relay,
            Node(_config()) as hidden,
        ):
            await hidden.bootstrap([f"{relay.peer_id}@{relay.addresses[0]}"])
            hidden.reachability = net_pb2.REACHABILITY_RELAYED
            hidden.reservations.wake()
            assert not await hidden.wait_for_relay(1.0)
            assert hidden.relays == []
            assert relay.counters.relay_reservations == 0

    _run(scenario)


def test_a_relay_takes_only_so_many_reservations_from_one_address() -> None:
    # Peer ids cost nothing to make: one machine's throwaway ids filled every reservation.
    async def scenario() -> None:
        relay_config = RelayConfig(max_reservations_per_host=2)
        async with (
            Node(_config(relay=relay_config)) as relay,
            Node(_config()) as first,
            Node(_config()) as second,
            Node(_config()) as third,
        ):
            await make_unreachable(first, relay)
            await make_unreachable(second, relay)
            await third.bootstrap([f"{relay.peer_id}@{relay.addresses[0]}"])
            third.reachability = net_pb2.REACHABILITY_RELAYED
            third.reservations.wake()
            assert not await third.wait_for_relay(1.5)
            assert sorted(relay.relay_service.reserved_peers) == sorted(
                [first.peer_id, second.peer_id]
            )

    _run(scenario)


def test_a_reservation_refused_keeps_the_connection_and_a_broken_one_drops_it() -> None:
    # A reservation that failed on a broken connection left it in the pool: the next try (and
    # every call to the relay) used it again until the DHT's refresh dropped it, 15 s later.
    async def scenario() -> None:
        relay_config = RelayConfig(max_reservations_per_host=1)
        async with Node(_config()) as held, Node(_config()) as refused:
            relay = Node(_config(relay=relay_config))
            async with relay:
                await make_unreachable(held, relay)
                await refused.bootstrap([f"{relay.peer_id}@{relay.addresses[0]}"])
                connection = refused.pool.get(relay.peer_id)
                refused.reachability = net_pb2.REACHABILITY_RELAYED
                refused.reservations.wake()
                assert not await refused.wait_for_relay(1.5)  # (the relay answered: no)
                assert refused.pool.get(relay.peer_id) is connection
                assert held.pool.get(relay.peer_id) is not None
            # The relay is gone (its process died, say): its connection goes with the failed
            # reservation (at once here; 3 s later, by other calls failing, before).
            await until(
                lambda: held.pool.get(relay.peer_id) is None,
                1.5,
                "the broken connection to the relay dropped",
            )

    _run(scenario)


def test_relay_caps_bandwidth_per_relayed_peer() -> None:
    payload = os.urandom(6 << 20)
    rate = 4e6

    async def scenario() -> None:
        async with (
            Node(_config(relay=RelayConfig(bytes_per_s_per_peer=rate))) as relay,
            Node(_config(advertise_addresses=("127.0.0.1:9",))) as hidden,
            Node(_config()) as dialer,
        ):
            await make_unreachable(hidden, relay)
            learn_record_of(dialer, hidden)
            done = asyncio.Event()

            async def handler(sender: str, topic: str, data: bytearray) -> None:
                done.set()

            hidden.on_bulk("t", handler)
            await dialer.ping(hidden.peer_id)
            loop = asyncio.get_running_loop()
            started = loop.time()
            await dialer.send_bulk(hidden.peer_id, "t", payload, timeout_s=30)
            elapsed = loop.time() - started
            assert done.is_set()
            # the bucket starts with 1 MiB of burst; the rest flows at the cap at most
            assert elapsed >= (len(payload) - (1 << 20)) / rate * 0.9
            assert relay.counters.relayed_bytes[hidden.peer_id] >= len(payload)

    _run(scenario)


def test_dialing_a_relayed_peer_whose_relay_is_gone_fails_with_unavailable() -> None:
    async def scenario() -> None:
        async with Node(_config()) as dialer, Node(_config()) as hidden:
            relay = Node(_config())
            await relay.start()
            try:
                await make_unreachable(hidden, relay)
                learn_record_of(dialer, hidden)
            finally:
                await relay.stop()
            with pytest.raises(PeerUnavailableError):
                await ping(dialer, hidden.peer_id, timeout_s=2.0)

    _run(scenario)


def test_reachable_dialer_upgrades_to_direct_and_falls_back_to_the_relay() -> None:
    payload = os.urandom(4 << 20)

    async def scenario() -> None:
        async with (
            Node(_config()) as relay,
            Node(_config(advertise_addresses=("127.0.0.1:9",))) as hidden,
            Node(_config(advertise_addresses=("127.0.0.1:9",))) as other_hidden,
            Node(_config()) as dialer,
        ):
            dialer.reachability = net_pb2.REACHABILITY_DIRECT
            dialer.sign_own_record()
            await make_unreachable(hidden, relay)
            await make_unreachable(other_hidden, relay)
            for node in (dialer, other_hidden):
                learn_record_of(node, hidden)
            received: list[bytes] = []

            async def handler(sender: str, topic: str, data: bytearray) -> None:
                received.append(hashlib.sha256(data).digest())

            hidden.on_bulk("t", handler)
            # the first contact goes through the relay; the hidden peer then offers a way back
            await dialer.send_bulk(hidden.peer_id, "t", payload)
            await until(lambda: dialer.counters.num_direct_upgrades == 1, 10, "no upgrade")
            connection = dialer.pool.get(hidden.peer_id)
            assert connection is not None
            assert connection.target.kind == "direct"
            assert dialer.counters.connections["relayed"] == 0
            assert hidden.upgrades.active == {dialer.peer_id}
            relayed_before = relay.counters.relayed_bytes[hidden.peer_id]
            await dialer.send_bulk(hidden.peer_id, "t", payload, num_streams=2)
            assert received == [hashlib.sha256(payload).digest()] * 2
            # The payload went the direct way; the idle relayed connection (kept while calls on
            # it finish) may still pass a late HTTP/2 control frame or two through the relay.
            assert relay.counters.relayed_bytes[hidden.peer_id] - relayed_before < 4096
            assert hidden.counters.relayed_bytes == {}  # reversing is not relaying

            # two peers behind NAT cannot reach each other directly: they stay relayed
            await other_hidden.send_bulk(hidden.peer_id, "t", payload[: 1 << 20])
            assert received[-1] == hashlib.sha256(payload[: 1 << 20]).digest()
            assert other_hidden.peer_id not in hidden.upgrades.holding
            other = other_hidden.pool.get(hidden.peer_id)
            assert other is not None
            assert other.target.kind == "relayed"

            # the way back goes away: the next call falls back to the relay
            await hidden.upgrades.close()
            await until(
                lambda: not dialer.relay_service.has_direct(hidden.peer_id), 5, "still reserved"
            )
            await dialer.send_bulk(hidden.peer_id, "t", payload[: 1 << 20], timeout_s=20)
            connection = dialer.pool.get(hidden.peer_id)
            assert connection is not None
            assert connection.target.kind == "relayed"
            assert relay.counters.relayed_bytes[hidden.peer_id] > relayed_before

    _run(scenario)


def test_one_dialer_cannot_open_more_than_its_share_of_a_relay_s_tunnels() -> None:
    """Tunnels that send nothing after their first frame used to be carried without limit (181
    of 200 from one peer in the review, two pipes of up to 128 MiB each): at most 16 per dialer
    now, and frames over 256 KiB are refused."""

    async def scenario() -> None:
        async with (
            Node(_config()) as relay,
            Node(_config(advertise_addresses=("127.0.0.1:9",))) as hidden,
            Node(_config()) as attacker,
        ):
            await make_unreachable(hidden, relay)
            await attacker.bootstrap([f"{relay.peer_id}@{relay.addresses[0]}"])
            connection = await attacker.pool.connection(relay.peer_id)
            connect = connection.stream_stream(CONNECT_METHOD, net_pb2.TunnelFrame)
            forever = asyncio.Event()

            async def idle() -> Any:
                yield net_pb2.TunnelFrame(target_peer_id=hidden.peer_id)
                await forever.wait()

            opened_before = relay.counters.relay_tunnels_opened
            calls = [connect(idle(), metadata=connection.metadata) for _ in range(24)]
            try:
                for _ in range(100):  # bounded: until the relay refused what it will
                    await asyncio.sleep(0.1)
                    if sum(c.done() for c in calls) >= len(calls) - 16:
                        break
                await asyncio.sleep(0.5)
                refused = [c for c in calls if c.done()]
                # (the attacker's own lookups may hold a tunnel to hidden already)
                assert len(calls) - 16 <= len(refused) <= len(calls) - 15
                for call in refused:
                    assert await call.code() == grpc.StatusCode.UNAVAILABLE
                    assert "16 tunnels open here already" in str(call)
                assert relay.counters.relay_tunnels_opened - opened_before <= 16
            finally:
                for call in calls:
                    call.cancel()

            async def big() -> Any:
                yield net_pb2.TunnelFrame(target_peer_id=hidden.peer_id)
                yield net_pb2.TunnelFrame(data=b"\0" * (1 << 20))
                await forever.wait()

            await asyncio.sleep(0.5)  # the cancelled tunnels give their places back
            call = connect(big(), metadata=connection.metadata)
            async with asyncio.timeout(10):  # the relay ends the tunnel at the big frame
                frames = [frame async for frame in call]
            assert not any(frame.data for frame in frames)

    _run(scenario)


def test_two_records_naming_each_other_as_relays_cost_one_failed_dial() -> None:
    """A relay was reached through its own relays: with T relayed by R and R by T, one failed
    dial of T kept the node dialling between them for good (4-5 relayed dials every 10 s)."""

    async def scenario() -> None:
        async with Node(_config()) as victim:
            cert = TlsCertificate.generate().cert_der
            t, r = Identity.generate(), Identity.generate()
            for me, other in ((t, r), (r, t)):
                value = net_pb2.PeerRecordValue(
                    addresses=["127.0.0.1:9"],
                    reachability=net_pb2.REACHABILITY_RELAYED,
                    relays=[
                        net_pb2.RelayHop(relay_peer_id=other.peer_id, relay_address="127.0.0.1:9")
                    ],
                    tls_cert_der=cert,
                    relay_service=True,
                )
                victim.dht.learn(sign_peer_record(me, value, now_s=time.time(), ttl_s=600))
            with pytest.raises(PeerUnavailableError):
                await victim.pool.connection(t.peer_id, timeout_s=2.0)
            await asyncio.sleep(0.5)
            dials = victim.counters.num_relayed_dials
            await asyncio.sleep(3.0)
            assert victim.counters.num_relayed_dials == dials
            assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("tunnel-")]

    _run(scenario)


class _HangingPool:
    """A pool whose dials never end: a tunnel through an entrance stays open until closed."""

    def dial_lock(self, peer_id: str) -> asyncio.Lock:
        return asyncio.Lock()

    def get(self, peer_id: str) -> None:
        return None

    async def dial(self, *args: object, **kwargs: object) -> None:
        await asyncio.Event().wait()


def test_idle_entrances_beyond_the_most_recent_are_closed_and_open_tunnels_kept() -> None:
    # One listening socket per relayed peer ever dialled, for the node's life: a long run that
    # met a thousand relayed peers held a thousand of them (a process's usual limit of files).
    async def scenario() -> None:
        counters = NetCounters()
        directory = PeerDirectory("me", SystemClock(), counters, max_value_bytes=1024, max_peers=16)
        dialer = RelayDialer(_HangingPool(), directory, "me", counters)  # type: ignore[arg-type]
        try:
            busy = await dialer._entrance("busy", "relay", "127.0.0.1:1")
            host, _, port = busy.rpartition(":")
            _, writer = await asyncio.open_connection(host, int(port))  # a tunnel, left open
            await asyncio.sleep(0.1)
            first_idle = await dialer._entrance("idle-0", "relay", "127.0.0.1:1")
            for index in range(1, MAX_IDLE_ENTRANCES + 20):
                await dialer._entrance(f"idle-{index}", "relay", "127.0.0.1:1")
            assert dialer.num_entrances == MAX_IDLE_ENTRANCES + 1
            # The busy entrance still accepts; the least recently dialled idle one is closed.
            assert await dialer._entrance("busy", "relay", "127.0.0.1:1") == busy
            _, second = await asyncio.open_connection(host, int(port))
            second.close()
            idle_host, _, idle_port = first_idle.rpartition(":")
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(idle_host, int(idle_port))
            writer.close()
        finally:
            await dialer.close()

    _run(scenario)


def test_a_tunnel_whose_connection_closed_under_it_ends_as_unavailable() -> None:
    # gRPC raises UsageError for a call on a closed channel; it escaped the tunnel task
    # (unlogged) and left the local socket open.
    async def scenario() -> None:
        def open_call(frames: object) -> object:
            raise grpc.aio.UsageError("Channel is closed.")

        left, right = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=left)
        try:
            with pytest.raises(PeerUnavailableError, match="connection is closed"):
                await carry_socket_over_call(
                    reader, writer, open_call, net_pb2.TunnelFrame(tunnel_id="t")
                )
            assert writer.is_closing()
        finally:
            right.close()

    _run(scenario)


class _FloodingRelay(RelayServicer):
    """A relay that announces tunnels without end and holds every one it is accepted on."""

    def __init__(self, node: Node, num_announced: int) -> None:
        super().__init__(node.config.relay, node.counters, node.clock, may_relay=lambda: True)
        self.num_announced = num_announced
        self.num_accepted = 0

    async def Reserve(
        self, request: net_pb2.ReserveRequest, context: Any
    ) -> AsyncIterator[net_pb2.RelayEvent]:
        yield net_pb2.RelayEvent(reserved=True)
        dialer = Identity.generate().peer_id
        for i in range(self.num_announced):
            yield net_pb2.RelayEvent(tunnel_id=f"{i:024x}", dialer_peer_id=dialer)
        await asyncio.Event().wait()

    async def Accept(
        self, request_iterator: AsyncIterator[net_pb2.TunnelFrame], context: Any
    ) -> AsyncIterator[net_pb2.TunnelFrame]:
        await anext(request_iterator)
        self.num_accepted += 1
        await asyncio.Event().wait()  # holds the tunnel, sends nothing
        yield net_pb2.TunnelFrame()


def test_a_relay_announcing_tunnels_without_end_gets_no_more_than_an_honest_one_could() -> None:
    # Each tunnel a relayed peer accepts takes two of its sockets: 1,500 announcements took
    # 3,000 file descriptors, past the usual limit of 1,024.
    num_announced = 3 * MAX_ACCEPTED_TUNNELS_PER_RESERVATION

    async def scenario() -> None:
        async with (
            Node(_config()) as relay,
            Node(_config(advertise_addresses=("127.0.0.1:9",))) as hidden,
        ):
            flooding = _FloodingRelay(relay, num_announced)
            relay.add_servicer(net_pb2_grpc.add_RelayServicer_to_server, flooding)
            num_fds = len(os.listdir("/proc/self/fd"))
            num_offered = 0
            accept = hidden.accepted_tunnels.accept

            def counted(*args: Any, **kwargs: Any) -> bool:
                nonlocal num_offered
                num_offered += 1
                return accept(*args, **kwargs)

            hidden.accepted_tunnels.accept = counted  # type: ignore[method-assign]
            await make_unreachable(hidden, relay)
            deadline = time.monotonic() + 30
            while num_offered < num_announced or (
                flooding.num_accepted < MAX_ACCEPTED_TUNNELS_PER_RESERVATION
            ):
                assert time.monotonic() < deadline, (num_offered, flooding.num_accepted)
                await asyncio.sleep(0.05)
            assert hidden.accepted_tunnels.open_from(relay.peer_id) == (
                MAX_ACCEPTED_TUNNELS_PER_RESERVATION
            )
            assert flooding.num_accepted == MAX_ACCEPTED_TUNNELS_PER_RESERVATION
            # two sockets a tunnel (the local one's ends), and a few of the node's own
            assert len(os.listdir("/proc/self/fd")) - num_fds < (
                2 * MAX_ACCEPTED_TUNNELS_PER_RESERVATION + 32
            )
            await hidden.ping(relay.peer_id)  # and the node still works

    _run(scenario)


def test_a_dialer_follows_a_relay_that_restarted_at_another_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The dialer's entrance for (target, relay) kept the relay address of its first dial: once
    # the relay came back on another port and the target's record said so, this dialer went on
    # dialling the old one, while any other peer got through.
    monkeypatch.setattr(tunnels, "_RETRY_RELAY_AFTER_S", 0.5)  # (a failed relay's, 10 s)
    identity = Identity.generate()
    no_relay = {"relay": RelayConfig(serve=False)}

    async def scenario() -> None:
        relay = Node(_config(), identity)
        await relay.start()
        try:
            async with (
                Node(_config(advertise_addresses=("127.0.0.1:9",), **no_relay)) as hidden,
                Node(_config(**no_relay)) as dialer,
            ):
                await make_unreachable(hidden, relay)
                learn_record_of(dialer, hidden)
                await ping(dialer, hidden.peer_id, timeout_s=3.0)
                old_address = relay.addresses[0]

                await relay.stop()
                relay = Node(_config(), identity)  # the same key, another port
                await relay.start()
                await hidden.bootstrap([f"{relay.peer_id}@{relay.addresses[0]}"])
                hidden.reservations.wake()
                await until(
                    lambda: [a for _, a in hidden.relays] == [relay.addresses[0]],
                    20,
                    "the hidden peer reserved the relay at its new address",
                )
                assert relay.addresses[0] != old_address
                learn_record_of(dialer, hidden)
                await dialer.pool.drop(relay.peer_id)  # (the DHT's refresh would, in a while)
                await dialer.pool.drop(hidden.peer_id)
                dialer.pool.breakers.forget(hidden.peer_id)
                await ping(dialer, hidden.peer_id, timeout_s=3.0)
                connection = dialer.pool.get(relay.peer_id)
                assert connection is not None
                assert connection.target.address == relay.addresses[0]
        finally:
            await relay.stop()

    _run(scenario)


def test_a_tunnel_whose_target_leaves_the_relay_before_accepting_fails_at_once() -> None:
    # The relay waited out its 5 s accept timeout for a target whose reservation had ended,
    # and the dialer's connect deadline (as long) ran out first: a slow failure, misnamed.
    async def scenario() -> None:
        async with Node(_config()) as relay, Node(_config()) as dialer:
            hidden = Node(_config(advertise_addresses=("127.0.0.1:9",)))
            await hidden.start()
            try:
                await make_unreachable(hidden, relay)
                learn_record_of(dialer, hidden)
                announced = asyncio.Event()

                def accept_none(*args: Any, **kwargs: Any) -> bool:
                    announced.set()
                    return False

                hidden.accepted_tunnels.accept = accept_none  # type: ignore[method-assign]
                pinging = asyncio.ensure_future(ping(dialer, hidden.peer_id, timeout_s=20.0))
                await asyncio.wait_for(announced.wait(), 10)
            finally:
                await hidden.stop()
            left = time.monotonic()
            with pytest.raises(PeerUnavailableError):
                await pinging
            assert time.monotonic() - left < 3.0

    _run(scenario)
