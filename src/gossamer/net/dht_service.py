"""The DHT on the wire: the gRPC servicer that answers other peers, and the transport that asks."""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.protobuf.message import Message

from gossamer.core.clock import Clock
from gossamer.core.errors import AuthenticationError, ProtocolError
from gossamer.net.config import DhtConfig
from gossamer.net.connections import ConnectionPool
from gossamer.net.dht import Dht
from gossamer.net.grpc_errors import HANDLER_ANSWERED
from gossamer.net.identity import peer_id_of_public_key, short_peer_id
from gossamer.net.server import current_session
from gossamer.proto import net_pb2, net_pb2_grpc

if TYPE_CHECKING:  # (it imports this module's DHT_METHODS for heartbeats)
    from gossamer.net.control_connections import DhtControlConnections

__all__ = ["DHT_METHODS", "DhtServicer", "GrpcDhtTransport", "RequestBudget"]

_SERVICE = "/gossamer.net.v1.Dht/"
DHT_METHODS = {name: _SERVICE + name for name in ("Ping", "FindNode", "FindValue", "Store")}
_log = logging.getLogger(__name__)
R = TypeVar("R", bound=Message)


class RequestBudget:
    """A token bucket per peer: ``rate_per_s`` requests a second on average, ``burst`` at once.

    Args:
        rate_per_s: tokens added per second.
        burst: tokens a bucket holds at most (a new peer starts full).
        clock: monotonic time.
        max_peers: buckets kept; the one used longest ago goes first past it (it comes back
            full: no worse than a new identity, which costs nothing).
    """

    def __init__(self, rate_per_s: float, burst: int, clock: Clock, max_peers: int) -> None:
        self._rate_per_s = rate_per_s
        self._burst = float(burst)
        self._clock = clock
        self._max_peers = max_peers
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        """Per peer: tokens, and when they were counted."""

    def take(self, peer_id: str) -> bool:
        """Take one token of ``peer_id``'s bucket; False if it has none."""
        now_s = self._clock.monotonic()
        tokens, at_s = self._buckets.pop(peer_id, (self._burst, now_s))
        tokens = min(self._burst, tokens + (now_s - at_s) * self._rate_per_s)
        allowed = tokens >= 1.0
        self._buckets[peer_id] = (tokens - 1.0 if allowed else tokens, now_s)
        while len(self._buckets) > self._max_peers:
            self._buckets.popitem(last=False)
        return allowed


