"""A relayed connection on a thin, busy link, on loopback: the relay's answers to heartbeats
come late behind the tunnels' data, and a tunnel's local socket waits on a slow call.

At 500 kbit/s with bulk data both ways (netlab, /tmp/impl_relay/repro.py in the review), a
relayed connection was lost twice over: to ``TCP_USER_TIMEOUT`` on the loopback socket between
gRPC and the tunnel (its window shut for over 5 s while a 256 KiB frame crossed the link), and
to the relay watches, which gave up a relay whose heartbeat answers came 8-23 s late although
the tunnels' bytes kept coming from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gossamer.net.config import NodeConfig, RelayConfig
from gossamer.net.dht_service import DhtServicer
from gossamer.net.node import Node
from gossamer.net.tunnel_carry import carry_socket_over_call
from gossamer.proto import net_pb2
from relay_nodes import learn_record_of, make_unreachable, ping

SECRET = b"relay-thin-link-secret-0123456789"
_KEEPALIVE = {"keepalive_interval_s": 1.0, "keepalive_timeout_s": 1.0}
"""A relay is given up after 2 s with nothing from it (the default is 10 + 5 s)."""


def _config(**overrides: Any) -> NodeConfig:
    return NodeConfig(listen_address="127.0.0.1:0", swarm_secret=SECRET, **overrides)


def _run(scenario: Callable[[], Awaitable[None]], timeout_s: float = 60) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=timeout_s))


def test_a_relay_whose_heartbeat_answers_come_late_behind_tunnel_data_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The relay answers heartbeats 5 s late (more than the 2 s window) but forwards the
    tunnel's bytes at once: the dialer keeps its connection through it and the relayed peer
    its reservation, while calls go through the tunnel for 4 windows. Before, both gave the
    relay up after 2 s, with the connection through it."""
    late_s = 5.0
    relay_dht: list[Any] = []
    ping_answer = DhtServicer.Ping

    async def late_ping(self: DhtServicer, request: net_pb2.PingRequest, context: Any) -> Any:
        if self._dht in relay_dht and not request.HasField("sender"):
            await asyncio.sleep(late_s)  # (the relay's answer queued behind data: the fault)
        return await ping_answer(self, request, context)

    monkeypatch.setattr(DhtServicer, "Ping", late_ping)
    no_relay = RelayConfig(serve=False)

    async def scenario() -> None:
        async with (
            Node(_config(**_KEEPALIVE)) as relay,
            Node(
                _config(advertise_addresses=("127.0.0.1:9",), relay=no_relay, **_KEEPALIVE)
            ) as hidden,
            Node(_config(relay=no_relay, **_KEEPALIVE)) as dialer,
        ):
            await make_unreachable(hidden, relay)
            learn_record_of(dialer, hidden)
            await ping(dialer, hidden.peer_id, timeout_s=5.0)
            way = dialer.pool.get(hidden.peer_id)
            assert way is not None
            assert way.target.kind == "relayed", way.target
            relay_dht.append(relay.dht)  # (from now on its heartbeat answers come late)
            loop = asyncio.get_running_loop()
            until = loop.time() + 8.0
            num_pings = 0
            while loop.time() < until:  # (the tunnel's bytes: one round trip after another)
                await ping(dialer, hidden.peer_id, timeout_s=2.0)
                num_pings += 1
            assert dialer.pool.get(hidden.peer_id) is way, "the relayed connection was dropped"
            assert [r for r, _ in hidden.relays] == [relay.peer_id], "the reservation ended"
            assert num_pings > 10, num_pings

    _run(scenario)


class _SlowCall:
    """A tunnel call whose far side takes one frame every ``every_s`` (a thin link) and sends
    nothing back until cancelled."""

    def __init__(self, frames: AsyncIterator[net_pb2.TunnelFrame], every_s: float) -> None:
        self.num_bytes = 0
        self._cancelled = asyncio.Event()
        self._taking = asyncio.ensure_future(self._take(frames, every_s))

    async def _take(self, frames: AsyncIterator[net_pb2.TunnelFrame], every_s: float) -> None:
        async for frame in frames:
            self.num_bytes += len(frame.data)
            await asyncio.sleep(every_s)  # (the thin link's pace: the condition under test)

    def __aiter__(self) -> _SlowCall:
        return self

    async def __anext__(self) -> net_pb2.TunnelFrame:
        await self._cancelled.wait()
        raise StopAsyncIteration

    def cancel(self) -> None:
        self._taking.cancel()
        self._cancelled.set()


def test_a_tunnel_reads_its_local_socket_ahead_of_a_slow_call() -> None:
    """gRPC's sockets carry ``TCP_USER_TIMEOUT``: one whose reader leaves its window shut that
    long is reset (ETIMEDOUT). With 5 s (``keepalive_timeout_s``), a tunnel that read its local
    socket a frame at a time as the call took them, 4 s and more a 256 KiB frame on a 500
    kbit/s link, lost the relayed connection; it is ``unacked_data_timeout_s`` (60 s) since,
    and a tunnel reads at most ``READ_AHEAD_BYTES`` (1 MiB) ahead. Here, scaled, the sender's
    timeout is 1 s and the call takes a frame every 0.25 s: 12 MB, more than the kernel's
    buffers (several MB) and the read-ahead hold, must go in without a reset."""
    payload = bytes(12_000_000)

    async def scenario() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        sender = socket.create_connection(listener.getsockname())
        sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000)
        near, _ = listener.accept()
        listener.close()
        reader, writer = await asyncio.open_connection(sock=near)
        calls: list[_SlowCall] = []

        def open_call(frames: AsyncIterator[net_pb2.TunnelFrame]) -> _SlowCall:
            calls.append(_SlowCall(frames, every_s=0.25))
            return calls[0]

        carrying = asyncio.ensure_future(
            carry_socket_over_call(reader, writer, open_call, net_pb2.TunnelFrame(tunnel_id="t"))
        )
        try:
            # (ETIMEDOUT once the window stayed shut 1 s)
            await asyncio.wait_for(asyncio.to_thread(sender.sendall, payload), 20.0)
            assert calls[0].num_bytes > 1_000_000  # (the window was shut and reopened)
        finally:
            carrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await carrying
            for call in calls:
                call.cancel()
            sender.close()

    _run(scenario, timeout_s=40)
