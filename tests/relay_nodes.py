"""Relay tests' set-up on loopback: a peer that says it is behind NAT reserving relays, what a
dialer learns of it, and one ping with no retries."""

from __future__ import annotations

from gossamer.net.node import Node
from gossamer.proto import net_pb2
from loopback_nodes import until

__all__ = ["learn_record_of", "make_unreachable", "ping"]


async def make_unreachable(node: Node, *relays: Node | str) -> None:
    """Mark ``node`` as behind NAT (as dial-back would) and wait until it holds a reservation
    with every one of ``relays`` (nodes, or ``ID@HOST:PORT`` entries)."""
    entries = [r if isinstance(r, str) else f"{r.peer_id}@{r.addresses[0]}" for r in relays]
    await node.bootstrap(entries)
    node.reachability = net_pb2.REACHABILITY_RELAYED
    node.reservations.wake()
    await until(lambda: len(node.relays) >= len(entries), 10.0, "relay reservations")


def learn_record_of(node: Node, peer: Node) -> None:
    """``node`` learns ``peer``'s record as it stands (its relays included)."""
    record = peer.own_record()
    assert record is not None
    node.dht.learn(record)


async def ping(dialer: Node, peer_id: str, timeout_s: float) -> None:
    """One ping from ``dialer`` to ``peer_id``, no retries."""
    await dialer.call(
        peer_id,
        "/gossamer.net.v1.Dht/Ping",
        net_pb2.PingRequest(),
        net_pb2.PingResponse,
        timeout_s=timeout_s,
        retry=False,
    )