class DhtServicer(net_pb2_grpc.DhtServicer):
    """Answers DHT requests from authenticated peers.

    A peer's requests (FindNode, FindValue, Store, and Pings that trade records) are bounded
    by ``dht.requests_per_s_per_peer``; past it they are refused with RESOURCE_EXHAUSTED,
    marked as the handler's own answer so the caller keeps its connection. Heartbeats (Pings
    without a record) are always answered: they are how others tell this node is alive.
    """

    def __init__(self, dht: Dht) -> None:
        self._dht = dht
        self._budget = RequestBudget(
            dht.config.requests_per_s_per_peer,
            dht.config.request_burst_per_peer,
            dht.clock,
            dht.limits.max_sessions,
        )
        self.num_refused = 0
        """Requests refused for going over a peer's rate."""

    async def _admit(self, context: grpc.aio.ServicerContext) -> None:
        """Refuse the call (RESOURCE_EXHAUSTED) if its peer has used up its request budget."""
        peer_id = current_session().peer_id
        if self._budget.take(peer_id):
            return
        self.num_refused += 1
        _log.debug(
            "peer %s: refused a DHT request of %s: over its rate",
            short_peer_id(self._dht.identity.peer_id),
            short_peer_id(peer_id),
        )
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"over {self._dht.config.requests_per_s_per_peer:g} DHT requests a second from one "
            "peer; slow down",
            trailing_metadata=HANDLER_ANSWERED,
        )

    def _learn_sender(self, sender: net_pb2.SignedPeerRecord, has_sender: bool) -> str:
        """Note the caller, and learn its record; a record of another peer in ``sender`` is
        ignored (throwaway records sent there pushed gossip-learned peers out of a full
        directory: the field is for the caller's own)."""
        session = current_session()
        if has_sender:
            try:
                claimed = peer_id_of_public_key(sender.record.publisher_public_key)
            except ProtocolError:
                claimed = ""
            if claimed == session.peer_id:
                self._dht.learn(sender, contacted=session.peer_id)
            else:
                self._dht.counters.protocol_error()
                self._dht.directory.contacted(session.peer_id)
        else:
            self._dht.directory.contacted(session.peer_id)
        return session.peer_id

    def _responder(self) -> net_pb2.SignedPeerRecord | None:
        return self._dht.own_record()

    async def Ping(
        self, request: net_pb2.PingRequest, context: grpc.aio.ServicerContext
    ) -> net_pb2.PingResponse:
        has_sender = request.HasField("sender")
        if has_sender:
            await self._admit(context)
        self._learn_sender(request.sender, has_sender)
        response = net_pb2.PingResponse(
            sequence=request.sequence, wall_time_s=self._dht.clock.wall()
        )
        own = self._responder()
        if has_sender and own is not None:  # heartbeats stay small; a real ping trades records
            response.responder.CopyFrom(own)
        return response

    async def FindNode(
        self, request: net_pb2.FindNodeRequest, context: grpc.aio.ServicerContext
    ) -> net_pb2.FindNodeResponse:
        await self._admit(context)
        sender = self._learn_sender(request.sender, request.HasField("sender"))
        closest = self._dht.handle_find_node(sender, request.target)
        response = net_pb2.FindNodeResponse(
            closest=closest,
            gossip=self._dht.gossip_records(exclude=sender, known_filter=request.known_filter),
        )
        own = self._responder()
        if own is not None:
            response.responder.CopyFrom(own)
        return response

    async def FindValue(
        self, request: net_pb2.FindValueRequest, context: grpc.aio.ServicerContext
    ) -> net_pb2.FindValueResponse:
        await self._admit(context)
        sender = self._learn_sender(request.sender, request.HasField("sender"))
        records, closest = self._dht.handle_find_value(sender, request.key)
        response = net_pb2.FindValueResponse(records=records, closest=closest)
        own = self._responder()
        if own is not None:
            response.responder.CopyFrom(own)
        return response

    async def Store(
        self, request: net_pb2.StoreRequest, context: grpc.aio.ServicerContext
    ) -> net_pb2.StoreResponse:
        await self._admit(context)
        sender = self._learn_sender(request.sender, request.HasField("sender"))
        try:
            kept = self._dht.handle_store(request.record, sender=sender)
        except (ProtocolError, AuthenticationError) as exc:
            self._dht.counters.error(exc)
            self._dht.counters.num_protocol_errors += 1
            return net_pb2.StoreResponse(stored=False, reason=str(exc))
        if not kept:
            return net_pb2.StoreResponse(
                stored=False,
                reason="this node holds a record of this publisher under this key signed at "
                "the same time or later; it keeps that one",
            )
        return net_pb2.StoreResponse(stored=True)


