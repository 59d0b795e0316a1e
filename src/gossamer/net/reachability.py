"""Can others reach this peer? Found by asking peers to dial back.

A peer sends the addresses it listens on to a few other peers; each tries to open an
authenticated connection back to it (the handshake must prove the caller's own peer id) and
answers which addresses worked and which address it saw the call come from. A peer that nobody
could dial is behind NAT or a firewall and needs a relay.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from gossamer.core.errors import GossamerError, ProtocolError
from gossamer.net.connections import ConnectionPool, DialTarget
from gossamer.net.identity import short_peer_id
from gossamer.net.server import current_session
from gossamer.proto import net_pb2, net_pb2_grpc

__all__ = ["DIAL_BACK_METHOD", "ReachabilityServicer", "observed_host"]

_log = logging.getLogger(__name__)
DIAL_BACK_METHOD = "/gossamer.net.v1.Reachability/DialBack"
_MAX_ADDRESSES = 4
_DIAL_BACK_TIMEOUT_S = 2.0


def observed_host(grpc_peer: str) -> str:
    """The host in gRPC's ``context.peer()`` form (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``)."""
    _, _, rest = grpc_peer.partition(":")
    host = rest.rpartition(":")[0]
    return host.strip("[]")


class ReachabilityServicer(net_pb2_grpc.ReachabilityServicer):
    """Dials callers back on the addresses they name (a few, with a short deadline)."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    async def DialBack(
        self, request: net_pb2.DialBackRequest, context: grpc.aio.ServicerContext
    ) -> net_pb2.DialBackResponse:
        if len(request.addresses) > _MAX_ADDRESSES:
            raise ProtocolError(f"DialBack names over {_MAX_ADDRESSES} addresses")
        caller = current_session().peer_id
        seen = observed_host(context.peer())
        candidates = list(dict.fromkeys(request.addresses))
        # The caller may not know its public address (NAT): also try the one we saw.
        for address in list(candidates):
            port = address.rpartition(":")[2]
            if seen and f"{seen}:{port}" not in candidates and len(candidates) < _MAX_ADDRESSES:
                candidates.append(f"{seen}:{port}")

        async def try_one(address: str) -> bool:
            try:
                await self._pool.dial(
                    DialTarget(address), expected_peer_id=caller, timeout_s=_DIAL_BACK_TIMEOUT_S
                )
            except GossamerError as exc:
                _log.debug("dial back to %s at %s failed: %s", short_peer_id(caller), address, exc)
                return False
            return True

        results = await asyncio.gather(*(try_one(a) for a in candidates))
        reachable = [a for a, ok in zip(candidates, results, strict=True) if ok]
        return net_pb2.DialBackResponse(
            observed_address=seen,
            reachable_addresses=reachable,
            detail="reachable" if reachable else "no address answered a dial back",
        )
