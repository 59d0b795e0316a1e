"""Upgrading relayed connections to direct ones by connection reversal.

A reachable peer R that dials a NATed peer N goes through one of N's relays. N sees R's id on the
tunnel announcement; since R is reachable, N dials R *directly* (outbound works through NAT) and
holds a *direct reservation* there (``ReserveRequest.direct``). R then re-dials N through that
reservation: its gRPC channel's socket is carried over N's own connection to R, so the bytes cross
no third peer. TLS and the handshake still run end to end between R and N inside it, exactly as
over a relay. R swaps its relayed connection for the new one and counts ``num_direct_upgrades``:
new calls go the direct way, and the relayed connection is closed once the calls still running
on it have ended (a bulk transfer on a slow link may take minutes), not cut after a fixed grace.

This holds for N's own relays too: their tunnels to N already cross no third peer, but a direct
reservation takes them out of the relay's bandwidth cap and its ``relayed_bytes``.

Anything failing on the way leaves the relayed connection as it was: the relay is the fallback.
Two NATed peers cannot reach each other directly, so they stay relayed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc

from gossamer.core.clock import Clock
from gossamer.core.errors import GossamerError, PeerUnavailableError
from gossamer.net.accepted_tunnels import AcceptedTunnels
from gossamer.net.config import NodeConfig
from gossamer.net.connections import ConnectionPool
from gossamer.net.counters import NetCounters
from gossamer.net.directory import PeerDirectory
from gossamer.net.identity import short_peer_id
from gossamer.net.owned_tasks import OwnedTasks
from gossamer.net.printable_text import printable_reason
from gossamer.net.recent_failures import note_failure
from gossamer.net.relay import RESERVE_METHOD
from gossamer.net.relay_dialer import REVERSED_ADDRESS, RelayDialer
from gossamer.proto import net_pb2

__all__ = ["RETIRE_AT_MOST_S", "DirectUpgrades"]

_log = logging.getLogger(__name__)
RETIRE_AT_MOST_S = 3600.0
"""The longest a replaced connection stays open for the calls already running on it. It is
closed as soon as they have all ended (gRPC's close with a grace waits for the calls in flight,
and no new call starts on it), and each ends by its own deadline: this bounds only a call with
none. A fixed 30 s cut a 32 s bulk transfer on a 1 Mbit/s link, which then failed."""
_RETRY_AFTER_S = 30.0
_MAX_DIRECT_RESERVATIONS = 64
_SESSION_AFTER_TUNNEL_S = 10.0


class DirectUpgrades:
    """Both halves of the upgrade: the NATed side's direct reservations, the reachable side's swap.

    Args:
        pool: the node's connections.
        directory: peer records (whether a dialer is reachable directly).
        dialer: the node's relay dialer (the way back through a direct reservation).
        config: the node config (timeouts).
        clock: time source.
        counters: ``num_direct_upgrades`` is counted here.
        local_address: HOST:PORT of this node's own server, where reversed tunnels are delivered.
        is_relayed: whether this node is behind NAT (only then does it offer reversals).
        accepted: the node's count of tunnels it carries (shared with its relay reservations,
            which are counted and capped apart).
    """

    def __init__(
        self,
        pool: ConnectionPool,
        directory: PeerDirectory,
        dialer: RelayDialer,
        config: NodeConfig,
        clock: Clock,
        counters: NetCounters,
        *,
        local_address: Callable[[], str],
        is_relayed: Callable[[], bool],
        accepted: AcceptedTunnels | None = None,
    ) -> None:
        self._accepted = accepted or AcceptedTunnels()
        self._pool = pool
        self._directory = directory
        self._dialer = dialer
        self._config = config
        self._clock = clock
        self._counters = counters
        self._local_address = local_address
        self._is_relayed = is_relayed
        self.holding: set[str] = set()
        """Peers this node holds a direct reservation with (or is taking one)."""
        self.active: set[str] = set()
        """Peers holding this node's direct reservation now: they reach it without a relay."""
        self._failed_at: dict[str, float] = {}
        self._tunnelled_at: dict[str, float] = {}
        self._upgrading: set[str] = set()
        self._tasks = OwnedTasks()
        self._closed = False

    # ---- the NATed side ----------------------------------------------------------------------

    def offer(self, dialer_peer_id: str) -> None:
        """A peer tunnelled to this node through a relay: offer it a direct way back if it can."""
        if self._closed:
            return
        record = self._directory.get(dialer_peer_id)
        now = self._clock.monotonic()
        if record is None:
            # Its record usually comes with the handshake inside the tunnel: look again then.
            if len(self._tunnelled_at) >= 4 * _MAX_DIRECT_RESERVATIONS:
                self._tunnelled_at.clear()
            self._tunnelled_at[dialer_peer_id] = now
            return
        if (
            not self._is_relayed()
            or record.reachability != net_pb2.REACHABILITY_DIRECT
            or not record.addresses
            or dialer_peer_id in self.holding
            or len(self.holding) >= _MAX_DIRECT_RESERVATIONS
            or now - self._failed_at.get(dialer_peer_id, -1e9) < _RETRY_AFTER_S
        ):
            return
        self.holding.add(dialer_peer_id)
        self._tasks.spawn(self._hold(dialer_peer_id), f"direct-hold-{dialer_peer_id[:8]}")

    def session_opened(self, peer_id: str) -> None:
        """A peer proved its id here (its record is now known): offer if it just tunnelled in."""
        tunnelled_at = self._tunnelled_at.pop(peer_id, None)
        if tunnelled_at is not None and (
            self._clock.monotonic() - tunnelled_at < _SESSION_AFTER_TUNNEL_S
        ):
            self.offer(peer_id)

    async def _hold(self, peer_id: str) -> None:
        call: Any = None
        try:
            connection = await self._pool.connection(peer_id)
            if connection.target.kind != "direct":
                raise PeerUnavailableError("this node reaches it only through a relay")
            reserve = connection.unary_stream(RESERVE_METHOD, net_pb2.RelayEvent)
            call = reserve(net_pb2.ReserveRequest(direct=True), metadata=connection.metadata)
            async with asyncio.timeout(self._config.rpc_timeout_s):
                first = await call.read()
            if first is grpc.aio.EOF or not first.reserved:
                raise PeerUnavailableError("it ended the direct reservation at once")
            _log.info("offered %s a direct way back", short_peer_id(peer_id))
            self.active.add(peer_id)
            while (event := await call.read()) is not grpc.aio.EOF:
                if event.tunnel_id:
                    self._accepted.accept(
                        self._tasks, connection, event, self._local_address(), direct=True
                    )
        except grpc.aio.AioRpcError as exc:
            _log.info(
                "direct reservation with %s ended: %s",
                short_peer_id(peer_id),
                printable_reason(exc.details() or ""),
            )
            note_failure(self._failed_at, peer_id, self._clock.monotonic(), _RETRY_AFTER_S)
        except (GossamerError, TimeoutError) as exc:
            _log.info("direct reservation with %s failed: %s", short_peer_id(peer_id), exc)
            note_failure(self._failed_at, peer_id, self._clock.monotonic(), _RETRY_AFTER_S)
        finally:
            if call is not None:
                call.cancel()
            self.holding.discard(peer_id)
            self.active.discard(peer_id)

    # ---- the reachable side ------------------------------------------------------------------

    def reversed_to(self, peer_id: str) -> None:
        """``peer_id`` took a direct reservation here: move a relayed connection onto it."""
        if self._closed or peer_id in self._upgrading:
            return
        self._upgrading.add(peer_id)
        self._tasks.spawn(self._upgrade(peer_id), f"direct-upgrade-{peer_id[:8]}")

    async def _upgrade(self, peer_id: str) -> None:
        try:
            # A relayed dial may still be running (its tunnel is what prompted the offer): wait
            # for it under the dial lock, which also keeps other dials out while this one runs.
            async with self._pool.dial_lock(peer_id):
                current = self._pool.get(peer_id)
                target = self._dialer.direct_target(peer_id)
                # Without a relayed connection now, the next dial takes the direct target first.
                if current is None or current.target.kind != "relayed" or target is None:
                    return
                await self._pool.dial(target, expected_peer_id=peer_id, retire_previous=True)
            self._counters.num_direct_upgrades += 1
            _log.info("upgraded the connection to %s to direct", short_peer_id(peer_id))
            # (in a task of its own: a transfer still running on the relayed connection must not
            # hold up a later upgrade, after this one's way back ended)
            self._close_retired_later(peer_id)
        except GossamerError as exc:
            _log.info("%s stays relayed: %s", short_peer_id(peer_id), exc)
        finally:
            self._upgrading.discard(peer_id)

    def reversal_ended(self, peer_id: str) -> None:
        """``peer_id``'s direct reservation here ended: later calls go through its relays again."""
        connection = self._pool.get(peer_id)
        if self._closed or connection is None or connection.target.address != REVERSED_ADDRESS:
            return
        _log.info("the direct way to %s ended: back to its relays", short_peer_id(peer_id))
        self._pool.retire(peer_id, connection)
        self._close_retired_later(peer_id)

    def _close_retired_later(self, peer_id: str) -> None:
        """Close the retired connections to ``peer_id`` once the calls on them have ended."""
        self._tasks.spawn(
            self._pool.close_retired(peer_id, RETIRE_AT_MOST_S), f"direct-retire-{peer_id[:8]}"
        )

    async def close(self) -> None:
        """End every direct reservation and upgrade in progress; offer and upgrade no more."""
        self._closed = True
        await self._tasks.cancel_all()
