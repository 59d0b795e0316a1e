"""What relays and direct-reservation holders can make a peer hold, and how soon a hung relay is
noticed: real gRPC on loopback (and a real paused process)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from gossamer.net import tunnel_carry
from gossamer.net.accepted_tunnels import (
    MAX_ACCEPTED_TUNNELS_PER_DIRECT_RESERVATION,
    MAX_ACCEPTED_TUNNELS_PER_RESERVATION,
)
from gossamer.net.config import LimitsConfig, NodeConfig
from gossamer.net.identity import Identity
from gossamer.net.node import Node
from gossamer.net.relay import (
    ACCEPT_METHOD,
    CONNECT_METHOD,
    MAX_TUNNELS_PER_HOST_TO_TARGET,
    RESERVE_METHOD,
    BytePipe,
    RelayServicer,
)
from gossamer.net.tunnel_carry import FRAME_BYTES
from gossamer.proto import net_pb2, net_pb2_grpc
from loopback_nodes import until
from relay_nodes import make_unreachable

SECRET = b"relay-bounds-secret-0123456789ab"
_RELAY_PROCESS = Path(__file__).parents[1] / "net_relay_process.py"


def _config(**overrides: Any) -> NodeConfig:
    return NodeConfig(listen_address="127.0.0.1:0", swarm_secret=SECRET, **overrides)


def _hidden_config(**overrides: Any) -> NodeConfig:
    """A peer that says it is behind NAT (its address dials nothing)."""
    return _config(advertise_addresses=("127.0.0.1:9",), **overrides)


def _run(scenario: Callable[[], Awaitable[None]], timeout_s: float = 60) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=timeout_s))


class _AnnouncingService(RelayServicer):
    """A relay service that announces the given events on every reservation, direct or not,
    and holds every tunnel it is accepted on, sending nothing, until the caller ends it."""

    def __init__(self, node: Node, events: list[net_pb2.RelayEvent]) -> None:
        super().__init__(node.config.relay, node.counters, node.clock, may_relay=lambda: True)
        self.events = events
        self.accepted: list[str] = []
        """Tunnel ids accepted, in order."""
        self.num_ended = 0
        """Accepted tunnels whose caller ended them."""

    async def Reserve(
        self, request: net_pb2.ReserveRequest, context: Any
    ) -> AsyncIterator[net_pb2.RelayEvent]:
        yield net_pb2.RelayEvent(reserved=True)
        for event in self.events:
            yield event
        await asyncio.Event().wait()

    async def Accept(
        self, request_iterator: AsyncIterator[net_pb2.TunnelFrame], context: Any
    ) -> AsyncIterator[net_pb2.TunnelFrame]:
        first = await anext(request_iterator)
        self.accepted.append(first.tunnel_id)
        try:
            await asyncio.Event().wait()  # never ends the call itself
        finally:
            self.num_ended += 1
        yield net_pb2.TunnelFrame()


def _announcements(dialer: str, count: int) -> list[net_pb2.RelayEvent]:
    return [net_pb2.RelayEvent(tunnel_id=f"{i:024x}", dialer_peer_id=dialer) for i in range(count)]


async def _hold_direct_reservation_at(hidden: Node, holder: Node, service: RelayServicer) -> None:
    """``hidden`` (behind NAT) takes a direct reservation at ``holder``, whose record says it is
    reachable directly, as it does for a reachable peer that tunnelled to it."""
    holder.add_servicer(net_pb2_grpc.add_RelayServicer_to_server, service)
    holder.reachability = net_pb2.REACHABILITY_DIRECT
    hidden.dht.learn(holder.sign_own_record())
    hidden.upgrades.offer(holder.peer_id)
    await until(lambda: holder.peer_id in hidden.upgrades.active, 10, "a direct reservation")


def test_a_direct_reservation_carries_a_few_tunnels_apart_from_the_relays_share() -> None:
    """A direct reservation had a relay's 96 tunnels, out of the 256 all reservations shared:
    three throwaway identities claiming to be reachable took every place, and nobody reached
    the peer through its relays."""

    async def scenario() -> None:
        async with (
            Node(_config()) as relay,
            Node(_hidden_config()) as hidden,
            Node(_config()) as holder,
            Node(_config()) as dialer,
        ):
            await make_unreachable(hidden, relay)
            num_announced = MAX_ACCEPTED_TUNNELS_PER_RESERVATION
            service = _AnnouncingService(holder, _announcements(holder.peer_id, num_announced))
            num_offered = 0
            accept = hidden.accepted_tunnels.accept

            def counted(*args: Any, **kwargs: Any) -> bool:
                nonlocal num_offered
                num_offered += 1
                return accept(*args, **kwargs)

            hidden.accepted_tunnels.accept = counted  # type: ignore[method-assign]
            await _hold_direct_reservation_at(hidden, holder, service)
            cap = MAX_ACCEPTED_TUNNELS_PER_DIRECT_RESERVATION
            await until(
                lambda: num_offered >= num_announced and len(service.accepted) >= cap,
                20,
                "every announcement looked at",
            )
            await hidden.ping(holder.peer_id)  # (an accepted tunnel's call has reached it)
            assert len(service.accepted) == cap
            assert hidden.accepted_tunnels.open_from(holder.peer_id, direct=True) == cap
            assert hidden.accepted_tunnels.num_open() == 0  # the relays' share is untouched
            # and a peer that tunnels in through the relay gets through
            record = hidden.own_record()
            assert record is not None
            dialer.dht.learn(record)
            await dialer.ping(hidden.peer_id)

    _run(scenario)


def test_an_accepted_tunnel_ends_soon_after_its_local_connection_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tunnel waited for the far side to end its call, even after the peer's own server had
    closed the local connection: a holder that never ended one kept it for good. (Ended
    ``STALLED_TUNNEL_S`` after the call last took a frame, 30 s; 2 s here.)"""
    quick_close = LimitsConfig(transport_handshake_timeout_s=1.0)
    monkeypatch.setattr(tunnel_carry, "STALLED_TUNNEL_S", 2.0)

    async def scenario() -> None:
        async with (
            Node(_config()) as relay,
            Node(_hidden_config(limits=quick_close)) as hidden,
            Node(_config()) as holder,
        ):
            await make_unreachable(hidden, relay)
            num_announced = MAX_ACCEPTED_TUNNELS_PER_DIRECT_RESERVATION
            service = _AnnouncingService(holder, _announcements(holder.peer_id, num_announced))
            await _hold_direct_reservation_at(hidden, holder, service)
            await until(lambda: len(service.accepted) == num_announced, 10, "tunnels accepted")
            # Nothing comes through them: the server closes each local connection after 1 s
            # (no TLS hello), and the peer ends the call STALLED_TUNNEL_S later.
            await until(
                lambda: service.num_ended == num_announced,
                15,
                "the tunnels ended by the peer",
            )
            await until(
                lambda: hidden.accepted_tunnels.open_from(holder.peer_id, direct=True) == 0,
                5,
                "their places given back",
            )

    _run(scenario)


