"""Using relays: reservations for a peer nobody can dial, tunnels for the peers that dial it.

Both ends of a relayed connection are ordinary TCP sockets on loopback carried over a relay's
byte tunnel:

* the dialer's gRPC channel connects to a local *entrance* (127.0.0.1, a port picked by the OS);
  each connection accepted there opens ``Relay.Connect`` towards the target through a relay;
* the relayed peer, told about the tunnel on its reservation stream, opens ``Relay.Accept`` and a
  TCP connection to its own server, and carries bytes between the two.

TLS and the handshake run end to end inside the tunnel, so the relayed connection is exactly as
authenticated as a direct one and the rest of the node uses it through the same API.

This module holds the relayed peer's side: :class:`RelayReservations` keeps its reservations
and takes the relays' tunnel announcements. The dialer's entrances are in relay_dialer.py, the
tunnels a node accepts in accepted_tunnels.py, and the bytes' carriage in tunnel_carry.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from gossamer.core.clock import Clock
from gossamer.core.errors import GossamerError, PeerUnavailableError
from gossamer.net.accepted_tunnels import AcceptedTunnels
from gossamer.net.config import NodeConfig
from gossamer.net.connections import ConnectionPool, PeerConnection
from gossamer.net.directory import PeerDirectory
from gossamer.net.identity import short_peer_id
from gossamer.net.owned_tasks import OwnedTasks, being_cancelled
from gossamer.net.printable_text import printable_reason
from gossamer.net.recent_failures import note_failure
from gossamer.net.relay import RESERVE_METHOD
from gossamer.net.relay_traffic import RelayTraffic
from gossamer.proto import net_pb2

__all__ = ["RelayReservations"]

_log = logging.getLogger(__name__)
_RETRY_RELAY_AFTER_S = 10.0


class _ClosedUnderReservationError(PeerUnavailableError):
    """A reservation's connection was closed under it (dropped by the pool: a redial that
    replaced it, a watch that gave the relay up): the relay is dialled again at once."""


class RelayReservations:
    """Keeps reservations with relays while this node cannot be reached, and accepts tunnels.

    Args:
        pool: the node's connections.
        directory: where relay candidates come from (peers that relay and are reachable).
        config: the node config (``relay.num_relays``, timeouts).
        clock: time source.
        own_peer_id: this node's id.
        local_address: HOST:PORT of this node's own server, where tunnels are delivered.
        needs_relay: whether this node should hold reservations now.
        on_change: called after the set of active relays changed (re-sign and publish).
        bootstrap_peers: peers dialed at start; tried too when their record is unknown (an
            observer that announces nothing gets no records back from a lone bootstrap peer).
        accepted: the node's count of tunnels it carries (shared with its direct reservations).
        heartbeat: one heartbeat to a peer with a deadline (the node's); with it, a relay that
            answers none for ``keepalive_interval_s + keepalive_timeout_s`` is given up (a
            hung relay kept the reservation, and this node named it, for over a minute).
    """

    def __init__(
        self,
        pool: ConnectionPool,
        directory: PeerDirectory,
        config: NodeConfig,
        clock: Clock,
        own_peer_id: str,
        local_address: Callable[[], str],
        needs_relay: Callable[[], bool],
        on_change: Callable[[], Awaitable[None]],
        bootstrap_peers: Callable[[], list[str]] = list,
        accepted: AcceptedTunnels | None = None,
        heartbeat: Callable[[str, float], Awaitable[None]] | None = None,
    ) -> None:
        self._heartbeat = heartbeat
        self._bootstrap_peers = bootstrap_peers
        self._accepted = accepted or AcceptedTunnels()
        self._pool = pool
        self._directory = directory
        self._config = config
        self._clock = clock
        self._own_peer_id = own_peer_id
        self._local_address = local_address
        self._needs_relay = needs_relay
        self._on_change = on_change
        self.on_tunnel: Callable[[str], None] | None = None
        """Called with the dialer's peer id for every tunnel a relay announces."""
        self.active: dict[str, str] = {}
        """Relays holding a reservation for this node: relay peer id -> its address."""
        self._holding: set[str] = set()
        self._failed_at: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._tasks = OwnedTasks()
        self._rng = random.Random()

    @functools.cached_property
    def _traffic(self) -> RelayTraffic:
        return RelayTraffic.of(self._pool)

    def wake(self) -> None:
        """Look at the reservations now (after reachability changed)."""
        self._wake.set()

    def candidates(self) -> list[str]:
        """Peers that may relay for this node, reachable ones first."""
        now = self._clock.monotonic()
        found = [
            r
            for r in self._directory.records()
            if r.relay_service
            and r.peer_id != self._own_peer_id
            and r.reachability != net_pb2.REACHABILITY_RELAYED
            and r.peer_id not in self._holding
            and not self._failed_lately(r.peer_id, now)
        ]
        self._rng.shuffle(found)
        found.sort(key=lambda r: r.reachability != net_pb2.REACHABILITY_DIRECT)
        extra = [
            p
            for p in self._bootstrap_peers()
            if p not in self._directory
            and p not in self._holding
            and not self._failed_lately(p, now)
        ]
        return [r.peer_id for r in found] + extra

    def _failed_lately(self, relay_id: str, now: float) -> bool:
        """Whether ``relay_id`` failed a reservation, or was given up by the node's relay
        dialer (:meth:`RelayTraffic.gave_up`), within :data:`_RETRY_RELAY_AFTER_S`."""
        failed_at = max(self._failed_at.get(relay_id, -1e9), self._traffic.given_up_at(relay_id))
        return now - failed_at < _RETRY_RELAY_AFTER_S

    async def run(self, check_interval_s: float = 1.0) -> None:
        """Keep ``relay.num_relays`` reservations while needed (runs until cancelled)."""
        try:
            while True:
                if self._needs_relay():
                    wanted = self._config.relay.num_relays - len(self._holding)
                    for relay_id in self.candidates()[: max(0, wanted)]:
                        self._holding.add(relay_id)
                        self._tasks.spawn(self._hold(relay_id), f"relay-hold-{relay_id[:8]}")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(check_interval_s):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            await self._tasks.cancel_all()

    async def _hold(self, relay_id: str) -> None:
        call: Any = None
        connection: PeerConnection | None = None
        try:
            connection = await self._pool.connection(relay_id)
            reserve = connection.unary_stream(RESERVE_METHOD, net_pb2.RelayEvent)
            call = reserve(net_pb2.ReserveRequest(), metadata=connection.metadata)
            async with asyncio.timeout(self._config.rpc_timeout_s):
                first = await call.read()
            if first is grpc.aio.EOF or not first.reserved:
                raise PeerUnavailableError("the relay ended the reservation at once")
            # The address this node reached the relay at is one that works from outside.
            address = connection.target.address
            if connection.target.kind != "direct":
                record = self._directory.get(relay_id)
                address = record.addresses[0] if record and record.addresses else address
            self.active[relay_id] = address
            _log.info("relayed through %s (%s)", short_peer_id(relay_id), self.active[relay_id])
            await self._on_change()
            # A reservation lives as long as the relay keeps it and answers heartbeats.
            await self._read_events(relay_id, call, connection)
        except _ClosedUnderReservationError as exc:
            _log.info("reservation with %s ended: %s", short_peer_id(relay_id), exc)
        except grpc.aio.AioRpcError as exc:
            _log.info(
                "reservation with %s ended: %s",
                short_peer_id(relay_id),
                printable_reason(exc.details() or ""),
            )
            if connection is not None:  # (a broken one is dropped, not kept for the next try)
                await self._pool.failed(connection, exc, RESERVE_METHOD)
            note_failure(self._failed_at, relay_id, self._clock.monotonic(), _RETRY_RELAY_AFTER_S)
        except (GossamerError, TimeoutError) as exc:
            _log.info(
                "reservation with %s failed: %s", short_peer_id(relay_id), str(exc) or repr(exc)
            )
            note_failure(self._failed_at, relay_id, self._clock.monotonic(), _RETRY_RELAY_AFTER_S)
        finally:
            if call is not None:
                call.cancel()
            self._holding.discard(relay_id)
            if self.active.pop(relay_id, None) is not None and not being_cancelled():
                await self._on_change()
            self.wake()

    async def _read_events(self, relay_id: str, call: Any, connection: PeerConnection) -> None:
        """Take the relay's tunnel announcements until it ends the reservation, or until
        nothing has come from it (see :meth:`_until_silent`) for ``keepalive_interval_s +
        keepalive_timeout_s``.

        Raises:
            PeerUnavailableError: the relay stopped answering, or the reservation's connection
                was closed under it (:class:`_ClosedUnderReservationError`).
            grpc.aio.AioRpcError: the reservation's call failed.
        """

        heard = functools.partial(self._traffic.heard, relay_id)
        sent = functools.partial(self._traffic.sent, relay_id)

        async def events() -> None:
            while (event := await call.read()) is not grpc.aio.EOF:
                heard()
                if event.tunnel_id:
                    accepted = self._accepted.accept(
                        self._tasks,
                        connection,
                        event,
                        self._local_address(),
                        heard=heard,
                        sent=sent,
                        moved=functools.partial(self._traffic.moved, relay_id),
                    )
                    if accepted and self.on_tunnel is not None:
                        self.on_tunnel(event.dialer_peer_id)

        if self._heartbeat is None:  # (nothing to watch the relay with)
            try:
                await events()
            except asyncio.CancelledError:
                if being_cancelled():
                    raise
                raise _ClosedUnderReservationError(
                    "its connection to the relay was closed under it"
                ) from None
            return
        reader = asyncio.ensure_future(events())
        watchdog = asyncio.ensure_future(self._until_silent(relay_id, self._heartbeat))
        try:
            await asyncio.wait({reader, watchdog}, return_when=asyncio.FIRST_COMPLETED)
            # (gRPC ends a call whose channel was closed under it in CancelledError)
            closed_under = any(task.done() and task.cancelled() for task in (reader, watchdog))
        finally:
            for task in (reader, watchdog):
                task.cancel()
            await asyncio.gather(reader, watchdog, return_exceptions=True)
        if not reader.cancelled() and reader.exception() is None:
            return  # (the relay ended it)
        if not reader.cancelled() and (error := reader.exception()) is not None:
            raise error
        if closed_under:
            # (not the relay's silence: the relay is not to blame)
            raise _ClosedUnderReservationError(
                "its connection to the relay was closed under it (the relay is not to blame)"
            )
        if not watchdog.cancelled() and (error := watchdog.exception()) is not None:
            # (a heartbeat on a connection closed under it: not the relay's silence, which
            # the reservation's end was put down to)
            await self._pool.drop(relay_id, connection)
            raise PeerUnavailableError(
                f"the reservation's heartbeat failed: {str(error) or type(error).__name__}"
            ) from error
        silent_s = self._config.keepalive_interval_s + self._config.keepalive_timeout_s
        # (its connection too: the next reservation reused the hung one, and a tunnel through
        # it stayed counted until gRPC's own ping deadline, 60 s)
        await self._pool.drop(relay_id, connection)
        raise PeerUnavailableError(
            f"the relay answered no heartbeat and sent nothing for {silent_s:g} s"
        )

    async def _until_silent(
        self, relay_id: str, heartbeat: Callable[[str, float], Awaitable[None]]
    ) -> None:
        """Return once nothing has come from ``relay_id`` for ``keepalive_interval_s +
        keepalive_timeout_s``: no answer to a heartbeat and no frame on any call through it,
        the reservation's and the tunnels' (:class:`RelayTraffic`).

        One heartbeat is in flight at a time, with what is left of that window as its
        deadline: on a thin link its answer waits behind the tunnels' data (3.7-4.7 s at 1
        Mbit/s; 8-23 s behind bulk data both ways at 500 kbit/s, where a watch of
        heartbeats alone gave up a healthy relay), and with the failure detector's 2.5 s every
        heartbeat missed. A hung relay sends nothing at all, so it is given up as soon as
        before. Not gRPC's ping deadline either (see server.py)."""
        interval_s = self._config.heartbeat.interval_s
        silent_s = self._config.keepalive_interval_s + self._config.keepalive_timeout_s
        answered_at = self._clock.monotonic()
        while True:
            try:
                await heartbeat(
                    relay_id,
                    self._traffic.heartbeat_deadline_s(relay_id, answered_at, silent_s, interval_s),
                )
                answered_at = self._clock.monotonic()
                self._traffic.heard(relay_id)
            except (GossamerError, TimeoutError, grpc.aio.AioRpcError) as exc:
                silent_for_s = self._traffic.silent_for(relay_id, answered_at, silent_s)
                if silent_for_s is not None:
                    _log.info(
                        "peer %s: relay %s answered no heartbeat and sent nothing for %.1f s "
                        "(%s); giving it up",
                        short_peer_id(self._own_peer_id),
                        short_peer_id(relay_id),
                        silent_for_s,
                        str(exc) or type(exc).__name__,
                    )
                    return
            await self._clock.sleep_async(interval_s)  # (pacing, not a wait on a condition)

    async def close(self) -> None:
        """End every reservation and tunnel."""
        await self._tasks.cancel_all()
