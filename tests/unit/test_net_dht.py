"""The DHT over an in-memory network with a fake clock: lookups, records, expiry, failures."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from gossamer.core.clock import FakeClock
from gossamer.core.errors import AuthenticationError, ProtocolError
from gossamer.net.config import DhtConfig
from gossamer.net.identity import Identity
from gossamer.net.records import sign_record
from gossamer.net.routing import xor_distance
from net_fakes import FakeDhtNetwork

CONFIG = DhtConfig(bucket_size=8, parallelism=3, record_ttl_s=30.0, republish_interval_s=10.0)


async def _swarm(num_nodes: int, clock: FakeClock) -> FakeDhtNetwork:
    network = FakeDhtNetwork(clock, CONFIG)
    first = network.add_node()
    for _ in range(num_nodes - 1):
        node = network.add_node()
        node.learn(first.own_record())
        await node.lookup(node.identity.digest)
    for _ in range(10):  # refresh rounds until every directory is complete (bounded)
        if all(len(n.directory) == num_nodes - 1 for n in network.nodes.values()):
            break
        for node in network.nodes.values():
            await node.refresh()
    return network


def test_fifty_nodes_in_memory_all_discover_each_other() -> None:
    async def scenario() -> None:
        network = await _swarm(50, FakeClock())
        for node in network.nodes.values():
            assert len(node.directory) == 49

    asyncio.run(scenario())


def test_lookup_finds_the_true_nearest_peers() -> None:
    async def scenario() -> None:
        network = await _swarm(40, FakeClock())
        target = hashlib.sha256(b"some key").digest()
        truth = sorted(
            network.nodes, key=lambda p: xor_distance(network.nodes[p].identity.digest, target)
        )
        searcher = next(iter(network.nodes.values()))
        found = await searcher.lookup(target)
        expected = [p for p in truth if p != searcher.identity.peer_id][: CONFIG.bucket_size]
        assert found == expected

    asyncio.run(scenario())


def test_put_then_get_from_another_node_and_expiry() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        network = await _swarm(20, clock)
        nodes = list(network.nodes.values())
        key = hashlib.sha256(b"progress").digest()
        stored = await nodes[0].put(key, b"step 7")
        assert stored >= CONFIG.bucket_size - 1
        records = await nodes[-1].get(key)
        assert [r.value for r in records] == [b"step 7"]
        clock.advance(CONFIG.record_ttl_s + 1)
        for node in nodes:
            network.renew(node)
        assert await nodes[-1].get(key) == []

    asyncio.run(scenario())


def test_forged_and_expired_records_are_refused_and_never_returned() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        network = await _swarm(10, clock)
        nodes = list(network.nodes.values())
        key = hashlib.sha256(b"k").digest()
        record = sign_record(Identity.generate(), key, b"honest", now_s=clock.wall(), ttl_s=30)
        forged = type(record)()
        forged.CopyFrom(record)
        forged.value = b"forged"
        with pytest.raises(AuthenticationError):
            nodes[1].handle_store(forged)
        expired = sign_record(Identity.generate(), key, b"old", now_s=clock.wall() - 60, ttl_s=30)
        with pytest.raises(ProtocolError, match="expired"):
            nodes[1].handle_store(expired)
        # Malicious nodes that hand out a forged record: the reader drops and counts it.
        for liar in nodes[:3] + nodes[4:]:
            liar._store[key] = {"evil": forged}
        assert await nodes[3].get(key) == []
        assert nodes[3].counters.errors["AuthenticationError"] >= 1

    asyncio.run(scenario())


def test_dead_peers_leave_routing_on_failure_and_the_directory_at_expiry() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        network = await _swarm(20, clock)
        nodes = list(network.nodes.values())
        victims = [n.identity.peer_id for n in nodes[-3:]]
        network.dead.update(victims)
        survivor = nodes[0]
        target = hashlib.sha256(b"anything").digest()
        found = await survivor.lookup(target)  # lookups keep succeeding around the dead
        assert found
        assert not set(found) & set(victims)
        for _ in range(2):  # survivors renew their records; the dead cannot
            clock.advance(CONFIG.record_ttl_s / 2 + 1)
            for node in nodes[:-3]:
                network.renew(node)
            for node in nodes[:-3]:
                await node.refresh()
                # a random refresh may miss the survivor; a lookup of its id reaches it, so it
                # holds every live peer's renewed record (what the test is about is the dead)
                await node.lookup(survivor.identity.digest)
        survivor.expire()
        assert not set(victims) & {r.peer_id for r in survivor.directory.records()}
        assert len(survivor.directory) == 16
        for victim in victims:
            assert victim not in survivor.routing

    asyncio.run(scenario())