def test_malformed_tunnel_announcements_are_refused_before_anything_is_kept() -> None:
    """Tunnel and dialer ids had no size limit: a relay's 8 MiB ids were kept for each tunnel's
    life, and unknown dialer ids up to 256 at a time (2 GiB, 973 MiB in the review)."""
    good_dialer = Identity.generate().peer_id
    events = [
        net_pb2.RelayEvent(tunnel_id="t" * (1 << 20), dialer_peer_id=good_dialer),
        net_pb2.RelayEvent(tunnel_id=f"{1:024x}", dialer_peer_id="d" * (1 << 20)),
        net_pb2.RelayEvent(tunnel_id=f"{2:024x}", dialer_peer_id="x" * 52),
        net_pb2.RelayEvent(tunnel_id=f"{3:024x}", dialer_peer_id=good_dialer),
    ]

    async def scenario() -> None:
        async with Node(_config()) as relay, Node(_hidden_config()) as hidden:
            service = _AnnouncingService(relay, events)
            relay.add_servicer(net_pb2_grpc.add_RelayServicer_to_server, service)
            await make_unreachable(hidden, relay)
            await until(lambda: service.accepted, 10, "the well-formed tunnel accepted")
            await hidden.ping(relay.peer_id)  # (the others' calls would have come first)
            assert service.accepted == [f"{3:024x}"]
            assert hidden.accepted_tunnels.open_from(relay.peer_id) == 1
            assert all(len(p) < 100 for p in hidden.upgrades._tunnelled_at)

            # on a direct reservation, only its holder dials back through it
            async with Node(_config()) as holder:
                own = net_pb2.RelayEvent(tunnel_id=f"{9:024x}", dialer_peer_id=holder.peer_id)
                holder_service = _AnnouncingService(holder, [*_announcements(good_dialer, 1), own])
                await _hold_direct_reservation_at(hidden, holder, holder_service)
                await until(lambda: holder_service.accepted, 10, "the holder's tunnel accepted")
                await hidden.ping(holder.peer_id)
                assert holder_service.accepted == [own.tunnel_id]
                assert hidden.accepted_tunnels.open_from(holder.peer_id, direct=True) == 1

    _run(scenario)


