"""Real nodes on 127.0.0.1 for in-process integration tests: each joins through the first."""

from __future__ import annotations

import contextlib

from gossamer.net.bridge import NodeThread
from gossamer.net.config import HeartbeatConfig, NodeConfig

__all__ = ["start_node_threads"]


def start_node_threads(stack: contextlib.ExitStack, count: int) -> list[NodeThread]:
    """Start ``count`` node threads (stopped when ``stack`` closes), all bootstrapped from the
    first, with the heartbeats swarm peers use (0.5 s, gone after 2.5 s)."""
    threads: list[NodeThread] = []
    bootstrap: tuple[str, ...] = ()
    for _ in range(count):
        config = NodeConfig(
            listen_address="127.0.0.1:0",
            bootstrap=bootstrap,
            heartbeat=HeartbeatConfig(interval_s=0.5, timeout_s=2.5),
        )
        node_thread = stack.enter_context(NodeThread(config))
        if not bootstrap:
            node = node_thread.node
            bootstrap = (f"{node.peer_id}@{node.addresses[0]}",)
        threads.append(node_thread)
    return threads
