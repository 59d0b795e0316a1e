"""The comm transport over net's node: messages travel as bulk transfers on one topic.

net's ``Bulk`` service (served through the node's one gRPC server, TLS and the handshake
included) already streams payloads in chunks, checks sizes before allocating and returns to the
sender once the receiver's handler ran, which is exactly :class:`CommTransport`'s contract; comm
adds no service of its own. gRPC errors arrive here already mapped to Gossamer's error tree.
Each message reaches the mailbox with its sender's host, where the connection shows it (see
:meth:`~gossamer.comm.transport.CommMailbox.deliver`).
"""

from __future__ import annotations

import ipaddress

from gossamer.comm.transport import MAX_MESSAGE_BYTES, Message, MessageReceiver, sender_host
from gossamer.core.errors import PeerUnavailableError
from gossamer.net.addresses import host_of, ip_of
from gossamer.net.node import Node
from gossamer.net.server import current_remote_host

__all__ = ["COMM_TOPIC", "NetCommTransport"]

COMM_TOPIC = "gossamer.comm.v1"
"""The bulk topic comm messages travel on."""


class NetCommTransport:
    """A :class:`CommTransport` over a started :class:`Node`.

    Args:
        node: the peer's node.
        num_streams: parallel gRPC streams per message (more can fill a long fat link).
    """

    def __init__(self, node: Node, *, num_streams: int = 1) -> None:
        self.node = node
        self.num_streams = num_streams
        self._receiver: MessageReceiver | None = None
        node.on_bulk_read_only(COMM_TOPIC, self._on_bulk, max_bytes=MAX_MESSAGE_BYTES)

    @property
    def peer_id(self) -> str:
        """This node's peer id."""
        return self.node.peer_id

    def set_receiver(self, receiver: MessageReceiver) -> None:
        """Route incoming comm messages to ``receiver``."""
        self._receiver = receiver

    async def _on_bulk(self, sender: str, topic: str, payload: bytearray | memoryview) -> None:
        if self._receiver is None:
            raise PeerUnavailableError("comm is not receiving on this peer yet")
        await self._receiver(sender, memoryview(payload), self._sender_host())

    def _sender_host(self) -> str | None:
        """The host of the message being received (see :func:`sender_host`), or None where it
        came from this machine (see :meth:`_this_machine`)."""
        ip = ip_of(current_remote_host())
        if ip is None:
            return None  # (a unix socket, say: this machine)
        if ip.is_loopback or ip.is_unspecified or ip in self._this_machine():
            return None
        return sender_host(str(ip))

    def _this_machine(self) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        """The addresses a connection from this machine comes from, besides loopback: the one
        relay tunnels connect to this node's server at (they end in a connection from this
        machine, so a relayed sender's own address never shows), the one it listens on, and
        those it advertises (peers of a swarm on one machine, listening on 0.0.0.0, dial each
        other there and come from there)."""
        hosts = [
            self.node._local_address(),
            self.node.config.listen_address,
            *self.node.addresses,
        ]
        ips = (ip_of(host_of(address)) for address in hosts)
        return {ip for ip in ips if ip is not None}

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        """Stream ``message`` to ``peer_id``; returns once its comm receiver handled it."""
        await self.node.send_bulk(
            peer_id, COMM_TOPIC, message, num_streams=self.num_streams, timeout_s=timeout_s
        )

    def close(self) -> None:
        """Stop receiving comm messages."""
        self.node.bulk.unregister(COMM_TOPIC)
