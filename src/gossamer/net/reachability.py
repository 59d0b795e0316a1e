"""Can others reach this peer? Found by asking peers to dial back.

A peer sends the addresses it listens on to a few other peers; each tries to open an
authenticated connection back to it (the handshake must prove the caller's own peer id) and
answers which addresses worked and which address it saw the call come from. A peer that nobody
could dial is behind NAT or a firewall and needs a relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc

from gossamer.core.errors import GossamerError, PeerUnavailableError, ProtocolError
from gossamer.net.addresses import ip_of, join_host_port, observed_host, port_of
from gossamer.net.connections import ConnectionPool, DialTarget
from gossamer.net.identity import short_peer_id
from gossamer.net.server import current_session
from gossamer.proto import net_pb2, net_pb2_grpc

__all__ = ["DIAL_BACK_METHOD", "ReachabilityServicer"]

_log = logging.getLogger(__name__)
DIAL_BACK_METHOD = "/gossamer.net.v1.Reachability/DialBack"
_MAX_ADDRESSES = 4
_DIAL_BACK_TIMEOUT_S = 2.0


class ReachabilityServicer(net_pb2_grpc.ReachabilityServicer):
    """Dials callers back at the address their call came from, on the ports they name (a few,
    with a short deadline, one request of a caller at a time).

    Only the caller's own address is dialled: dialling the hosts a caller names would let any
    peer make this one connect to third parties (or probe which of their ports are open). A
    call that came from loopback is dialled back only where this node itself is reached on
    loopback (a single-machine swarm): a relayed call arrives from the local tunnel's end, and
    its loopback ports are this machine's, not the caller's. The dial back only proves the
    caller can be reached: the connection is closed, and one already open to the caller stays.

    Args:
        pool: dials.
        loopback_ok: whether this node is reached on loopback now (then callers from loopback
            are on this machine too).
    """

    def __init__(self, pool: ConnectionPool, *, loopback_ok: Callable[[], bool]) -> None:
        self._pool = pool
        self._loopback_ok = loopback_ok
        self._busy: set[str] = set()

    async def DialBack(
        self, request: net_pb2.DialBackRequest, context: grpc.aio.ServicerContext
    ) -> net_pb2.DialBackResponse:
        if len(request.addresses) > _MAX_ADDRESSES:
            raise ProtocolError(f"DialBack names over {_MAX_ADDRESSES} addresses")
        caller = current_session().peer_id
        if caller in self._busy:
            raise PeerUnavailableError("a dial back for this peer is under way already")
        seen = observed_host(context.peer())
        ip = ip_of(seen)
        # Not an IP literal (a unix socket, say), or loopback that is not this node's: no
        # host to dial.
        if ip is None or (ip.is_loopback and not self._loopback_ok()):
            seen = ""
        ports: dict[int, None] = {}  # (in the caller's order)
        for address in request.addresses:
            with contextlib.suppress(ValueError):  # (not HOST:PORT: no port to dial)
                ports[port_of(address)] = None
        candidates = [join_host_port(seen, p) for p in ports if seen and p]

        async def try_one(address: str) -> bool:
            try:
                await self._pool.dial(
                    DialTarget(address),
                    expected_peer_id=caller,
                    timeout_s=_DIAL_BACK_TIMEOUT_S,
                    keep=False,
                )
            except GossamerError as exc:
                _log.debug("dial back to %s at %s failed: %s", short_peer_id(caller), address, exc)
                return False
            return True

        self._busy.add(caller)
        try:
            results = await asyncio.gather(*(try_one(a) for a in candidates))
        finally:
            self._busy.discard(caller)
        reachable = [a for a, ok in zip(candidates, results, strict=True) if ok]
        return net_pb2.DialBackResponse(
            observed_address=seen,
            reachable_addresses=reachable,
            detail="reachable" if reachable else "no address answered a dial back",
        )
