"""A peer over its DHT request rate is refused on loopback gRPC with RESOURCE_EXHAUSTED and keeps
its connection; its heartbeats are still answered; a Ping carrying another peer's record teaches
the node nothing; a Store of a record older than the one held answers stored=False."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from gossamer.core.errors import ProtocolError
from gossamer.net.config import DhtConfig, NodeConfig
from gossamer.net.connections import DialTarget
from gossamer.net.dht_service import DHT_METHODS
from gossamer.net.identity import Identity
from gossamer.net.node import Node
from gossamer.net.records import sign_peer_record, sign_record
from gossamer.proto import net_pb2

SECRET = b"integration-secret-0123456789"


def test_a_peer_over_its_request_rate_is_refused_and_keeps_its_connection() -> None:
    async def scenario() -> None:
        slow = DhtConfig(requests_per_s_per_peer=0.001, request_burst_per_peer=3)
        victim_config = NodeConfig(listen_address="127.0.0.1:0", swarm_secret=SECRET, dht=slow)
        config = NodeConfig(listen_address="127.0.0.1:0", swarm_secret=SECRET)
        async with Node(victim_config) as victim, Node(config) as caller:
            await caller.pool.dial(DialTarget(victim.addresses[0]), expected_peer_id=victim.peer_id)
            connection = caller.pool.get(victim.peer_id)
            assert connection is not None

            async def find_node() -> net_pb2.FindNodeResponse:
                return await caller.pool.call(
                    victim.peer_id,
                    DHT_METHODS["FindNode"],
                    net_pb2.FindNodeRequest(target=b"\1" * 32),
                    net_pb2.FindNodeResponse,
                    timeout_s=5.0,
                    retry=False,
                )

            async def heartbeat() -> net_pb2.PingResponse:
                return await caller.pool.call(
                    victim.peer_id,
                    DHT_METHODS["Ping"],
                    net_pb2.PingRequest(sequence=7),
                    net_pb2.PingResponse,
                    timeout_s=5.0,
                    retry=False,
                )

            for _ in range(3):
                await find_node()
            with pytest.raises(ProtocolError, match="RESOURCE_EXHAUSTED"):
                await find_node()
            assert caller.pool.get(victim.peer_id) is connection
            for _ in range(10):  # heartbeats are never refused
                assert (await heartbeat()).sequence == 7
            assert caller.pool.get(victim.peer_id) is connection

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_ping_carrying_another_peer_s_record_teaches_nothing() -> None:
    async def scenario() -> None:
        config = NodeConfig(listen_address="127.0.0.1:0", swarm_secret=SECRET)
        async with Node(config) as victim, Node(config) as caller:
            await caller.pool.dial(DialTarget(victim.addresses[0]), expected_peer_id=victim.peer_id)
            throwaway = Identity.generate()
            record = sign_peer_record(
                throwaway,
                net_pb2.PeerRecordValue(addresses=["10.9.9.9:1"]),
                now_s=victim.clock.wall(),
                ttl_s=60.0,
            )
            await caller.pool.call(
                victim.peer_id,
                DHT_METHODS["Ping"],
                net_pb2.PingRequest(sender=record),
                net_pb2.PingResponse,
                timeout_s=5.0,
            )
            assert throwaway.peer_id not in victim.directory

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_store_of_an_older_record_answers_not_stored_with_the_reason() -> None:
    async def scenario() -> None:
        config = NodeConfig(listen_address="127.0.0.1:0", swarm_secret=SECRET)
        async with Node(config) as victim, Node(config) as caller:
            await caller.pool.dial(DialTarget(victim.addresses[0]), expected_peer_id=victim.peer_id)
            key = hashlib.sha256(b"membership").digest()
            now_s = caller.clock.wall()
            newer = sign_record(caller.identity, key, b"left", now_s=now_s, ttl_s=60.0)
            older = sign_record(caller.identity, key, b"active", now_s=now_s - 30.0, ttl_s=60.0)
            answers = []
            for record in (newer, older):
                answers.append(
                    await caller.pool.call(
                        victim.peer_id,
                        DHT_METHODS["Store"],
                        net_pb2.StoreRequest(record=record),
                        net_pb2.StoreResponse,
                        timeout_s=5.0,
                    )
                )
            assert answers[0].stored
            assert not answers[1].stored
            assert "later" in answers[1].reason
            assert [r.value for r in victim.dht.local_records(key)] == [b"left"]

    asyncio.run(asyncio.wait_for(scenario(), 60))