class GrpcDhtTransport:
    """The :class:`DhtTransport` over the node's connection pool.

    A DHT request to a peer whose direct data connection has a bulk upload under way
    (:attr:`PeerConnection.num_uploads`) goes on a small control connection of its own instead
    (see :class:`~gossamer.net.control_connections.DhtControlConnections`). On the data
    connection it waited in the socket's send buffer behind the upload's megabytes: on a 2
    Mbit/s uplink every Store and FindNode to the peer ran past its 2 s deadline, and the
    records a peer published while it sent reached nobody. On its own connection a request
    waits only in the link's queue. Only then, because a second connection to every DHT contact
    would be waste where the data connection is idle; and only where the data connection is
    direct (a relayed one's tunnels share one connection to the relay, and each takes one of
    the relay's few places per dialer), as for heartbeats. Not the heartbeats' connection: a
    FindValue answer of up to 1 MiB held heartbeat answers behind it.

    While the peer's circuit breaker (the data pool's) is open, requests go to the data pool
    and are refused there at once, as before; requests on a control connection are counted in
    the control pool's own breakers (see
    :class:`~gossamer.net.control_connections.DhtControlConnections`), so they never refuse
    the next bulk send.

    Args:
        pool: the node's (data) connections.
        config: DHT config (request deadline).
        control: the node's DHT control connections, where requests go while the peer's direct
            data connection uploads (None: every request goes on the data connection).
    """

    def __init__(
        self, pool: ConnectionPool, config: DhtConfig, control: DhtControlConnections | None = None
    ) -> None:
        self._pool = pool
        self._config = config
        self._control = control
        self.dht: Dht | None = None
        """The local DHT (learns the records that come back)."""

    def pool_for(self, peer_id: str) -> ConnectionPool:
        """The pool a request to ``peer_id`` goes through now: the control pool while the
        peer's direct data connection has an upload under way and its breaker is not open,
        the data pool otherwise (see the class docstring)."""
        data = self._pool.get(peer_id)
        if (
            self._control is None
            or data is None
            or data.target.kind != "direct"
            or data.num_uploads == 0
            or (peer_id in self._pool.breakers and self._pool.breakers[peer_id].state == "open")
        ):
            return self._pool
        self._control.chosen(peer_id)
        return self._control.pool

    async def _call(
        self, peer_id: str, method: str, request: Message, response_type: type[R], timeout_s: float
    ) -> R:
        """One request, on the connection :meth:`pool_for` picks; a control connection not
        open yet is dialled first, within the request's deadline (see
        :meth:`DhtControlConnections.ready`)."""
        pool = self.pool_for(peer_id)
        if self._control is not None and pool is self._control.pool:
            await self._control.ready(peer_id, timeout_s)
        return await pool.call(
            peer_id, method, request, response_type, timeout_s=timeout_s, retry=False
        )

    def _sender(self) -> net_pb2.SignedPeerRecord | None:
        return self.dht.own_record() if self.dht is not None else None

    def _learn(self, peer_id: str, responder: net_pb2.SignedPeerRecord, present: bool) -> None:
        if present and self.dht is not None:
            self.dht.learn(responder, contacted=peer_id)

    async def ping(self, peer_id: str, *, with_record: bool, timeout_s: float) -> float:
        """One ping; with_record trades peer records, without it is a small heartbeat.

        Returns:
            The peer's wall clock as it answered (0 from a peer that sends none).
        """
        request = net_pb2.PingRequest()
        sender = self._sender()
        if with_record and sender is not None:
            request.sender.CopyFrom(sender)
        response = await self._call(
            peer_id, DHT_METHODS["Ping"], request, net_pb2.PingResponse, timeout_s
        )
        self._learn(peer_id, response.responder, response.HasField("responder"))
        return response.wall_time_s

    async def find_node(
        self, peer_id: str, target: bytes, known_filter: bytes = b""
    ) -> list[net_pb2.SignedPeerRecord]:
        request = net_pb2.FindNodeRequest(target=target, known_filter=known_filter)
        sender = self._sender()
        if sender is not None:
            request.sender.CopyFrom(sender)
        response = await self._call(
            peer_id,
            DHT_METHODS["FindNode"],
            request,
            net_pb2.FindNodeResponse,
            self._config.rpc_timeout_s,
        )
        self._learn(peer_id, response.responder, response.HasField("responder"))
        if self.dht is not None and len(response.gossip) <= self._config.bucket_size:
            for record in response.gossip:
                self.dht.learn(record, source=peer_id)
        return list(response.closest)

    async def find_value(
        self, peer_id: str, key: bytes
    ) -> tuple[list[net_pb2.SignedRecord], list[net_pb2.SignedPeerRecord]]:
        request = net_pb2.FindValueRequest(key=key)
        sender = self._sender()
        if sender is not None:
            request.sender.CopyFrom(sender)
        response = await self._call(
            peer_id,
            DHT_METHODS["FindValue"],
            request,
            net_pb2.FindValueResponse,
            self._config.rpc_timeout_s,
        )
        self._learn(peer_id, response.responder, response.HasField("responder"))
        return list(response.records), list(response.closest)

    async def store(self, peer_id: str, record: net_pb2.SignedRecord) -> bool:
        request = net_pb2.StoreRequest(record=record)
        sender = self._sender()
        if sender is not None:
            request.sender.CopyFrom(sender)
        response = await self._call(
            peer_id,
            DHT_METHODS["Store"],
            request,
            net_pb2.StoreResponse,
            self._config.rpc_timeout_s,
        )
        return bool(response.stored)
