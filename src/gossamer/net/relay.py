"""The relay service: peers that cannot be reached keep a reservation here, others tunnel to them.

A relayed peer holds a ``Reserve`` stream open; the relay answers ``reserved`` and then announces
each incoming tunnel on it. A dialer opens ``Connect`` naming the target; the relay announces a
tunnel id to the target, which opens ``Accept`` naming that id, and the relay splices the two
streams. The relay only moves opaque bytes: TLS and the handshake run end to end between the
dialer and the target inside the tunnel, so a relay can neither read nor forge what it carries.

Relayed bytes are capped per relayed peer (a token bucket over both directions together) and
counted in :attr:`NetCounters.relayed_bytes`.

A *direct* reservation (``ReserveRequest.direct``) is a connection reversal, not a relay: a peer
behind NAT that reached this one directly holds it so that this peer's own node can dial back
through it (:meth:`RelayServicer.carry_local`). Nobody else may tunnel through it, its bytes are
neither capped nor counted as relayed, and it is allowed on a peer that does not relay for others.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from gossamer.core.clock import Clock
from gossamer.core.errors import DeadlineExceededError, PeerUnavailableError, ProtocolError
from gossamer.net.addresses import observed_host, remote_host
from gossamer.net.config import RelayConfig
from gossamer.net.counters import NetCounters
from gossamer.net.identity import short_peer_id
from gossamer.net.server import current_session
from gossamer.proto import net_pb2, net_pb2_grpc

__all__ = [
    "ACCEPT_METHOD",
    "CONNECT_METHOD",
    "MAX_TUNNELS_PER_HOST_TO_TARGET",
    "RESERVE_METHOD",
    "TUNNEL_ID_CHARS",
    "BytePipe",
    "RelayServicer",
    "TokenBucket",
]

_log = logging.getLogger(__name__)
RESERVE_METHOD = "/gossamer.net.v1.Relay/Reserve"
CONNECT_METHOD = "/gossamer.net.v1.Relay/Connect"
ACCEPT_METHOD = "/gossamer.net.v1.Relay/Accept"
_PIPE_BYTES = 256 * 1024
"""Bytes one pipe (one direction of a tunnel) queues: one frame of the largest size. It was 16
frames (4 MiB): 64 tunnels whose two ends both sent and never read held 512 MiB in pipes. One
frame carries a tunnel as fast (uncapped, on loopback: 232-304 MiB/s, 224-230 before)."""
_MAX_EVENTS = 64
MAX_PENDING_PER_PEER = 32
MAX_TUNNELS_PER_TARGET = 64
MAX_TUNNELS_PER_HOST_TO_TARGET = MAX_TUNNELS_PER_TARGET // 2
"""Open tunnels to one target whose dialers call from one host: four throwaway identities on
one host, 16 tunnels each, filled a target's 64 and no other peer could reach it through this
relay. Half, as a host's reservations are half: a quarter (16) kept the 17th peer of an office
behind one NAT from reaching a relayed peer through a relay, and one host cannot tell an
office from throwaway identities."""
_MAX_TUNNELS_PER_DIALER = 16
_MAX_TUNNELS = 1024
"""Open tunnels a relay carries: to one target, from one dialer, in all. The bytes they queue in
the relay's pipes are bounded by a frame each way a tunnel (1,024 x 2 x 256 KiB = 512 MiB; a
relay-wide budget under which writers waited was tried and dropped: four hosts filled it and
every other tunnel on the relay stalled).
Not bounded here: what gRPC takes in on each tunnel's two calls while their pipes are full. A
server's receive window per call is what gRPC's BDP probe sizes it (at least 4 MiB; 13 MiB a
call on loopback, measured), so a host's 256 tunnels whose ends send and never read can make
the relay hold GiBs (64 such tunnels: +1.7 GiB). Capping the window is a server-wide option
(``grpc.http2.bdp_probe``, ``lookahead_bytes``), and it cut the node's own bulk transfers
(1 stream at 50 ms round trip: 117-143 to 17 MiB/s), so it is not set; see docs/net.md."""
_MAX_TUNNELS_PER_HOST = _MAX_TUNNELS // 4
"""Open tunnels whose dialers call from one host: identities cost nothing, and 64 of them on
one TLS connection took all 1,024 places, every other peer's tunnel refused (peers behind one
NAT share a host, hence a quarter of the relay, not a few)."""
_MAX_FRAME_BYTES = 256 * 1024
"""Largest tunnel frame accepted (a tunnel's sender reads its socket in frames this big)."""
_MAX_DIRECT_RESERVATIONS = 256
TUNNEL_ID_CHARS = 24
"""Characters of the tunnel ids a relay makes (12 random bytes, in hex): a relayed peer refuses
an announcement with a longer one."""


class TokenBucket:
    """A byte-rate cap: :meth:`take` waits until the bytes fit under ``rate``.

    Args:
        rate_bytes_per_s: sustained rate.
        burst_bytes: bytes that may pass at once after an idle spell.
        clock: time source (waits go through it, so tests can move time).
    """

    def __init__(self, rate_bytes_per_s: float, burst_bytes: float, clock: Clock) -> None:
        self.rate = rate_bytes_per_s
        self.burst = burst_bytes
        self._clock = clock
        self._tokens = burst_bytes
        self._stamp = clock.monotonic()
        self.throttled_s = 0.0
        """Time spent waiting for tokens, in all."""

    async def take(self, num_bytes: int) -> None:
        """Spend ``num_bytes``; waits while the bucket is in debt (a frame may overdraw it)."""
        now = self._clock.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= num_bytes
        if self._tokens < 0:
            wait_s = -self._tokens / self.rate
            self.throttled_s += wait_s
            await self._clock.sleep_async(wait_s)


class BytePipe:
    """A bounded one-way queue of byte frames between two tasks; closing wakes both ends.

    It holds at most ``max_bytes`` (a frame is always taken into an empty pipe).

    After :meth:`close`, :meth:`get` still hands out what was queued, then returns None, and
    :meth:`put` returns False; :meth:`discard` drops what is queued.
    """

    def __init__(self, max_bytes: int = _PIPE_BYTES) -> None:
        self._frames: deque[bytes] = deque()
        self._num_bytes = 0
        self._max_bytes = max_bytes
        self._closed = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()

    def _has_room(self, num_bytes: int) -> bool:
        return not self._frames or self._num_bytes + num_bytes <= self._max_bytes

    async def put(self, data: bytes) -> bool:
        """Queue a frame, waiting for room; False once the pipe is closed."""
        while not self._closed and not self._has_room(len(data)):
            self._writable.clear()
            await self._writable.wait()
        if self._closed:
            return False
        self._frames.append(data)
        self._num_bytes += len(data)
        self._readable.set()
        return True

    async def get(self) -> bytes | None:
        """The next frame, or None once the pipe is closed and drained."""
        while not self._frames and not self._closed:
            self._readable.clear()
            await self._readable.wait()
        if self._frames:
            data = self._frames.popleft()
            self._num_bytes -= len(data)
            self._writable.set()
            return data
        return None

    def close(self) -> None:
        """No more frames go in."""
        self._closed = True
        self._readable.set()
        self._writable.set()

    def discard(self) -> None:
        """Close, and drop what is queued (its reader is gone)."""
        self.close()
        self._frames.clear()
        self._num_bytes = 0


@dataclass(slots=True)
class _Reservation:
    peer_id: str
    bucket: TokenBucket
    events: asyncio.Queue[net_pb2.RelayEvent] = field(
        default_factory=lambda: asyncio.Queue(_MAX_EVENTS)
    )
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    num_pending: int = 0
    direct: bool = False
    host: str = ""
    """The address the reservation came from."""


@dataclass(slots=True)
class _Tunnel:
    tunnel_id: str
    dialer: str
    target: str
    reservation: _Reservation
    dialer_host: str = ""
    """Where the dialer called from ('' for this relay's own node)."""
    to_target: BytePipe = field(default_factory=BytePipe)
    """Filled by the dialer's side, drained by the target's."""
    to_dialer: BytePipe = field(default_factory=BytePipe)
    """Filled by the target's side, drained by the dialer's."""
    accepted: asyncio.Event = field(default_factory=asyncio.Event)
    on_close: Callable[[], None] | None = None
    """Gives back the tunnel's place among the open ones (once)."""

    def close(self) -> None:
        self.to_target.close()
        self.to_dialer.close()
        if self.on_close is not None:
            on_close, self.on_close = self.on_close, None
            on_close()


async def _first_frame(
    requests: AsyncIterator[net_pb2.TunnelFrame], timeout_s: float, what: str
) -> net_pb2.TunnelFrame:
    try:
        async with asyncio.timeout(timeout_s):
            return await anext(requests)
    except TimeoutError as exc:
        raise DeadlineExceededError(f"{what}: no first frame within {timeout_s} s") from exc
    except StopAsyncIteration as exc:
        raise ProtocolError(f"{what}: the stream ended before its first frame") from exc


class RelayServicer(net_pb2_grpc.RelayServicer):
    """Relays byte tunnels to peers that hold a reservation here.

    Args:
        config: whether to relay, how many peers, the per-peer bandwidth cap.
        counters: relayed bytes per relayed peer, tunnels, reservations.
        clock: time source of the bandwidth cap.
        may_relay: whether this node can relay right now (it must itself be reachable).
        accept_timeout_s: how long a dialer waits for the target to accept a tunnel.
    """

    def __init__(
        self,
        config: RelayConfig,
        counters: NetCounters,
        clock: Clock,
        may_relay: Callable[[], bool],
        *,
        accept_timeout_s: float = 5.0,
    ) -> None:
        self._config = config
        self._counters = counters
        self._clock = clock
        self._may_relay = may_relay
        self._accept_timeout_s = accept_timeout_s
        self._reservations: dict[str, _Reservation] = {}
        self._pending: dict[str, _Tunnel] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._direct: dict[str, _Reservation] = {}
        self._num_open_to: Counter[str] = Counter()
        self._num_open_from: Counter[str] = Counter()
        self._num_open_from_host: Counter[str] = Counter()
        self._num_open_from_host_to: Counter[tuple[str, str]] = Counter()
        self.on_direct_reservation: Callable[[str], None] | None = None
        """Called with the peer id when a peer takes a direct reservation here."""
        self.on_direct_reservation_ended: Callable[[str], None] | None = None
        """Called with the peer id when its direct reservation here ends."""

    @property
    def reserved_peers(self) -> list[str]:
        """Peers holding a (relay) reservation here."""
        return list(self._reservations)

    def has_direct(self, peer_id: str) -> bool:
        """Whether ``peer_id`` holds a direct reservation here (this node can dial it back)."""
        reservation = self._direct.get(peer_id)
        return reservation is not None and not reservation.ended.is_set()

    def _bucket(self, peer_id: str) -> TokenBucket:
        # One bucket per relayed peer, kept across reservations so reconnecting does not reset it.
        bucket = self._buckets.get(peer_id)
        if bucket is None:
            rate = self._config.bytes_per_s_per_peer
            bucket = TokenBucket(rate, max(rate * 0.05, 1 << 20), self._clock)
            if len(self._buckets) >= 4 * max(1, self._config.max_reservations):
                for stale in [p for p in self._buckets if p not in self._reservations]:
                    del self._buckets[stale]
            self._buckets[peer_id] = bucket
        return bucket

    async def Reserve(
        self, request: net_pb2.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[net_pb2.RelayEvent]:
        peer = current_session().peer_id
        table = self._direct if request.direct else self._reservations
        if request.direct:
            limit = _MAX_DIRECT_RESERVATIONS
        elif not self._config.serve or not self._may_relay():
            raise PeerUnavailableError("this peer does not relay (opted out or not reachable)")
        else:
            limit = self._config.max_reservations
        previous = table.get(peer)
        host = observed_host(context.peer())
        if previous is None and len(table) >= limit:
            raise PeerUnavailableError(f"this peer is full ({limit} reservations)")
        per_host = self._config.max_reservations_per_host
        if previous is None and sum(r.host == host for r in table.values()) >= per_host:
            raise PeerUnavailableError(
                f"this peer holds {per_host} reservations from {host} already (the most from "
                "one address); try another relay"
            )
        if previous is not None:
            previous.ended.set()  # the peer reconnected: the newer stream wins
        reservation = _Reservation(peer, self._bucket(peer), direct=request.direct, host=host)
        table[peer] = reservation
        self._counters.relay_reservations = len(self._reservations)
        kind = "direct reservation" if request.direct else "reservation"
        _log.info("relay: %s for %s", kind, short_peer_id(peer))
        try:
            yield net_pb2.RelayEvent(reserved=True)
            if request.direct and self.on_direct_reservation is not None:
                self.on_direct_reservation(peer)
            while not reservation.ended.is_set():
                get = asyncio.ensure_future(reservation.events.get())
                ended = asyncio.ensure_future(reservation.ended.wait())
                try:
                    await asyncio.wait((get, ended), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in (get, ended):
                        waiter.cancel()
                if get.done() and not get.cancelled():
                    yield get.result()
        finally:
            reservation.ended.set()
            if table.get(peer) is reservation:
                del table[peer]
                if request.direct and self.on_direct_reservation_ended is not None:
                    self.on_direct_reservation_ended(peer)
            self._counters.relay_reservations = len(self._reservations)
            _log.info("relay: %s for %s ended", kind, short_peer_id(peer))

    async def Connect(
        self,
        request_iterator: AsyncIterator[net_pb2.TunnelFrame],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[net_pb2.TunnelFrame]:
        dialer = current_session().peer_id
        first = await _first_frame(request_iterator, self._accept_timeout_s, "relay connect")
        host = remote_host(context.peer())
        tunnel = await self._open_tunnel(dialer, first.target_peer_id, host=host)
        try:
            self._counters.relay_tunnels_opened += 1
            if first.data and not await self._forward(tunnel, tunnel.to_target, first.data):
                return
            async for frame in self._splice(
                tunnel, request_iterator, tunnel.to_target, tunnel.to_dialer
            ):
                yield frame
        finally:
            tunnel.close()
            tunnel.to_dialer.discard()  # (nobody drains it now)

    async def _open_tunnel(
        self, dialer: str, target: str, *, host: str = "", direct: bool = False, local: bool = False
    ) -> _Tunnel:
        """Announce a tunnel to ``target`` and wait until it accepts (``host``: where the dialer
        calls from; ``local``: this relay's own node dials, which no per-dialer cap limits)."""
        reservation = (self._direct if direct else self._reservations).get(target)
        if reservation is None or reservation.ended.is_set():
            raise PeerUnavailableError(f"peer {short_peer_id(target)} holds no reservation here")
        if reservation.num_pending >= MAX_PENDING_PER_PEER:
            raise PeerUnavailableError(f"too many tunnels waiting for {short_peer_id(target)}")
        if self._num_open_to[target] >= MAX_TUNNELS_PER_TARGET:
            raise PeerUnavailableError(f"too many tunnels open to {short_peer_id(target)}")
        if not local and self._num_open_from[dialer] >= _MAX_TUNNELS_PER_DIALER:
            raise PeerUnavailableError(
                f"this peer has {_MAX_TUNNELS_PER_DIALER} tunnels open here already"
            )
        if not local and self._num_open_from_host_to[host, target] >= (
            MAX_TUNNELS_PER_HOST_TO_TARGET
        ):
            raise PeerUnavailableError(
                f"peers at this host have {MAX_TUNNELS_PER_HOST_TO_TARGET} tunnels open to "
                f"{short_peer_id(target)} here already (the most from one address to one peer); "
                "try another of its relays"
            )
        if not local and self._num_open_from_host[host] >= _MAX_TUNNELS_PER_HOST:
            raise PeerUnavailableError(
                f"peers at this host have {_MAX_TUNNELS_PER_HOST} tunnels open here already"
            )
        if self._num_open_from.total() >= _MAX_TUNNELS:
            raise PeerUnavailableError(f"this relay carries {_MAX_TUNNELS} tunnels already")
        tunnel = _Tunnel(
            secrets.token_hex(TUNNEL_ID_CHARS // 2),
            dialer,
            target,
            reservation,
            host,
            to_target=BytePipe(_PIPE_BYTES),
            to_dialer=BytePipe(_PIPE_BYTES),
        )
        # Counted from now on, waiting or open (many announced at once must not all pass the
        # caps before the first is accepted); closing the tunnel gives its place back.
        self._num_open_to[target] += 1
        self._num_open_from[dialer] += 1
        if tunnel.dialer_host:
            self._num_open_from_host[tunnel.dialer_host] += 1
            self._num_open_from_host_to[tunnel.dialer_host, target] += 1
        tunnel.on_close = lambda: self._closed(tunnel)
        self._pending[tunnel.tunnel_id] = tunnel
        reservation.num_pending += 1
        try:
            try:
                reservation.events.put_nowait(
                    net_pb2.RelayEvent(tunnel_id=tunnel.tunnel_id, dialer_peer_id=dialer)
                )
                # (a reservation that ends meanwhile ends the wait: the target is gone from here)
                waits = [
                    asyncio.ensure_future(e.wait()) for e in (tunnel.accepted, reservation.ended)
                ]
                try:
                    await asyncio.wait(
                        waits, timeout=self._accept_timeout_s, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    for wait in waits:
                        wait.cancel()
            except asyncio.QueueFull as exc:
                raise PeerUnavailableError(f"{short_peer_id(target)} is not keeping up") from exc
            finally:
                reservation.num_pending -= 1
                self._pending.pop(tunnel.tunnel_id, None)
            if not tunnel.accepted.is_set():
                if reservation.ended.is_set():
                    raise PeerUnavailableError(
                        f"{short_peer_id(target)}'s reservation here ended before it accepted "
                        "the tunnel"
                    )
                raise PeerUnavailableError(
                    f"{short_peer_id(target)} did not accept the tunnel within "
                    f"{self._accept_timeout_s} s"
                )
        except BaseException:
            # Possibly accepted in the very turn the dialer gave up: its other end must end too.
            tunnel.close()
            raise
        return tunnel

    def _closed(self, tunnel: _Tunnel) -> None:
        counted: list[tuple[Counter[Any], Any]] = [
            (self._num_open_to, tunnel.target),
            (self._num_open_from, tunnel.dialer),
        ]
        if tunnel.dialer_host:  # (this relay's own node's tunnels count under no host)
            counted.append((self._num_open_from_host, tunnel.dialer_host))
            counted.append((self._num_open_from_host_to, (tunnel.dialer_host, tunnel.target)))
        for counts, key in counted:
            counts[key] -= 1
            if counts[key] <= 0:
                del counts[key]

    async def carry_local(
        self,
        dialer: str,
        target: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        frame_bytes: int,
        *,
        direct: bool = False,
    ) -> None:
        """A tunnel whose dialer is this relay's own node: a local socket stands in for Connect.

        Args:
            direct: through the target's direct reservation (a connection reversal).

        Raises:
            PeerUnavailableError: the target holds no such reservation here or does not accept.
        """
        tunnel = await self._open_tunnel(dialer, target, direct=direct, local=True)
        if not direct:
            self._counters.relay_tunnels_opened += 1

        async def pump_in() -> None:
            try:
                while data := await reader.read(frame_bytes):
                    if not await self._forward(tunnel, tunnel.to_target, data):
                        return
            finally:
                tunnel.to_target.close()

        task = asyncio.get_running_loop().create_task(pump_in(), name="relay-local-pump")
        try:
            while (data := await tunnel.to_dialer.get()) is not None:
                writer.write(data)
                await writer.drain()
        finally:
            tunnel.close()
            tunnel.to_dialer.discard()  # (nobody drains it now)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except OSError as exc:
                _log.debug("local tunnel %s ended: %s", tunnel.tunnel_id, exc)
            writer.close()

    async def Accept(
        self,
        request_iterator: AsyncIterator[net_pb2.TunnelFrame],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[net_pb2.TunnelFrame]:
        peer = current_session().peer_id
        first = await _first_frame(request_iterator, self._accept_timeout_s, "relay accept")
        tunnel = self._pending.get(first.tunnel_id)
        if tunnel is None or tunnel.target != peer:
            raise ProtocolError("no tunnel with that id is waiting for this peer")
        del self._pending[first.tunnel_id]
        tunnel.accepted.set()
        try:
            async for frame in self._splice(
                tunnel, request_iterator, tunnel.to_dialer, tunnel.to_target
            ):
                yield frame
        finally:
            tunnel.close()
            tunnel.to_target.discard()  # (nobody drains it now)

    async def _forward(self, tunnel: _Tunnel, pipe: BytePipe, data: bytes) -> bool:
        if len(data) > _MAX_FRAME_BYTES:
            raise ProtocolError(
                f"tunnel frame of {len(data)} bytes (at most {_MAX_FRAME_BYTES} accepted)"
            )
        if not tunnel.reservation.direct:  # a reversed connection is not relaying
            await tunnel.reservation.bucket.take(len(data))
            self._counters.relayed(tunnel.target, len(data))
        return await pipe.put(data)

    async def _splice(
        self,
        tunnel: _Tunnel,
        requests: AsyncIterator[net_pb2.TunnelFrame],
        outbound: BytePipe,
        inbound: BytePipe,
    ) -> AsyncIterator[net_pb2.TunnelFrame]:
        """Forward this side's frames into ``outbound``; yield the other side's from ``inbound``."""

        async def pump() -> None:
            try:
                async for frame in requests:
                    if frame.data and not await self._forward(tunnel, outbound, frame.data):
                        return
                    if frame.close:
                        return
            finally:
                outbound.close()

        task = asyncio.get_running_loop().create_task(pump(), name="relay-pump")
        try:
            while (data := await inbound.get()) is not None:
                yield net_pb2.TunnelFrame(data=data)
            yield net_pb2.TunnelFrame(close=True)
        finally:
            tunnel.close()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # the other side's stream broke: the tunnel is over
                _log.debug("relay tunnel %s ended: %s", tunnel.tunnel_id, exc)
