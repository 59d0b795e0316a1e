"""Bootstrapping again keeps a working connection to the bootstrap peer.

A node bootstraps again whenever its directory empties (on a 500 kbit/s lab link busy both ways
its records expired while refreshes timed out), and the dial closed the connection it replaced:
with the relay as bootstrap peer, its reservation and the tunnels on it went too.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from gossamer.net.config import NodeConfig
from gossamer.net.node import Node
from gossamer.proto import net_pb2

SECRET = b"rebootstrap-test-secret-0123456789"


def _config(**overrides: Any) -> NodeConfig:
    return NodeConfig(listen_address="127.0.0.1:0", swarm_secret=SECRET, **overrides)


@pytest.mark.parametrize("with_peer_id", [False, True], ids=["host-port", "peer-id-at"])
def test_bootstrapping_again_keeps_the_relays_connection_and_reservation(
    with_peer_id: bool,
) -> None:
    async def scenario() -> None:
        async with Node(_config()) as relay:
            entry = relay.addresses[0]
            if with_peer_id:
                entry = f"{relay.peer_id}@{entry}"
            async with Node(
                _config(bootstrap=(entry,), advertise_addresses=("127.0.0.1:9",))
            ) as hidden:
                hidden.reachability = net_pb2.REACHABILITY_RELAYED
                hidden.reservations.wake()
                assert await hidden.wait_for_relay(10.0), "no relay reservation within 10 s"
                connection = hidden.pool.get(relay.peer_id)
                assert connection is not None
                relays = dict(hidden.reservations.active)

                assert await hidden.bootstrap(hidden.config.bootstrap) == 1

                # (the old code: a new connection, the old one closed with the reservation on it)
                assert hidden.pool.get(relay.peer_id) is connection
                assert connection.channel.get_state() == grpc.ChannelConnectivity.READY
                assert hidden.reservations.active == relays
                # and the connection still carries calls
                await hidden.ping(relay.peer_id, timeout_s=5.0)

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_bootstrapping_again_redials_a_closed_connection() -> None:
    async def scenario() -> None:
        async with (
            Node(_config()) as seed,
            Node(_config(bootstrap=(seed.addresses[0],))) as node,
        ):
            connection = node.pool.get(seed.peer_id)
            assert connection is not None
            await connection.channel.close(None)

            assert await node.bootstrap(node.config.bootstrap) == 1

            fresh = node.pool.get(seed.peer_id)
            assert fresh is not None
            assert fresh is not connection
            await node.ping(seed.peer_id, timeout_s=5.0)

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))
