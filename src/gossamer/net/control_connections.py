"""The small connections beside a peer's data connection: one for heartbeats, one for the DHT.

On the connection that carries bulk data, a heartbeat or a DHT request waits in the socket's send
buffer behind the upload's megabytes: on a 2 Mbit/s link heartbeats timed out (the failure
detector reported live peers gone) and DHT requests ran past their deadlines (records reached
nobody). On a connection of its own a message waits only in the link's queue.

Heartbeats and DHT requests do not share one: a FindValue answer (up to 1 MiB) on a shared
connection held the heartbeat answers behind it, and on 2 Mbit/s lab links a live peer was
reported gone for 10 s. So a peer has at most three connections from this node: the data
connection, a heartbeat connection (:class:`HeartbeatConnections`, while the peer is watched and
its data connection is direct) and a DHT control connection (:class:`DhtControlConnections`,
only while that data connection uploads, closed after :data:`CONTROL_IDLE_S` unused). Neither
small one is counted among the node's connections (``gossamer_net_connections`` counts data
connections); the DHT's calls on its control connection are counted with the node's calls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from gossamer.core.clock import Clock
from gossamer.core.errors import DeadlineExceededError, RetryableError
from gossamer.net.config import NodeConfig
from gossamer.net.connections import ConnectionPool, DialTarget
from gossamer.net.counters import NetCounters
from gossamer.net.dht_service import DHT_METHODS
from gossamer.net.identity import Identity, short_peer_id
from gossamer.proto import net_pb2

__all__ = ["CONTROL_IDLE_S", "DhtControlConnections", "HeartbeatConnections", "NodeCallCounters"]

_log = logging.getLogger(__name__)
CONTROL_IDLE_S = 30.0
"""How long a DHT control connection stays open unused: past a round's uploads, not past the
next round's few seconds of quiet."""

OwnRecord = Callable[[], net_pb2.SignedPeerRecord | None]


class NodeCallCounters(NetCounters):
    """Counters of a side pool: its calls, bytes and errors go to the node's counters (so the
    ``gossamer_net_rpc_*`` and traffic metrics see them); its connections are its own (the
    ``gossamer_net_connections`` gauge is read from :attr:`NetCounters.connections` and counts
    the node's data connections only)."""

    def __init__(self, node: NetCounters) -> None:
        super().__init__()
        self._node = node

    def sent(self, peer_id: str, num_bytes: int) -> None:
        self._node.sent(peer_id, num_bytes)

    def received(self, peer_id: str, num_bytes: int) -> None:
        self._node.received(peer_id, num_bytes)

    def call_made(self, peer_id: str, method: str, latency_s: float, ok: bool) -> None:
        self._node.call_made(peer_id, method, latency_s, ok)

    def error(self, exc: BaseException) -> None:
        self._node.error(exc)


class HeartbeatConnections:
    """Heartbeats, each on the peer's heartbeat connection where its data connection is direct.

    Args:
        identity, config, clock, own_record: as the node's :class:`ConnectionPool` takes them.
        data: the node's data connections.
        resolve: the node's ways to reach a peer (the directory's addresses, relays).
    """

    def __init__(
        self,
        identity: Identity,
        config: NodeConfig,
        clock: Clock,
        data: ConnectionPool,
        resolve: Callable[[str], list[DialTarget]],
        own_record: OwnRecord,
    ) -> None:
        self._data = data
        self._resolve = resolve
        self.pool = ConnectionPool(identity, config, clock, NetCounters(), self.targets, own_record)
        """Connections that carry heartbeats alone; closed when the peer is no longer watched
        (the failure detector's ``on_unwatched`` is :meth:`ConnectionPool.drop`)."""

    def targets(self, peer_id: str) -> list[DialTarget]:
        """Where a heartbeat connection dials: where the (direct) data connection went first (it
        answered there), then what the node knows of the peer. A peer that restarted on a new
        port is reached at its new record's address once the old one refuses (dialled only
        where the old data connection went, it stayed reported gone)."""
        data = self._data.get(peer_id)
        first = [data.target] if data is not None else []
        return first + [t for t in self._resolve(peer_id) if t not in first]

    async def heartbeat(self, peer_id: str, timeout_s: float) -> float:
        """One heartbeat: a Ping without records, past the peer's circuit breaker, on a
        connection of its own where the data connection is direct; returns the peer's wall
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
        life either (:meth:`ConnectionPool.drop_if_silent`): a connection whose packets are
        silently lost is dialled afresh.

        Raises:
            GossamerError: the peer did not answer within ``timeout_s``, or could not be reached.
        """
        data = self._data.get(peer_id)
        own = data is not None and data.target.kind == "direct"
        if not own:
            await self.pool.drop(peer_id)
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


