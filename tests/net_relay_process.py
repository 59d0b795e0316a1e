"""A relay in its own process, for tests that pause it (SIGSTOP) as a hung machine would be.

Usage: ``python tests/net_relay_process.py SECRET KEEPALIVE_INTERVAL_S KEEPALIVE_TIMEOUT_S``. It
starts a node on 127.0.0.1 (port 0) with that swarm secret and keepalive, prints one line,
``PEER_ID ADDRESS``, and serves until it is killed or its standard input closes.
"""

from __future__ import annotations

import asyncio
import sys

from gossamer.net.config import NodeConfig
from gossamer.net.node import Node


async def main(secret: bytes, interval_s: float, timeout_s: float) -> None:
    config = NodeConfig(
        listen_address="127.0.0.1:0",
        swarm_secret=secret,
        keepalive_interval_s=interval_s,
        keepalive_timeout_s=timeout_s,
    )
    async with Node(config) as relay:
        print(relay.peer_id, relay.addresses[0], flush=True)
        # Serve until the test closes our stdin (or kills us): never outlive it.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1].encode(), float(sys.argv[2]), float(sys.argv[3])))