def test_one_host_holds_at_most_half_of_one_target_s_tunnels() -> None:
    """Four throwaway identities on one host, 16 tunnels each, took all 64 places a relay keeps
    for one target: nobody else reached that peer through the relay."""
    num_calls_each = MAX_TUNNELS_PER_HOST_TO_TARGET // 3 + 2  # (within one dialer's 16)

    async def scenario() -> None:
        async with (
            Node(_config()) as relay,
            Node(_hidden_config()) as hidden,
            Node(_config()) as first,
            Node(_config()) as second,
            Node(_config()) as third,
        ):
            await make_unreachable(hidden, relay)
            forever = asyncio.Event()

            async def idle() -> Any:
                yield net_pb2.TunnelFrame(target_peer_id=hidden.peer_id)
                await forever.wait()

            calls = []
            for attacker in (first, second, third):  # three identities, one host
                await attacker.bootstrap([f"{relay.peer_id}@{relay.addresses[0]}"])
                connection = await attacker.pool.connection(relay.peer_id)
                connect = connection.stream_stream(CONNECT_METHOD, net_pb2.TunnelFrame)
                calls += [
                    connect(idle(), metadata=connection.metadata) for _ in range(num_calls_each)
                ]
            try:
                num_over = len(calls) - MAX_TUNNELS_PER_HOST_TO_TARGET
                await until(
                    lambda: sum(c.done() for c in calls) >= num_over, 10, "the calls over refused"
                )
                refused = [c for c in calls if c.done()]
                for call in refused:
                    assert await call.code() == grpc.StatusCode.UNAVAILABLE
                    assert "tunnels open to" in str(call), call
                    assert "most from one address to one peer" in str(call)
                # (the attackers' own lookups may hold a tunnel to hidden already)
                assert num_over <= len(refused) <= num_over + 3
            finally:
                for call in calls:
                    call.cancel()

    _run(scenario)


def test_a_relay_queues_at_most_a_frame_each_way_of_a_tunnel_whose_ends_never_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each way of a tunnel queued up to 16 frames of 256 KiB: 64 tunnels whose two ends both
    sent and never read held 512 MiB in the relay's pipes (and more in gRPC)."""
    num_tunnels = 4
    frame = b"\xab" * FRAME_BYTES

    async def endless(first: net_pb2.TunnelFrame) -> AsyncIterator[net_pb2.TunnelFrame]:
        yield first
        while True:
            yield net_pb2.TunnelFrame(data=frame)

    pipes: list[BytePipe] = []
    made = BytePipe.__init__

    def made_and_kept(pipe: BytePipe, *args: Any, **kwargs: Any) -> None:
        made(pipe, *args, **kwargs)
        pipes.append(pipe)

    monkeypatch.setattr(BytePipe, "__init__", made_and_kept)

    async def scenario() -> None:
        async with Node(_config()) as relay, Node(_config()) as target, Node(_config()) as dialer:
            for node in (target, dialer):
                await node.bootstrap([f"{relay.peer_id}@{relay.addresses[0]}"])
            to_relay = await target.pool.connection(relay.peer_id)
            reserve = to_relay.unary_stream(RESERVE_METHOD, net_pb2.RelayEvent)(
                net_pb2.ReserveRequest(), metadata=to_relay.metadata
            )
            calls: list[Any] = [reserve]
            try:
                assert (await reserve.read()).reserved
                from_dialer = await dialer.pool.connection(relay.peer_id)
                for _ in range(num_tunnels):  # both ends send without end and never read
                    calls.append(
                        from_dialer.stream_stream(CONNECT_METHOD, net_pb2.TunnelFrame)(
                            endless(net_pb2.TunnelFrame(target_peer_id=target.peer_id)),
                            metadata=from_dialer.metadata,
                        )
                    )
                    event = await reserve.read()
                    calls.append(
                        to_relay.stream_stream(ACCEPT_METHOD, net_pb2.TunnelFrame)(
                            endless(net_pb2.TunnelFrame(tunnel_id=event.tunnel_id)),
                            metadata=to_relay.metadata,
                        )
                    )
                # until every pipe is full: a writer waits on each
                await until(
                    lambda: (
                        len(pipes) == 2 * num_tunnels
                        and not any(p._writable.is_set() for p in pipes)
                    ),
                    30,
                    "every pipe of the relay full",
                )
                queued = sum(len(f) for p in pipes for f in p._frames)
                assert queued <= 2 * num_tunnels * FRAME_BYTES, queued
            finally:
                for call in calls:
                    call.cancel()

    _run(scenario)


def test_a_hung_relay_is_noticed_within_the_keepalive_interval_and_timeout() -> None:
    """A peer relayed by a hung (SIGSTOPped) relay kept naming it for over a minute: only
    gRPC's keepalive watched it, its ack held to ``grpc.http2.ping_timeout_ms`` (60 s by
    default). The reservation's heartbeats give it up after keepalive interval + timeout."""
    keepalive = {"keepalive_interval_s": 1.0, "keepalive_timeout_s": 1.0}

    async def scenario() -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(_RELAY_PROCESS),
            SECRET.decode(),
            "1.0",
            "1.0",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            relay_id, relay_address = line.decode().split()
            async with Node(_hidden_config(**keepalive)) as hidden:
                await hidden.bootstrap([f"{relay_id}@{relay_address}"])
                hidden.reachability = net_pb2.REACHABILITY_RELAYED
                hidden.reservations.wake()
                assert await hidden.wait_for_relay(10.0), "no relay reservation within 10 s"
                os.kill(process.pid, signal.SIGSTOP)
                loop = asyncio.get_running_loop()
                paused_at = loop.time()
                # (1 s + 1 s of heartbeats unanswered, and the reservation's end seen; the
                # old code: 60 s and more)
                await until(lambda: not hidden.relays, 15, "the hung relay dropped")
                assert loop.time() - paused_at < 15
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)
                process.kill()
            await asyncio.wait_for(process.wait(), 10)

    _run(scenario)
