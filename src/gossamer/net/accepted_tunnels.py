"""The tunnels a relayed node accepts into its own server: checked, counted and capped.

A relay (or the holder of a direct reservation) announces each tunnel on the node's
reservation; :class:`AcceptedTunnels` refuses a malformed announcement and any past its caps,
and :func:`accept_tunnel` carries the rest into the node's server over ``Relay.Accept``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from gossamer.core.errors import GossamerError, ProtocolError
from gossamer.net.addresses import host_of, port_of
from gossamer.net.connections import PeerConnection
from gossamer.net.identity import digest_of_peer_id, short_peer_id
from gossamer.net.owned_tasks import OwnedTasks
from gossamer.net.relay import (
    ACCEPT_METHOD,
    MAX_PENDING_PER_PEER,
    MAX_TUNNELS_PER_TARGET,
    TUNNEL_ID_CHARS,
)
from gossamer.net.tunnel_carry import carry_socket_over_call
from gossamer.proto import net_pb2

__all__ = [
    "MAX_ACCEPTED_DIRECT_TUNNELS",
    "MAX_ACCEPTED_TUNNELS",
    "MAX_ACCEPTED_TUNNELS_PER_DIRECT_RESERVATION",
    "MAX_ACCEPTED_TUNNELS_PER_RESERVATION",
    "AcceptedTunnels",
    "accept_tunnel",
    "announcement_fault",
]

_log = logging.getLogger(__name__)
_LOCAL_CONNECT_TIMEOUT_S = 5.0
MAX_ACCEPTED_TUNNELS_PER_RESERVATION = MAX_TUNNELS_PER_TARGET + MAX_PENDING_PER_PEER
"""Tunnels a node carries at once from one reservation: an honest relay announces no more (its
own caps). Each takes two sockets, so a relay that announced tunnels without end took all of
the node's file descriptors."""
MAX_ACCEPTED_TUNNELS = 256
"""Tunnels a node carries at once over all its relay reservations."""
MAX_ACCEPTED_TUNNELS_PER_DIRECT_RESERVATION = 4
"""Tunnels a node carries at once from one direct reservation. An honest holder dials back
through it for one connection: its pool keeps one per peer, and a channel that reconnects (an
idle connection's GOAWAY, a lost keepalive) or a dial retried opens another while the last
one's tunnel winds down. It had a relay's 96: three throwaway identities claiming to be
reachable took all of a node's places, and nobody reached it through its relays."""
MAX_ACCEPTED_DIRECT_TUNNELS = 64
"""Tunnels a node carries at once over all its direct reservations, apart from its relay
reservations' :data:`MAX_ACCEPTED_TUNNELS`: one for each of the (at most) 64 peers it holds one
with, honestly. Holders that take them all cost the node its direct ways back, not its relays."""


