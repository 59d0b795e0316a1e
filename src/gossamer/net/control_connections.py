"""One small connection per peer beside the data connection, for heartbeats and DHT requests.

On the connection that carries bulk data, a heartbeat or a DHT request waits in the socket's send
buffer behind the upload's megabytes: on a 2 Mbit/s link heartbeats timed out (the failure
detector reported live peers gone) and DHT requests ran past their deadlines (records reached
nobody). On a connection of its own a message waits only in the link's queue. Heartbeats (to a
peer whose data connection is direct, see ``Node._heartbeat``) and DHT requests (to a peer whose
direct data connection uploads, see :class:`GrpcDhtTransport`) share one such connection per
peer: a peer that was both watched and uploaded to held two of them, beside its data connection.

A control connection is kept while either user may need it: while the failure detector watches
the peer, or while a DHT request chose it within :data:`CONTROL_IDLE_S`; it is closed once
neither holds. (Also while a heartbeat went on it within that time: a relay reservation's
watchdog heartbeats its relay through the same path without the detector, and a connection
closed under one of its heartbeats would end the reservation.) It is dialled only where the
direct data connection went (it answered there), never through a relay (a relayed data
connection's tunnels share one connection to the relay, and each tunnel takes one of the
relay's few places per dialer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from gossamer.core.errors import DeadlineExceededError
from gossamer.net.connections import ConnectionPool, DialTarget
from gossamer.net.dht_service import DHT_METHODS
from gossamer.net.identity import short_peer_id
from gossamer.proto import net_pb2

__all__ = ["CONTROL_IDLE_S", "ControlConnections", "direct_data_target"]

_log = logging.getLogger(__name__)
CONTROL_IDLE_S = 30.0
"""How long a control connection of a peer not watched stays open unused: past a round's
uploads, not past the next round's few seconds of quiet."""


def direct_data_target(data: ConnectionPool, peer_id: str) -> list[DialTarget]:
    """Where a control connection to ``peer_id`` dials: where the direct data connection to the
    peer went, and nowhere else. With no direct data connection there is nowhere: heartbeats
    and DHT requests then go on the data connection (which they dial if there is none)."""
    connection = data.get(peer_id)
    return (
        [connection.target] if connection is not None and connection.target.kind == "direct" else []
    )


class ControlConnections:
    """The control connections: their lifecycle, and heartbeats (see the module docstring).

    Args:
        data: the node's data connections.
        pool: the control connections themselves (their own counters and breakers; its resolver
            should be :func:`direct_data_target` over the data pool).
        is_watched: whether the failure detector watches a peer now (its heartbeats use the
            peer's control connection).
        idle_s: how long a control connection of a peer not watched stays open after a DHT
            request last chose it, or a heartbeat last went on it.
        own_peer_id: this node's id, for logs.
    """

    def __init__(
        self,
        data: ConnectionPool,
        pool: ConnectionPool,
        *,
        is_watched: Callable[[str], bool],
        idle_s: float = CONTROL_IDLE_S,
        own_peer_id: str = "",
    ) -> None:
        self._data = data
        self.pool = pool
        self._is_watched = is_watched
        self._idle_s = idle_s
        self._own = short_peer_id(own_peer_id) if own_peer_id else "?"
        self._chosen_s: dict[str, float] = {}
        """Per peer: when a DHT request last chose its control connection (monotonic)."""
        self._beat_s: dict[str, float] = {}
        """Per peer: when a heartbeat last went on its control connection (monotonic)."""

    def chosen(self, peer_id: str) -> None:
        """Note that a DHT request goes on ``peer_id``'s control connection now."""
        self._chosen_s[peer_id] = self.pool.clock.monotonic()

    def _chosen_recently(self, peer_id: str, now_s: float) -> bool:
        return now_s - self._chosen_s.get(peer_id, -float("inf")) < self._idle_s

    def _beaten_recently(self, peer_id: str, now_s: float) -> bool:
        return now_s - self._beat_s.get(peer_id, -float("inf")) < self._idle_s

    async def release_for_heartbeats(self, peer_id: str) -> None:
        """Heartbeats no longer use ``peer_id``'s control connection (the peer is unwatched, or
        its data connection is no longer direct): close it unless a DHT request chose it within
        ``idle_s`` (then :meth:`close_idle` closes it once that passed)."""
        if self.pool.get(peer_id) is not None and not self._chosen_recently(
            peer_id, self.pool.clock.monotonic()
        ):
            await self.pool.drop(peer_id)

    async def close_idle(self) -> None:
        """Close the control connections of peers that are not watched and that no DHT request
        chose, and no heartbeat went on, for ``idle_s`` (a call runs for its deadline at most,
        well under it: none is closed under a call)."""
        now_s = self.pool.clock.monotonic()
        for peer_id in self.pool.peer_ids:
            if not (
                self._chosen_recently(peer_id, now_s)
                or self._beaten_recently(peer_id, now_s)
                or self._is_watched(peer_id)
            ):
                _log.debug(
                    "peer %s: control connection to %s unwatched and unused for %.0f s: closed",
                    self._own,
                    short_peer_id(peer_id),
                    self._idle_s,
                )
                await self.pool.drop(peer_id)
        for peer_id in [p for p in self._chosen_s if not self._chosen_recently(p, now_s)]:
            del self._chosen_s[peer_id]
        for peer_id in [p for p in self._beat_s if not self._beaten_recently(p, now_s)]:
            del self._beat_s[peer_id]

    async def heartbeat(self, peer_id: str, timeout_s: float) -> float:
        """One heartbeat: a Ping without records, past the peer's circuit breaker, on the
        peer's control connection where its data connection is direct; returns the peer's wall
        clock as it answered.

        The breaker counts every other call's failures (a FindValue slower than its deadline,
        say): five of them opened it, heartbeats then failed at once, and a live peer was
        reported gone. On the connection that carries bulk data a heartbeat waited in the
        socket's send buffer behind it: on a 2 Mbit/s link every heartbeat of a round's first
        seconds timed out behind the round's megabytes, the detector reported every member
        gone, and the rounds averaged each peer alone. Only where the data connection is
        direct: a relayed one's tunnels share one connection to the relay anyway, and each took
        one of the relay's few places per dialer; with none yet, the heartbeat dials it. A
        heartbeat that runs out of time also closes the data connection if that one showed no
        life either (:meth:`ConnectionPool.drop_if_silent`), as any call that does: a
        connection whose packets are silently lost is dialled afresh.

        Raises:
            GossamerError: the peer did not answer within ``timeout_s``, or could not be reached.
        """
        data = self._data.get(peer_id)
        own = data is not None and data.target.kind == "direct"
        if own:
            self._beat_s[peer_id] = self.pool.clock.monotonic()
        else:
            await self.release_for_heartbeats(peer_id)
        try:
            response = await (self.pool if own else self._data).call(
                peer_id,
                DHT_METHODS["Ping"],
                net_pb2.PingRequest(),
                net_pb2.PingResponse,
                timeout_s=timeout_s,
                retry=False,
                use_breaker=False,
            )
        except DeadlineExceededError:
            if own and data is not None:
                await self._data.drop_if_silent(data)
            raise
        return response.wall_time_s

    def forget(self, peer_id: str) -> None:
        """Drop what is kept for a peer that left the directory (its breaker; its connection,
        if any, goes once unwatched and idle)."""
        self.pool.forget(peer_id)

    async def close(self) -> None:
        """Close every control connection."""
        await self.pool.close()
