"""The DHT on the wire: the gRPC servicer that answers other peers, and the transport that asks."""

from __future__ import annotations

import grpc

from gossamer.core.errors import AuthenticationError, ProtocolError
from gossamer.net.config import DhtConfig
from gossamer.net.connections import ConnectionPool
from gossamer.net.dht import Dht
from gossamer.net.server import current_session
from gossamer.proto import net_pb2, net_pb2_grpc

__all__ = ["DHT_METHODS", "DhtServicer", "GrpcDhtTransport"]

_SERVICE = "/gossamer.net.v1.Dht/"
DHT_METHODS = {name: _SERVICE + name for name in ("Ping", "FindNode", "FindValue", "Store")}


class DhtServicer(net_pb2_grpc.DhtServicer):
    """Answers DHT requests from authenticated peers."""

    def __init__(self, dht: Dht) -> None:
        self._dht = dht

    def _learn_sender(self, sender: net_pb2.SignedPeerRecord, has_sender: bool) -> str:
        session = current_session()
        if has_sender:
            self._dht.learn(sender, contacted=session.peer_id)
        else:
            self._dht.directory.contacted(session.peer_id)
        return session.peer_id

    def _responder(self) -> net_pb2.SignedPeerRecord | None:
        return self._dht.own_record()

    async def Ping(
        self, request: net_pb2.PingRequest, context: grpc.aio.ServicerContext
    ) -> net_pb2.PingResponse:
        has_sender = request.HasField("sender")
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
        self._learn_sender(request.sender, request.HasField("sender"))
        try:
            self._dht.handle_store(request.record)
        except (ProtocolError, AuthenticationError) as exc:
            self._dht.counters.error(exc)
            self._dht.counters.num_protocol_errors += 1
            return net_pb2.StoreResponse(stored=False, reason=str(exc))
        return net_pb2.StoreResponse(stored=True)


class GrpcDhtTransport:
    """The :class:`DhtTransport` over the node's connection pool.

    Args:
        pool: the node's connections.
        dht: the local DHT (learns the records that come back).
        config: DHT config (request deadline).
    """

    def __init__(self, pool: ConnectionPool, config: DhtConfig) -> None:
        self._pool = pool
        self._config = config
        self.dht: Dht | None = None

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
        response = await self._pool.call(
            peer_id,
            DHT_METHODS["Ping"],
            request,
            net_pb2.PingResponse,
            timeout_s=timeout_s,
            retry=False,
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
        response = await self._pool.call(
            peer_id,
            DHT_METHODS["FindNode"],
            request,
            net_pb2.FindNodeResponse,
            timeout_s=self._config.rpc_timeout_s,
            retry=False,
        )
        self._learn(peer_id, response.responder, response.HasField("responder"))
        if self.dht is not None and len(response.gossip) <= self._config.bucket_size:
            for record in response.gossip:
                self.dht.learn(record)
        return list(response.closest)

    async def find_value(
        self, peer_id: str, key: bytes
    ) -> tuple[list[net_pb2.SignedRecord], list[net_pb2.SignedPeerRecord]]:
        request = net_pb2.FindValueRequest(key=key)
        sender = self._sender()
        if sender is not None:
            request.sender.CopyFrom(sender)
        response = await self._pool.call(
            peer_id,
            DHT_METHODS["FindValue"],
            request,
            net_pb2.FindValueResponse,
            timeout_s=self._config.rpc_timeout_s,
            retry=False,
        )
        self._learn(peer_id, response.responder, response.HasField("responder"))
        return list(response.records), list(response.closest)

    async def store(self, peer_id: str, record: net_pb2.SignedRecord) -> bool:
        request = net_pb2.StoreRequest(record=record)
        sender = self._sender()
        if sender is not None:
            request.sender.CopyFrom(sender)
        response = await self._pool.call(
            peer_id,
            DHT_METHODS["Store"],
            request,
            net_pb2.StoreResponse,
            timeout_s=self._config.rpc_timeout_s,
            retry=False,
        )
        return bool(response.stored)