class DhtControlConnections:
    """DHT requests' connections to peers whose direct data connection uploads.

    Dialled only where the direct data connection went (a relay's tunnel is no place for it;
    with the data connection gone, requests go back to the data pool), closed by
    :meth:`close_idle` once no request chose it for ``idle_s``. Its breakers count only the
    requests on it, and not a timeout while the peer's data connection uploads (that link's
    queue explains it, as :meth:`ConnectionPool._count_in_breaker` says for the data pool):
    counted, the timeouts of FindNodes behind a thin link's queue opened it, and small Stores
    to a live peer were refused. Unless the failure detector reports the peer gone: its
    heartbeats, on their own connection beside the same upload, went unanswered, so the link
    does not explain it. A dial that fails is counted (see :meth:`ready`): that, and the
    detector, is how a frozen peer is given up.

    Args:
        identity, config, clock, own_record: as the node's :class:`ConnectionPool` takes them.
        data: the node's data connections.
        counters: the node's counters (calls, bytes and errors are counted there).
        reported_gone: whether the failure detector reports a peer gone now.
        idle_s: how long a control connection stays unused before it is closed.
    """

    def __init__(
        self,
        identity: Identity,
        config: NodeConfig,
        clock: Clock,
        data: ConnectionPool,
        counters: NetCounters,
        own_record: OwnRecord,
        *,
        reported_gone: Callable[[str], bool] = lambda _: False,
        idle_s: float = CONTROL_IDLE_S,
    ) -> None:
        self._data = data
        self._reported_gone = reported_gone
        self._idle_s = idle_s
        self._own = short_peer_id(identity.peer_id)
        self.pool = ConnectionPool(
            identity,
            config,
            clock,
            NodeCallCounters(counters),
            self.targets,
            own_record,
            link_busy=self.link_explains_timeouts,
        )
        self._chosen_s: dict[str, float] = {}
        """Per peer: when a request last chose its control connection (monotonic)."""

    def targets(self, peer_id: str) -> list[DialTarget]:
        """Where the control connection dials: where the direct data connection went, only."""
        data = self._data.get(peer_id)
        return [data.target] if data is not None and data.target.kind == "direct" else []

    def link_explains_timeouts(self, peer_id: str) -> bool:
        """Whether the peer's data connection has a bulk upload under way and the peer is not
        reported gone (see the class docstring)."""
        data = self._data.get(peer_id)
        return data is not None and data.num_uploads > 0 and not self._reported_gone(peer_id)

    def chosen(self, peer_id: str) -> None:
        """Note that a request goes on ``peer_id``'s control connection now."""
        self._chosen_s[peer_id] = self.pool.clock.monotonic()

    async def ready(self, peer_id: str, timeout_s: float) -> None:
        """Dial ``peer_id``'s control connection, if none is open, within ``timeout_s`` (the
        request's own deadline), through the pool's breaker: a failed dial counts there.

        The request then gets its own full ``timeout_s``: a request that dials takes twice its
        deadline at most. The handshake's round trips wait in the same full link queue as the
        request (at 2 Mbit/s the lab's holds 200 ms): within one shared 2 s deadline the dial
        and the request together came within a few tenths of it. Under the node's connect
        deadline instead (5 s) and outside the breaker, every request to a frozen peer took
        5 s and none was ever refused; now each takes the request's deadline, and once the
        breaker opens they are refused at once.

        Raises:
            GossamerError: the dial failed, or the breaker refused it.
        """
        if self.pool.get(peer_id) is not None:
            return
        breaker = self.pool.breakers[peer_id]
        trial = breaker.before_call()
        try:
            await self.pool.connection(peer_id, timeout_s=timeout_s)
        except RetryableError:
            breaker.failed()
            raise
        finally:
            if trial:
                breaker.settled()

    async def close_idle(self) -> None:
        """Close the control connections no request chose for ``idle_s`` (a request runs for
        twice its deadline at most, well under it: none is closed under a request)."""
        now_s = self.pool.clock.monotonic()
        for peer_id in self.pool.peer_ids:
            if now_s - self._chosen_s.get(peer_id, -float("inf")) >= self._idle_s:
                _log.debug(
                    "peer %s: control connection to %s unused for %.0f s: closed",
                    self._own,
                    short_peer_id(peer_id),
                    self._idle_s,
                )
                await self.pool.drop(peer_id)
        open_ = set(self.pool.peer_ids)
        for peer_id, chosen_s in list(self._chosen_s.items()):
            if peer_id not in open_ and now_s - chosen_s >= self._idle_s:
                del self._chosen_s[peer_id]
