"""Bootstrapping again keeps a working connection to the bootstrap peer.

A node bootstraps again whenever its directory empties (on a 500 kbit/s lab link busy both ways
its records expired while refreshes timed out), and the dial closed the connection it replaced:
with the relay as bootstrap peer, its reservation and the tunnels on it went too.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import grpc
import pytest

from gossamer.net.config import NodeConfig
from gossamer.net.node import Node
from gossamer.proto import net_pb2

SECRET = b"rebootstrap-test-secret-0123456789"


def _config(**overrides: Any) -> NodeConfig:
    return NodeConfig(**{"listen_address": "127.0.0.1:0", "swarm_secret": SECRET, **overrides})


def _free_address() -> str:
    """A loopback HOST:PORT free now, for a peer that restarts at the same address."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


async def _until(condition: Any, timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it holds; fails naming ``what`` past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        await asyncio.sleep(0.05)


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


def test_a_bootstrap_peer_restarted_with_a_new_identity_is_reached_at_the_first_try() -> None:
    # The kept connection to the old peer (IDLE once it stopped) failed its ping with a
    # misleading certificate error, and the bootstrap gave up on the entry: it dials afresh.
    async def scenario() -> None:
        entry = _free_address()
        async with Node(_config()) as client:
            async with Node(_config(listen_address=entry)) as first:
                assert await client.bootstrap([entry]) == 1
                old_id = first.peer_id
            old = client.pool.get(old_id)
            assert old is not None
            await _until(
                lambda: old.channel.get_state() != grpc.ChannelConnectivity.READY,
                10.0,
                "change of the stopped peer's connection from READY",
            )
            async with Node(_config(listen_address=entry)) as second:
                assert await client.bootstrap([entry]) == 1
                assert client.pool.get(second.peer_id) is not None
                assert list(client._bootstrap_ids) == [second.peer_id]

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_bootstrapping_again_keeps_the_connection_to_a_relay_restarted_with_a_new_identity() -> (
    None
):
    # The old id stayed mapped to the address and was looked up first (no connection): every
    # bootstrap dialed again and closed the working connection, reservation and tunnels.
    async def scenario() -> None:
        entry = _free_address()
        relay_config = _config(listen_address=entry)
        async with Node(_config(bootstrap=(entry,), advertise_addresses=("127.0.0.1:9",))) as (
            hidden
        ):
            async with Node(relay_config):
                hidden.reachability = net_pb2.REACHABILITY_RELAYED
                hidden.reservations.wake()
                assert await hidden.wait_for_relay(10.0), "no relay reservation within 10 s"
            async with Node(relay_config) as relay:
                assert await hidden.bootstrap([entry]) == 1
                hidden.reservations.wake()
                await _until(
                    lambda: relay.peer_id in hidden.reservations.active,
                    20.0,
                    "a reservation with the restarted relay",
                )
                connection = hidden.pool.get(relay.peer_id)
                assert connection is not None

                assert await hidden.bootstrap([entry]) == 1

                assert hidden.pool.get(relay.peer_id) is connection
                assert connection.channel.get_state() == grpc.ChannelConnectivity.READY
                assert relay.peer_id in hidden.reservations.active

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_a_fresh_dial_lets_calls_through_a_breaker_the_dead_connection_opened() -> None:
    # Calls timing out on a silently dead connection opened the peer's breaker; the bootstrap's
    # fresh dial reached the peer and its Ping was then refused by that breaker (reached 0).
    async def scenario() -> None:
        async with (
            Node(_config()) as seed,
            Node(_config(bootstrap=(seed.addresses[0],))) as node,
        ):
            connection = node.pool.get(seed.peer_id)
            assert connection is not None
            breaker = node.pool.breakers[seed.peer_id]
            for _ in range(node.config.breaker.failure_threshold):
                breaker.failed()
            assert breaker.state == "open"
            await node.pool.drop(seed.peer_id, connection)

            assert await node.bootstrap(node.config.bootstrap) == 1
            assert breaker.state == "closed"

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))
