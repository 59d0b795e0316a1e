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

import asyncio
import logging
from collections.abc import Callable

from gossamer.core.clock import Clock
from gossamer.core.errors import (
    DeadlineExceededError,
    GossamerError,
    PeerUnavailableError,
    RetryableError,
)
from gossamer.net.circuit_breaker import CircuitBreaker
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
    does not explain it. A dial is counted once (see :meth:`ready`): refused or broken as a
    failure, out of time only where the link does not explain it.

    How long a frozen peer gets: watched, the detector reports it gone ``heartbeat.timeout_s``
    (2.5 s) after its last answer; the control connection's timeouts and dials count from
    then, and after five of them the breaker refuses the rest (on 2 Mbit/s lab links, 16 s
    after the freeze). Not watched, nothing tells the link from the peer while the upload
    lasts: a request on the open control connection times out uncounted, the connection is
    closed once it showed no life for ``keepalive_interval_s + keepalive_timeout_s`` (15 s),
    and each request then takes its dial budget (:meth:`dial_budget_s`), uncounted too,
    until the upload fails or ends; the next five requests count, and the rest are refused.

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
        self._connect_timeout_s = config.connect_timeout_s
        self._dials: dict[str, asyncio.Future[GossamerError | None]] = {}
        """Per peer: the dial under way in :meth:`ready`, done with its error (None: dialled
        or cancelled), for the requests that wait for it."""

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

    def dial_budget_s(self, peer_id: str, timeout_s: float) -> float:
        """How long a control connection's dial for a request of ``timeout_s`` may take.

        While the link explains timeouts (:meth:`link_explains_timeouts`): twice the request's
        deadline, at most the node's ``connect_timeout_s`` (and never less than the deadline).
        The handshake's round trips (TCP, the certificate probe, TLS, hello and proof) each wait
        in the same queue behind the upload as the request: behind a 1 s queue the dial took
        2.8-3.0 s, past a 2 s request's own deadline, and the first request of every upload
        failed while the peer was live. Otherwise the request's own deadline: a peer reported
        gone is given up at the request's pace.
        """
        if not self.link_explains_timeouts(peer_id):
            return timeout_s
        return max(timeout_s, min(self._connect_timeout_s, 2.0 * timeout_s))

    async def ready(self, peer_id: str, timeout_s: float) -> None:
        """Dial ``peer_id``'s control connection, if none is open, within
        :meth:`dial_budget_s` and through the pool's breaker.

        One dial per peer at a time, counted once, in the request that dialled: requests that
        come while it runs wait for it (within the same budget) and count nothing. Counted by
        each, five FindNodes waiting on one slow dial to a live peer opened the breaker, and
        the peer's DHT requests were refused for up to 7 s. A dial that runs out of time while
        the link explains it counts neither way, as a call's timeout does (see the class
        docstring); a dial refused or broken counts as a failure. A control connection left
        from before the data connection was dialled afresh (:meth:`_drop_stale`) is closed
        first.

        The request then gets its own full ``timeout_s``. Under the node's connect deadline
        and outside the breaker, every request to a frozen peer took 5 s and none was ever
        refused; now, once the detector reports it gone, each takes the request's deadline,
        and once the breaker opens they are refused at once.

        Raises:
            GossamerError: the dial failed, or the breaker refused it.
        """
        await self._drop_stale(peer_id)
        if self.pool.get(peer_id) is not None:
            return
        budget_s = self.dial_budget_s(peer_id, timeout_s)
        pending = self._dials.get(peer_id)
        if pending is not None:
            await self._wait_for_dial(peer_id, pending, budget_s)
            return
        breaker = self.pool.breakers[peer_id]
        trial = breaker.before_call()
        done: asyncio.Future[GossamerError | None] = asyncio.get_running_loop().create_future()
        self._dials[peer_id] = done
        error: GossamerError | None = None
        try:
            await self.pool.connection(peer_id, timeout_s=budget_s)
        except RetryableError as exc:
            error = exc
            self._count_failed_dial(breaker, peer_id, exc)
            raise
        except GossamerError as exc:
            error = exc
            raise
        finally:
            if trial:
                breaker.settled()
            del self._dials[peer_id]
            done.set_result(error)

    async def _wait_for_dial(
        self, peer_id: str, pending: asyncio.Future[GossamerError | None], budget_s: float
    ) -> None:
        """Wait for another request's dial of ``peer_id`` within ``budget_s``; its outcome is
        counted by that request, not here."""
        try:
            async with asyncio.timeout(budget_s):
                error = await asyncio.shield(pending)
        except TimeoutError:
            raise DeadlineExceededError(
                f"connecting to {short_peer_id(peer_id)}: another request's dial of its control "
                f"connection took the whole {budget_s:.1f} s"
            ) from None
        if self.pool.get(peer_id) is not None:
            return
        reason = (
            f"connecting to {short_peer_id(peer_id)} failed in another request: "
            f"{error or 'that request ended first'}"
        )
        if isinstance(error, DeadlineExceededError):
            raise DeadlineExceededError(reason)
        raise PeerUnavailableError(reason)

    def _count_failed_dial(
        self, breaker: CircuitBreaker, peer_id: str, error: RetryableError
    ) -> None:
        """Count a failed dial in the breaker, unless it ran out of time while the link
        explains it (its handshake queued behind the upload: that says nothing of the peer)."""
        if isinstance(error, DeadlineExceededError) and self.link_explains_timeouts(peer_id):
            _log.debug(
                "peer %s: dial of a control connection to %s ran out of time behind a bulk "
                "upload: not counted in its circuit breaker",
                self._own,
                short_peer_id(peer_id),
            )
            return
        breaker.failed()

    async def _drop_stale(self, peer_id: str) -> None:
        """Close ``peer_id``'s control connection if it is not beside the current data
        connection: that one went elsewhere (the peer restarted on a new port) or was dialled
        after it (the peer restarted on the same port; the old connection may point at a
        process that is gone). Kept, it answered the first requests of the new incarnation's
        upload with UNAVAILABLE, a breaker failure each, for up to :data:`CONTROL_IDLE_S`."""
        control = self.pool.get(peer_id)
        if control is None:
            return
        data = self._data.get(peer_id)
        if (
            data is not None
            and (data.target.address, data.target.kind)
            == (control.target.address, control.target.kind)
            and data.opened_at_s <= control.opened_at_s
        ):
            return
        _log.debug(
            "peer %s: control connection to %s at %s is not beside its data connection "
            "(now %s): closed, dialled afresh",
            self._own,
            short_peer_id(peer_id),
            control.target.address,
            data.target.address if data is not None else "none",
        )
        await self.pool.drop(peer_id, control)

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
