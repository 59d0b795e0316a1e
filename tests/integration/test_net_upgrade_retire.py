"""A relayed connection replaced by a direct one on loopback: a transfer running on it when it
is replaced runs to its end, new calls go the direct way, and it is closed once idle."""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

import grpc

from gossamer.net.config import NodeConfig
from gossamer.net.node import Node
from gossamer.proto import net_pb2
from loopback_nodes import until

SECRET = b"upgrade-retire-test-secret-0123456789"


def _config(**overrides: Any) -> NodeConfig:
    return NodeConfig(listen_address="127.0.0.1:0", swarm_secret=SECRET, **overrides)


def test_a_transfer_across_an_upgrade_completes_then_the_relayed_connection_closes() -> None:
    payload = os.urandom(1 << 20)

    async def scenario() -> None:
        async with (
            Node(_config()) as relay,
            Node(_config(advertise_addresses=("127.0.0.1:9",))) as hidden,
            Node(_config()) as dialer,
        ):
            dialer.reachability = net_pb2.REACHABILITY_DIRECT
            dialer.sign_own_record()
            await hidden.bootstrap([f"{relay.peer_id}@{relay.addresses[0]}"])
            hidden.reachability = net_pb2.REACHABILITY_RELAYED
            hidden.reservations.wake()
            assert await hidden.wait_for_relay(10.0), "no relay reservation within 10 s"
            record = hidden.own_record()
            assert record is not None
            dialer.dht.learn(record)
            # The upgrade waits until a transfer runs on the relayed connection.
            offers: list[str] = []
            dialer.relay_service.on_direct_reservation = offers.append
            entered, release = asyncio.Event(), asyncio.Event()
            received: list[bytes] = []

            async def handler(sender: str, topic: str, data: bytearray) -> None:
                entered.set()
                await release.wait()
                received.append(hashlib.sha256(data).digest())

            hidden.on_bulk("t", handler)
            transfer = asyncio.ensure_future(
                dialer.send_bulk(hidden.peer_id, "t", payload, timeout_s=30)
            )
            await asyncio.wait_for(entered.wait(), 10)
            relayed = dialer.pool.get(hidden.peer_id)
            assert relayed is not None
            assert relayed.target.kind == "relayed"
            await until(lambda: bool(offers), 10, "no direct reservation")
            dialer.upgrades.reversed_to(offers[0])
            await until(lambda: dialer.counters.num_direct_upgrades == 1, 10, "no upgrade")
            # new calls go the direct way while the transfer still runs on the relayed one
            await dialer.call(
                hidden.peer_id,
                "/gossamer.net.v1.Dht/Ping",
                net_pb2.PingRequest(),
                net_pb2.PingResponse,
                timeout_s=5,
                retry=False,
            )
            direct = dialer.pool.get(hidden.peer_id)
            assert direct is not None
            assert direct.target.kind == "direct"
            assert not transfer.done()
            assert relayed.channel.get_state() != grpc.ChannelConnectivity.SHUTDOWN
            release.set()
            await asyncio.wait_for(transfer, 10)
            assert received == [hashlib.sha256(payload).digest()]
            await until(
                lambda: relayed.channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN,
                5,
                "the idle relayed connection was not closed",
            )

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))
