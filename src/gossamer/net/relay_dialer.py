"""Dialling a peer nobody can dial: through its relays, or back over its direct reservation.

The dialer's gRPC channel connects to a local *entrance* (127.0.0.1, a port picked by the OS)
per (target, relay) pair; each connection accepted there opens ``Relay.Connect`` towards the
target through the relay, and the relays tunnels go through are watched for silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from gossamer.core.errors import GossamerError, PeerUnavailableError
from gossamer.net.connections import (
    ConnectionPool,
    DialTarget,
    PeerConnection,
    ended_under_call,
)
from gossamer.net.counters import NetCounters
from gossamer.net.directory import PeerDirectory
from gossamer.net.grpc_errors import answered_by_handler
from gossamer.net.identity import short_peer_id
from gossamer.net.owned_tasks import OwnedTasks
from gossamer.net.printable_text import printable_reason
from gossamer.net.recent_failures import note_failure
from gossamer.net.relay import CONNECT_METHOD, RelayServicer
from gossamer.net.relay_traffic import RelayTraffic
from gossamer.net.tunnel_carry import FRAME_BYTES, carry_socket_over_call
from gossamer.net.tunnels import _RETRY_RELAY_AFTER_S
from gossamer.proto import net_pb2

__all__ = ["MAX_IDLE_ENTRANCES", "REVERSED_ADDRESS", "RelayDialer"]

_log = logging.getLogger(__name__)
REVERSED_ADDRESS = "reversed over its own connection"
"""The address of a dial target through a direct reservation (no address of its own)."""
MAX_IDLE_ENTRANCES = 64
"""Entrances with no tunnel open kept listening (the most recently dialled): one per relayed
peer ever dialled would hold a listening socket each for the node's life."""
_FAILED_RELAY_LAST_FOR_S = 60.0
"""How long a relay that refused a tunnel, could not be reached or hung is dialled after the
target's other relays."""
_PING_METHOD = "/gossamer.net.v1.Dht/Ping"
_NO_ANSWER = frozenset(
    {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)
"""Statuses of a heartbeat that say nothing came back from the relay (others are answers)."""


@dataclass(slots=True)
class _Entrance:
    """A local listening socket whose connections are tunnelled to one target."""

    server: asyncio.Server
    relay_address: str
    """Where the relay is dialled when no connection to it is open: the address the target's
    record named for it at the latest dial (a relay restarted elsewhere is followed there)."""
    tunnels: int = 0
    """Connections accepted here whose tunnel is still open."""
    refusal: str | None = None
    """Why the latest tunnel from here was refused, since the latest dial opened it."""
    dials: int = 0
    """Dials through here so far: a tunnel accepted under an earlier dial (refused late, in its
    grace after that dial gave up) must not put its refusal on the latest dial's error."""


class RelayDialer:
    """Dial targets through relays: a local entrance per (target, relay) pair.

    Entrances with no tunnel open are closed beyond the :data:`MAX_IDLE_ENTRANCES` used last
    (a later dial opens a new one).

    A relay's refusal of a tunnel is what the dial through it fails with (gRPC sees only the
    entrance's socket close). A relay that tunnels go through is watched as the relayed peers
    watch theirs: one that answers no heartbeat for ``keepalive_interval_s +
    keepalive_timeout_s`` is given up with the connections through it, so that the next dial
    goes through another relay (only gRPC's ping deadline, 60 s, ended them before). A relay
    that failed a tunnel is dialled after the target's other relays for a while.

    Args:
        pool: the node's connections (the relay is dialed through it).
        directory: where the target's record (its relays and certificate) comes from.
        own_peer_id: this node's id.
        counters: relayed dials are counted here.
        local_relay: this node's relay service, for targets that hold a reservation here.
    """

    def __init__(
        self,
        pool: ConnectionPool,
        directory: PeerDirectory,
        own_peer_id: str,
        counters: NetCounters,
        local_relay: RelayServicer | None = None,
    ) -> None:
        self._local_relay = local_relay
        self._pool = pool
        self._directory = directory
        self._own_peer_id = own_peer_id
        self._counters = counters
        self._entrances: OrderedDict[tuple[str, str], _Entrance] = OrderedDict()
        """Open entrances, the least recently dialled first."""
        self._tasks = OwnedTasks()
        self._closed = False
        self._tunnels_via: Counter[str] = Counter()
        """Tunnels open through each relay (its connection dialled, this node not the relay)."""
        self._watches: dict[str, tuple[PeerConnection, asyncio.Task[Any]]] = {}
        """The heartbeat watch of each relay tunnels go through, and the connection it watches."""
        self._relay_failed_at: dict[str, float] = {}

    @functools.cached_property
    def _traffic(self) -> RelayTraffic:
        return RelayTraffic.of(self._pool)

    def direct_target(self, peer_id: str) -> DialTarget | None:
        """The way back to ``peer_id`` through its direct reservation here, if it holds one.

        The tunnel runs over the connection the peer opened to this node, so its bytes cross no
        third peer: a connection reversal, counted as ``direct``.
        """
        record = self._directory.get(peer_id)
        if self._local_relay is None or record is None or not self._local_relay.has_direct(peer_id):
            return None
        return DialTarget(
            REVERSED_ADDRESS,
            "direct",
            record.tls_cert_der,
            open_entrance=functools.partial(
                self._entrance, peer_id, self._own_peer_id, "", direct=True
            ),
            tunnel_refusal=functools.partial(self._refusal, (peer_id, "direct")),
        )

    def targets(self, peer_id: str) -> list[DialTarget]:
        """Ways to reach ``peer_id``: back over its direct reservation, then its relays."""
        record = self._directory.get(peer_id)
        if record is None:
            return []
        reversed_ = self.direct_target(peer_id)
        now = self._pool.clock.monotonic()
        relays = sorted(  # (those that failed lately last)
            record.relays,
            key=lambda hop: (
                now - self._relay_failed_at.get(hop[0], -1e9) < _FAILED_RELAY_LAST_FOR_S
            ),
        )
        return ([reversed_] if reversed_ else []) + [
            DialTarget(
                f"relay {short_peer_id(relay_id)} at {relay_address}",
                "relayed",
                record.tls_cert_der,
                open_entrance=functools.partial(self._entrance, peer_id, relay_id, relay_address),
                tunnel_refusal=functools.partial(self._refusal, (peer_id, relay_id)),
                via=relay_id,
            )
            for relay_id, relay_address in relays
            if relay_id != peer_id and (relay_id != self._own_peer_id or self._local_relay)
        ]

    async def _entrance(
        self, target: str, relay_id: str, relay_address: str, *, direct: bool = False
    ) -> str:
        if self._closed:
            raise PeerUnavailableError("the node is stopping")
        key = (target, "direct" if direct else relay_id)
        entrance = self._entrances.get(key)
        if entrance is None:
            server = await asyncio.start_server(
                functools.partial(self._serve, key, direct), "127.0.0.1", 0
            )
            if self._closed:  # (stopped while it started)
                server.close()
                raise PeerUnavailableError("the node is stopping")
            entrance = self._entrances[key] = _Entrance(server, relay_address)
            self._close_idle_entrances()
        entrance.relay_address = relay_address
        entrance.refusal = None  # (this dial's own refusal, not an earlier one's)
        entrance.dials += 1
        self._entrances.move_to_end(key)
        if not direct:
            self._counters.num_relayed_dials += 1
        return f"127.0.0.1:{entrance.server.sockets[0].getsockname()[1]}"

    def _close_idle_entrances(self) -> None:
        """Close the least recently dialled entrances with no tunnel open, beyond
        :data:`MAX_IDLE_ENTRANCES` of them."""
        idle = [key for key, entrance in self._entrances.items() if entrance.tunnels == 0]
        for key in idle[: max(0, len(idle) - MAX_IDLE_ENTRANCES)]:
            self._entrances.pop(key).server.close()

    def _refusal(self, key: tuple[str, str]) -> str | None:
        entrance = self._entrances.get(key)
        return entrance.refusal if entrance is not None else None

    @property
    def num_entrances(self) -> int:
        """Entrances listening now."""
        return len(self._entrances)

    async def _relay_connection(self, relay_id: str, relay_address: str) -> PeerConnection:
        """The connection to a relay: the one open, or a dial of the address the target's
        record names for it. Never resolved through relays: two records naming each other as
        relays made every dial go round between them, for good."""
        async with self._pool.dial_lock(relay_id):
            existing = self._pool.get(relay_id)
            if existing is not None:
                return existing
            return await self._pool.dial(DialTarget(relay_address), expected_peer_id=relay_id)

    def _serve(
        self,
        key: tuple[str, str],
        direct: bool,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        # A plain callback: the tunnel runs in a task this object owns (cancelled on close).
        target, relay_id = key[0], self._own_peer_id if direct else key[1]
        entrance = self._entrances.get(key)
        if entrance is None:  # closed after it accepted this connection
            writer.close()
            return
        entrance.tunnels += 1
        dial = entrance.dials

        async def tunnel() -> None:
            try:
                await self._tunnel(entrance, dial, target, relay_id, reader, writer, direct=direct)
            finally:
                entrance.tunnels -= 1

        self._tasks.spawn(tunnel(), f"tunnel-{target[:8]}")

    async def _tunnel(
        self,
        entrance: _Entrance,
        dial: int,
        target: str,
        relay_id: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        direct: bool = False,
    ) -> None:
        local = relay_id == self._own_peer_id and self._local_relay is not None
        to = short_peer_id(target)

        def refused(reason: str, what: str = "refused the tunnel to") -> None:
            # Kept for the dial through the entrance, before its socket closes (see DialTarget),
            # if that dial is still the latest.
            reason = printable_reason(reason)
            relay = "this node's relay" if local else f"relay {short_peer_id(relay_id)}"
            message = (
                f"the way back to {to} over its direct reservation here failed: {reason}; "
                f"dial {to} through its relays instead (the node does, if its record names any)"
                if direct
                else f"{relay} {what} {to}: {reason}. A dial tries each relay {to}'s record "
                f"names; if every one fails, {to} cannot be reached through relays now: check "
                "that it runs and holds relay reservations (its log says 'relayed through')"
            )
            if dial == entrance.dials:
                entrance.refusal = message
            if not local and not direct:
                note_failure(
                    self._relay_failed_at,
                    relay_id,
                    self._pool.clock.monotonic(),
                    _FAILED_RELAY_LAST_FOR_S,
                )

        try:
            if local:
                # This node is the target's relay, or holds its direct reservation: splice the
                # socket into the reservation here.
                assert self._local_relay is not None
                try:
                    await self._local_relay.carry_local(
                        self._own_peer_id, target, reader, writer, FRAME_BYTES, direct=direct
                    )
                except GossamerError as exc:  # (raised before it carries anything)
                    refused(str(exc))
                    raise
                return
            try:
                connection = await self._relay_connection(relay_id, entrance.relay_address)
            except GossamerError as exc:
                refused(str(exc), "could not be reached for a tunnel to")
                raise
            self._tunnels_via[relay_id] += 1
            try:
                self._watch(relay_id, connection)
                tunnel = connection.stream_stream(CONNECT_METHOD, net_pb2.TunnelFrame)

                def open_call(frames: AsyncIterator[net_pb2.TunnelFrame]) -> Any:
                    return tunnel(frames, metadata=connection.metadata)

                await carry_socket_over_call(
                    reader,
                    writer,
                    open_call,
                    net_pb2.TunnelFrame(target_peer_id=target),
                    failed=lambda exc: self._pool.failed(connection, exc, CONNECT_METHOD),
                    heard=functools.partial(self._traffic.heard, relay_id),
                    sent=functools.partial(self._traffic.sent, relay_id),
                    moved=functools.partial(self._traffic.moved, relay_id),
                    peer_id=relay_id,
                    refused=lambda exc: refused(
                        exc.details() or "",
                        "refused the tunnel to"
                        if answered_by_handler(exc)
                        else f"did not carry the tunnel ({exc.code().name}) to",
                    ),
                )
            finally:
                self._tunnels_via[relay_id] -= 1
                if self._tunnels_via[relay_id] <= 0:
                    del self._tunnels_via[relay_id]
        except GossamerError as exc:
            _log.info(
                "peer %s: tunnel to %s via %s ended: %s",
                short_peer_id(self._own_peer_id),
                short_peer_id(target),
                short_peer_id(relay_id),
                printable_reason(str(exc)),
            )
        except OSError as exc:  # (the local side reset the entrance's socket: a dropped connection)
            _log.info(
                "peer %s: tunnel to %s via %s ended: its local connection broke (%s)",
                short_peer_id(self._own_peer_id),
                short_peer_id(target),
                short_peer_id(relay_id),
                exc,
            )
        except Exception:
            _log.exception("tunnel to %s failed", short_peer_id(target))
        finally:  # (cancelled too, while it dialled the relay)
            writer.close()

    def _watch(self, relay_id: str, connection: PeerConnection) -> None:
        """Heartbeat ``relay_id`` over ``connection`` while tunnels go through it (one watch
        per relay)."""
        watched = self._watches.get(relay_id)
        if watched is not None and watched[0] is connection and not watched[1].done():
            return
        if watched is not None:
            watched[1].cancel()  # (it watched a connection the relay's tunnels left)
        task = self._tasks.spawn(
            self._watch_relay(relay_id, connection), f"relay-watch-{relay_id[:8]}"
        )
        self._watches[relay_id] = (connection, task)

        def done(_: asyncio.Task[Any]) -> None:
            if self._watches.get(relay_id, (None, None))[1] is task:
                del self._watches[relay_id]

        task.add_done_callback(done)

    async def _watch_relay(self, relay_id: str, connection: PeerConnection) -> None:
        """While tunnels go through ``relay_id`` on ``connection``, give it up once nothing
        has come from it for ``keepalive_interval_s + keepalive_timeout_s``: no answer to a
        heartbeat and no frame on any call through it (:class:`RelayTraffic`).

        One heartbeat is in flight at a time, with what is left of that window as its deadline
        (as the relayed peer's own watch, :meth:`RelayReservations._until_silent`). On a thin
        link its answer waits behind the tunnels' data: 8-23 s behind bulk data both
        ways at 500 kbit/s, so a watch of heartbeats alone gave up a healthy relay, and the
        connections through it, while their data flowed. A hung relay sends nothing at all, so
        it is given up as soon as before. Not gRPC's ping deadline either (see server.py).
        """
        config, clock = self._pool.config, self._pool.clock
        interval_s = config.heartbeat.interval_s
        silent_s = config.keepalive_interval_s + config.keepalive_timeout_s
        ping = connection.unary_unary(_PING_METHOD, net_pb2.PingResponse)
        answered_at = clock.monotonic()

        def silent_for() -> float | None:
            return self._traffic.silent_for(relay_id, answered_at, silent_s)

        while self._tunnels_via[relay_id] > 0 and self._pool.get(relay_id) is connection:
            try:
                await ping(
                    net_pb2.PingRequest(),
                    timeout=self._traffic.heartbeat_deadline_s(
                        relay_id, answered_at, silent_s, interval_s
                    ),
                    metadata=connection.metadata,
                )
                answered_at = clock.monotonic()
                self._traffic.heard(relay_id)
            except grpc.aio.AioRpcError as exc:
                if answered_by_handler(exc) or exc.code() not in _NO_ANSWER:
                    answered_at = clock.monotonic()  # (an answer all the same)
                    self._traffic.heard(relay_id)
                elif (silent_for_s := silent_for()) is not None:
                    await self._give_up(relay_id, connection, silent_for_s)
                    return
            except grpc.aio.UsageError:
                return  # (its connection was closed: tunnels on the next one watch that)
            except asyncio.CancelledError:
                if ended_under_call(relay_id) is None:
                    raise
                return  # (the same, closed under the heartbeat)
            await clock.sleep_async(interval_s)  # (pacing, not a wait on a condition)

    async def _give_up(
        self, relay_id: str, connection: PeerConnection, silent_for_s: float
    ) -> None:
        """Close the connection to a relay that stopped answering, and those through it (their
        peers' breakers reset): a dial after it goes through another relay (this one is tried
        last for a while)."""
        note_failure(
            self._relay_failed_at, relay_id, self._pool.clock.monotonic(), _FAILED_RELAY_LAST_FOR_S
        )
        # (shared with the reservations: one with this relay ends as the connection is dropped,
        # and must not take it again at once)
        self._traffic.gave_up(relay_id, max(_FAILED_RELAY_LAST_FOR_S, _RETRY_RELAY_AFTER_S))
        through = [
            (peer_id, relayed)
            for peer_id in self._pool.peer_ids
            if (relayed := self._pool.get(peer_id)) is not None
            and relayed.target.kind == "relayed"
            and relayed.target.via == relay_id
        ]
        _log.warning(
            "peer %s: relay %s answered no heartbeat and carried no tunnel byte for %.1f s; "
            "closing the connection to it and the %d through it (to %s): they are dialled "
            "again through other relays",
            short_peer_id(self._own_peer_id),
            short_peer_id(relay_id),
            silent_for_s,
            len(through),
            ", ".join(short_peer_id(peer_id) for peer_id, _ in through) or "none",
        )
        for peer_id, relayed in through:
            await self._pool.drop(peer_id, relayed)
            # (its calls' failures were the relay's: the next call tries another way at once,
            # not once the breaker they opened lets one through)
            self._pool.breakers.forget(peer_id)
        await self._pool.drop(relay_id, connection)

    async def close(self) -> None:
        """Close every entrance and the tunnels through them."""
        self._closed = True
        servers = [entrance.server for entrance in self._entrances.values()]
        self._entrances.clear()
        for server in servers:
            server.close()
        await self._tasks.cancel_all()
        for server in servers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await server.wait_closed()