class AcceptedTunnels:
    """The tunnels a node carries into its own server, counted by the peer holding the
    reservation they were announced on, relay and direct reservations apart: at most
    :data:`MAX_ACCEPTED_TUNNELS_PER_RESERVATION` from one relay reservation and
    :data:`MAX_ACCEPTED_TUNNELS` over all of them; at most
    :data:`MAX_ACCEPTED_TUNNELS_PER_DIRECT_RESERVATION` from one direct reservation and
    :data:`MAX_ACCEPTED_DIRECT_TUNNELS` over all of them. A tunnel past them is not accepted
    (its dialer's relay gives up on it), and the first one past them is logged.

    An announcement is checked before anything is kept of it: a tunnel id longer than a relay
    makes, a dialer that is not a peer id, or (on a direct reservation) a dialer other than the
    holder is refused. Unchecked, 8 MiB ids were kept for each tunnel's life (2 GiB).
    """

    def __init__(self) -> None:
        self._open = {False: Counter[str](), True: Counter[str]()}
        """Tunnels open now by holder, of relay (False) and direct (True) reservations."""
        self._refusing: set[tuple[str, bool]] = set()
        self._malformed_from: set[str] = set()
        """Holders whose malformed announcement was logged at WARNING (later ones at DEBUG)."""

    def open_from(self, holder: str, *, direct: bool = False) -> int:
        """Tunnels open now that were announced by ``holder`` (on its direct reservation)."""
        return self._open[direct][holder]

    def num_open(self, *, direct: bool = False) -> int:
        """Tunnels open now, over all relay (or all direct) reservations."""
        return self._open[direct].total()

    @staticmethod
    def _caps(direct: bool) -> tuple[int, int]:
        if direct:
            return MAX_ACCEPTED_TUNNELS_PER_DIRECT_RESERVATION, MAX_ACCEPTED_DIRECT_TUNNELS
        return MAX_ACCEPTED_TUNNELS_PER_RESERVATION, MAX_ACCEPTED_TUNNELS

    def accept(
        self,
        tasks: OwnedTasks,
        connection: PeerConnection,
        event: net_pb2.RelayEvent,
        local_address: str,
        *,
        direct: bool = False,
        heard: Callable[[], None] | None = None,
        sent: Callable[[], None] | None = None,
        moved: Callable[[], object] | None = None,
    ) -> bool:
        """Carry the announced tunnel (a task of ``tasks``) if it is well formed and the caps
        allow; whether it does. ``direct``: announced on a direct reservation; ``heard`` and
        ``sent``: told of its traffic, ``moved``: a mark of its connection's (see
        :func:`carry_socket_over_call`)."""
        holder = connection.peer_id
        fault = announcement_fault(event, holder if direct else None)
        if fault is not None:
            self._log_malformed(holder, fault)
            return False
        per_holder, in_all = self._caps(direct)
        counts = self._open[direct]
        if counts[holder] >= per_holder or counts.total() >= in_all:
            if (holder, direct) not in self._refusing:
                self._refusing.add((holder, direct))
                _log.warning(
                    "not accepting tunnels announced by %s on its %s: %d of its are open, %d "
                    "in all (an honest one announces at most %d at once)",
                    short_peer_id(holder),
                    "direct reservation" if direct else "relay reservation",
                    counts[holder],
                    counts.total(),
                    per_holder,
                )
            return False
        counts[holder] += 1
        # Only the checked strings are kept for the tunnel's life, not the message.
        tunnel_id, dialer = event.tunnel_id, event.dialer_peer_id
        task = tasks.spawn(
            accept_tunnel(connection, tunnel_id, dialer, local_address, heard, sent, moved),
            f"accept-{tunnel_id[:8]}",
        )
        # (a done callback runs even for a task cancelled before it started)
        task.add_done_callback(lambda _: self._closed(holder, direct))
        return True

    def _log_malformed(self, holder: str, fault: str) -> None:
        if len(self._malformed_from) >= 1024:
            self._malformed_from.clear()
        first = holder not in self._malformed_from
        self._malformed_from.add(holder)
        _log.log(
            logging.WARNING if first else logging.DEBUG,
            "refused a tunnel announced by %s: %s",
            short_peer_id(holder),
            fault,
        )

    def _closed(self, holder: str, direct: bool) -> None:
        counts = self._open[direct]
        counts[holder] -= 1
        if counts[holder] <= 0:
            del counts[holder]
        # (refused for the total, a holder with none open here was never cleared)
        per_holder, in_all = self._caps(direct)
        total = counts.total()
        self._refusing = {
            (h, d)
            for h, d in self._refusing
            if d != direct or self._open[d][h] >= per_holder or total >= in_all
        }


def announcement_fault(event: net_pb2.RelayEvent, direct_holder: str | None) -> str | None:
    """Why a tunnel announcement is refused, or None: a tunnel id longer than a relay makes, a
    dialer id that is not a peer id, or, on ``direct_holder``'s direct reservation, a dialer
    other than that holder (only its own node dials back through it)."""
    if len(event.tunnel_id) > TUNNEL_ID_CHARS:
        return f"a tunnel id of {len(event.tunnel_id)} characters (a relay makes {TUNNEL_ID_CHARS})"
    try:
        digest_of_peer_id(event.dialer_peer_id)
    except ProtocolError as exc:
        return f"its dialer: {exc}"
    if direct_holder is not None and event.dialer_peer_id != direct_holder:
        return "a tunnel from another peer than the holder, on a direct reservation"
    return None


async def accept_tunnel(
    connection: PeerConnection,
    tunnel_id: str,
    dialer_peer_id: str,
    local_address: str,
    heard: Callable[[], None] | None = None,
    sent: Callable[[], None] | None = None,
    moved: Callable[[], object] | None = None,
) -> None:
    """Accept an announced tunnel: carry it into this node's own server at ``local_address``
    (``heard``, ``sent``: told of its traffic, ``moved``: a mark of its connection's, see
    :func:`carry_socket_over_call`)."""
    try:
        async with asyncio.timeout(_LOCAL_CONNECT_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(
                host_of(local_address), port_of(local_address)
            )
        accept = connection.stream_stream(ACCEPT_METHOD, net_pb2.TunnelFrame)

        def open_call(frames: AsyncIterator[net_pb2.TunnelFrame]) -> Any:
            return accept(frames, metadata=connection.metadata)

        await carry_socket_over_call(
            reader,
            writer,
            open_call,
            net_pb2.TunnelFrame(tunnel_id=tunnel_id),
            heard=heard,
            sent=sent,
            moved=moved,
            peer_id=connection.peer_id,
        )
    except (GossamerError, OSError, TimeoutError) as exc:
        _log.info(
            "tunnel from %s via %s ended: %s",
            short_peer_id(dialer_peer_id),
            short_peer_id(connection.peer_id),
            exc,
        )
