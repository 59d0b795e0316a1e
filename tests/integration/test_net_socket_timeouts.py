"""What the kernel is told about a node's connections (read back from the sockets themselves)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

from gossamer.net.config import NodeConfig
from gossamer.net.node import Node


def _user_timeouts_ms(port: int) -> list[int]:
    """``TCP_USER_TIMEOUT`` of this process's connected TCP sockets with ``port`` at one end."""
    found: list[int] = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # (gone meanwhile, or not a socket)
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(int(name))) as sock:
                if sock.type != socket.SOCK_STREAM or sock.family not in (
                    socket.AF_INET,
                    socket.AF_INET6,
                ):
                    continue
                ends = (sock.getsockname()[1], sock.getpeername()[1])  # (a listener: OSError)
                if port in ends:
                    found.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))
    return found


def test_both_ends_wait_unacked_data_timeout_s_for_acks_not_keepalive_timeout_s() -> None:
    """gRPC sets ``TCP_USER_TIMEOUT`` to its keepalive timeout on every socket it opens. It
    was ``keepalive_timeout_s`` (5 s), and on a 500 kbit/s link busy both ways the kernel
    aborted connections whose segments waited that long behind the queues."""

    async def scenario() -> None:
        config = NodeConfig(listen_address="127.0.0.1:0", keepalive_timeout_s=5.0)
        async with Node(config) as server, Node(config) as client:
            await client.bootstrap([server.addresses[0]])
            timeouts = _user_timeouts_ms(server.port)
            # (one socket at each end at least; the old code: 5000 on every one)
            assert len(timeouts) >= 2, timeouts
            assert set(timeouts) == {int(config.unacked_data_timeout_s * 1000)}, timeouts

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))
