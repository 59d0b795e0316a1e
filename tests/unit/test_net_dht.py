"""The DHT over an in-memory network with a fake clock: lookups, records, expiry, failures."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossamer.core.clock import FakeClock
from gossamer.core.errors import AuthenticationError, PeerUnavailableError, ProtocolError
from gossamer.net.config import DhtConfig, LimitsConfig
from gossamer.net.counters import NetCounters
from gossamer.net.dht import Dht
from gossamer.net.directory import RECENT_CONTACT_S, PeerDirectory
from gossamer.net.identity import Identity
from gossamer.net.peer_filter import MAX_FILTER_BYTES, PeerFilter
from gossamer.net.records import MAX_RECORD_TTL_S, sign_peer_record, sign_record
from gossamer.net.routing import xor_distance
from gossamer.proto import net_pb2
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


def test_republish_renews_lasting_records_and_leaves_records_of_a_moment_to_expire() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        network = await _swarm(12, clock)
        nodes = list(network.nodes.values())
        lasting = hashlib.sha256(b"member of run").digest()
        moments = [hashlib.sha256(f"round {i}".encode()).digest() for i in range(50)]
        await nodes[0].put(lasting, b"active")
        for key in moments:
            await nodes[0].put(key, b"came", 5.0, renew=False)
        stores: list[bytes] = []
        store = nodes[0].transport.store

        async def counting(peer_id: str, record: net_pb2.SignedRecord) -> bool:
            stores.append(record.key)
            return await store(peer_id, record)

        nodes[0].transport.store = counting  # type: ignore[method-assign]
        for _ in range(3):  # republishes: each renews the one lasting record, nothing else
            clock.advance(CONFIG.republish_interval_s)
            await nodes[0].republish()
        assert stores, "nothing was republished"
        assert set(stores) == {lasting}
        for node in nodes:
            network.renew(node)
        assert [r.value for r in await nodes[-1].get(lasting)] == [b"active"]
        assert await nodes[-1].get(moments[0]) == []  # expired after its 5 s
        # A key put for a moment after it was put to last is no longer renewed either.
        await nodes[0].put(lasting, b"left", 5.0, renew=False)
        stores.clear()
        await nodes[0].republish()
        assert stores == []

    asyncio.run(scenario())


def test_a_record_only_its_publisher_holds_counts_for_replicated_reads_once_copied() -> None:
    # A put stores the record on its publisher first, on the nearest peers after. A publisher
    # killed in between leaves a record that only readers asking it saw: replicated reads
    # leave such a record out, so every reader counts the same records.
    async def scenario() -> None:
        clock = FakeClock()
        network = await _swarm(6, clock)
        publisher, reader, replica = list(network.nodes.values())[:3]
        key = hashlib.sha256(b"round entry").digest()
        record = sign_record(publisher.identity, key, b"here", now_s=clock.wall(), ttl_s=30)
        publisher.handle_store(record)  # the put's first act, and the publisher stops there
        assert [r.value for r in await reader.get(key)] == [b"here"]
        assert await reader.get(key, replicated_only=True) == []
        assert [r.value for r in await publisher.get(key, replicated_only=True)] == [b"here"]
        replica.handle_store(record)  # the put reached one other peer
        assert [r.value for r in await reader.get(key, replicated_only=True)] == [b"here"]
        assert [r.value for r in await replica.get(key, replicated_only=True)] == [b"here"]
        network.dead.add(publisher.identity.peer_id)  # the copy outlives its publisher
        assert [r.value for r in await reader.get(key, replicated_only=True)] == [b"here"]

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
            liar.local_records = lambda _key: [forged]  # type: ignore[method-assign]
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


def test_a_newcomer_learns_a_settled_swarm_within_four_refreshes() -> None:
    # Gossip drawn at random would leave a tail (a median of five refreshes and up to nine in
    # this swarm); the newcomer's known-peer filter makes every answer bring records it lacks
    # (two refreshes in 30 of 30 runs; the other two are for a record a filter's false
    # positive hid, which the next lookup's salt shows).
    async def scenario() -> None:
        network = await _swarm(64, FakeClock())
        assert all(len(n.directory) == 63 for n in network.nodes.values())
        first = next(iter(network.nodes.values()))
        newcomer = network.add_node()
        newcomer.learn(first.own_record())
        await newcomer.lookup(newcomer.identity.digest)
        for _ in range(4):
            await newcomer.refresh()
        assert len(newcomer.directory) == 64

    asyncio.run(scenario())


def test_gossip_sends_what_the_requester_lacks_first() -> None:
    async def scenario() -> None:
        network = await _swarm(40, FakeClock())
        responder, requester = list(network.nodes.values())[:2]
        held = [r for r in responder.directory.records() if r.peer_id != requester.identity.peer_id]
        lacking = held[-3:]
        # A Bloom filter claims about 1% of what it lacks (10 bits per peer): take a salt under
        # which none of the three is such a false positive, or the test is about luck.
        for number in range(100):
            claimed = PeerFilter.build(
                (r.signed.record.key for r in held[:-3]), salt=number.to_bytes(8, "little")
            )
            if not any(claimed.might_hold(r.signed.record.key) for r in lacking):
                break
        known = claimed.to_bytes()
        for _ in range(5):  # the other slots stay random; the lacking are sent every time
            gossip = responder.gossip_records(requester.identity.peer_id, known)
            assert len(gossip) == CONFIG.bucket_size
            sent = {r.record.key for r in gossip}
            assert {r.signed.record.key for r in lacking} <= sent
        with pytest.raises(ProtocolError, match="more than the 8200 accepted"):
            responder.gossip_records(requester.identity.peer_id, bytes(MAX_FILTER_BYTES + 1))

    asyncio.run(scenario())


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(min_size=32, max_size=32), max_size=300, unique=True))
def test_the_peer_filter_has_no_false_negatives(digests: list[bytes]) -> None:
    peer_filter = PeerFilter.parse(PeerFilter.build(digests).to_bytes())
    assert peer_filter is not None
    assert all(peer_filter.might_hold(d) for d in digests)


def test_the_peer_filter_false_positive_rate_is_about_one_percent() -> None:
    members = [hashlib.sha256(b"in %d" % i).digest() for i in range(2000)]
    others = [hashlib.sha256(b"out %d" % i).digest() for i in range(20_000)]
    peer_filter = PeerFilter.build(members)
    assert len(peer_filter.to_bytes()) == 8 + 2500
    rate = sum(peer_filter.might_hold(d) for d in others) / len(others)
    assert rate < 0.02, rate
    # Another salt hides other records: what one filter wrongly claims, another does not.
    again = PeerFilter.build(members)
    both = sum(peer_filter.might_hold(d) and again.might_hold(d) for d in others) / len(others)
    assert both < rate / 10, (both, rate)
    assert PeerFilter.parse(b"") is None
    with pytest.raises(ProtocolError, match="no bits"):
        PeerFilter.parse(bytes(8))
    assert len(PeerFilter.build(others).to_bytes()) == MAX_FILTER_BYTES


def lone_dht(
    clock: FakeClock,
    transport: Any,
    *,
    config: DhtConfig = CONFIG,
    limits: LimitsConfig | None = None,
) -> Dht:
    """A DHT node of its own over ``transport``."""
    limits = limits or LimitsConfig()
    identity = Identity.generate()
    counters = NetCounters()
    directory = PeerDirectory(
        identity.peer_id,
        clock,
        counters,
        max_value_bytes=limits.max_record_value_bytes,
        max_peers=10_000,
    )
    return Dht(identity, config, limits, clock, counters, directory, transport)


class EndlessSybilsTransport:
    """Every answer takes a second and names eight peers never seen before."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.num_requests = 0

    async def find_node(
        self, peer_id: str, target: bytes, known_filter: bytes = b""
    ) -> list[net_pb2.SignedPeerRecord]:
        self.num_requests += 1
        self.clock.advance(1.0)
        return [
            sign_peer_record(
                Identity.generate(),
                net_pb2.PeerRecordValue(addresses=["10.0.0.1:1"]),
                now_s=self.clock.wall(),
                ttl_s=60,
            )
            for _ in range(8)
        ]

    async def find_value(
        self, peer_id: str, key: bytes
    ) -> tuple[list[net_pb2.SignedRecord], list[net_pb2.SignedPeerRecord]]:
        return [], await self.find_node(peer_id, key)

    async def store(self, peer_id: str, record: net_pb2.SignedRecord) -> bool:
        return True


def test_a_lookup_ends_at_its_deadline_however_many_new_peers_answers_name() -> None:
    """Before the deadline, such a lookup ran its 64 steps: 3 requests of a second each."""
    clock = FakeClock()
    config = DhtConfig(bucket_size=8, parallelism=3, lookup_timeout_s=10.0)
    transport = EndlessSybilsTransport(clock)
    dht = lone_dht(clock, transport, config=config)
    for record in asyncio.run(transport.find_node("", b"")):
        dht.learn(record)
    started = clock.monotonic()
    found = asyncio.run(dht.lookup(hashlib.sha256(b"anything").digest()))
    assert len(found) == config.bucket_size
    # Every step's requests ran "at once" here, each advancing the clock a second.
    assert clock.monotonic() - started <= config.lookup_timeout_s + config.parallelism
    assert transport.num_requests <= config.lookup_timeout_s + config.parallelism


def test_one_publisher_fills_at_most_its_share_of_the_store() -> None:
    clock = FakeClock()
    limits = LimitsConfig(max_stored_records=10, max_records_per_publisher=4)
    dht = lone_dht(clock, EndlessSybilsTransport(clock), limits=limits)
    hog, other = Identity.generate(), Identity.generate()

    def record(identity: Identity, i: int) -> net_pb2.SignedRecord:
        key = hashlib.sha256(f"k{i}".encode()).digest()
        return sign_record(identity, key, b"v", now_s=clock.wall(), ttl_s=MAX_RECORD_TTL_S)

    for i in range(4):
        dht.handle_store(record(hog, i))
    for i in range(4, 50):  # refused: and nothing is left behind for them (no empty keys)
        with pytest.raises(ProtocolError, match="of this publisher"):
            dht.handle_store(record(hog, i))
    assert len(dht._store) == 4
    for i in range(6):  # others still find room, up to the store's total
        dht.handle_store(record(other if i < 4 else Identity.generate(), 100 + i))
    # Full: a peer that holds nothing takes the place of the oldest of the one holding most.
    dht.handle_store(record(Identity.generate(), 200))
    assert len(dht._store) == 10
    assert dht._num_by_publisher[hog.peer_id] == 3
    # This node's own records always fit: it stores them before they go out.
    own = sign_record(dht.identity, b"\1" * 32, b"mine", now_s=clock.wall(), ttl_s=60)
    assert asyncio.run(dht.store_on_closest(own, closest=[])) == 0
    assert [r.value for r in dht.local_records(b"\1" * 32)] == [b"mine"]


def test_a_peer_s_record_under_its_own_id_fits_when_others_filled_the_key() -> None:
    clock = FakeClock()
    limits = LimitsConfig(max_records_per_key=4)
    dht = lone_dht(clock, EndlessSybilsTransport(clock), limits=limits)
    owner = Identity.generate()
    for ttl_s in (100.0, 50.0, 300.0, 200.0):  # others fill the key under owner's id
        dht.handle_store(
            sign_record(Identity.generate(), owner.digest, b"x", now_s=clock.wall(), ttl_s=ttl_s)
        )
    with pytest.raises(ProtocolError, match="too many publishers"):
        dht.handle_store(
            sign_record(Identity.generate(), owner.digest, b"x", now_s=clock.wall(), ttl_s=60)
        )
    mine = sign_record(owner, owner.digest, b"me", now_s=clock.wall(), ttl_s=60)
    dht.handle_store(mine)
    kept = dht.local_records(owner.digest)
    assert len(kept) == 4
    assert mine in kept
    assert sorted(r.expires_at_s - r.published_at_s for r in kept if r != mine) == [
        100.0,
        200.0,
        300.0,
    ]  # the one nearest expiry made room


def test_records_claiming_a_week_of_life_do_not_push_live_peers_out_of_a_full_directory() -> None:
    """The directory evicted the record expiring soonest: 200 records minted to last a week
    emptied it of the peers that renew theirs every minute (and their routing entries)."""
    clock = FakeClock()
    dht = lone_dht(clock, EndlessSybilsTransport(clock))
    dht.directory = PeerDirectory(
        dht.identity.peer_id, clock, NetCounters(), max_value_bytes=16384, max_peers=20
    )
    dht.directory.on_removed = dht.routing.remove
    honest = [Identity.generate() for _ in range(10)]

    def record(identity: Identity, ttl_s: float) -> net_pb2.SignedPeerRecord:
        value = net_pb2.PeerRecordValue(addresses=["10.0.0.1:1"])
        return sign_peer_record(identity, value, now_s=clock.wall(), ttl_s=ttl_s)

    for identity in honest[:5]:
        dht.learn(record(identity, 60.0), contacted=identity.peer_id)
    for identity in honest[5:]:
        dht.learn(record(identity, 60.0))  # gossiped, never spoken to
    for _ in range(200):
        clock.advance(0.01)
        dht.learn(record(Identity.generate(), MAX_RECORD_TTL_S))
    for identity in honest[:5]:  # the peers this node spoke to stay
        assert identity.peer_id in dht.directory
    clock.advance(10.0)
    for identity in honest[5:]:  # renewed records are newer than the minted ones: back in
        dht.learn(record(identity, 60.0))
    for identity in honest:
        assert identity.peer_id in dht.directory
    assert len(dht.directory) == 20
    # Every peer in routing has a record (one evicted on arrival is routed nowhere).
    for peer_id in dht.routing.closest(b"\0" * 32, 64):
        assert peer_id in dht.directory


def test_one_handshake_long_ago_does_not_keep_a_record_in_a_full_directory() -> None:
    """Throwaway identities that each made one handshake ranked above every peer never spoken
    to, for as long as their records lasted (a week)."""
    clock = FakeClock()
    directory = PeerDirectory("me", clock, NetCounters(), max_value_bytes=16384, max_peers=10)

    def record(identity: Identity, ttl_s: float) -> net_pb2.SignedPeerRecord:
        value = net_pb2.PeerRecordValue(addresses=["10.0.0.1:1"])
        return sign_peer_record(identity, value, now_s=clock.wall(), ttl_s=ttl_s)

    spoken_to = [Identity.generate() for _ in range(5)]
    for identity in spoken_to:
        directory.learn(record(identity, MAX_RECORD_TTL_S))
        directory.contacted(identity.peer_id)
    clock.advance(RECENT_CONTACT_S + 1.0)
    directory.contacted(spoken_to[0].peer_id)  # this one is still spoken to
    gossiped = [Identity.generate() for _ in range(10)]
    for identity in gossiped:
        directory.learn(record(identity, 60.0))
    kept = [i for i in spoken_to + gossiped if i.peer_id in directory]
    assert kept == [spoken_to[0], *gossiped[1:]]


def test_a_full_directory_compares_a_bounded_number_of_records_per_new_one() -> None:
    """Each new record into a full directory compared every record (1.4 ms of the event loop
    at 10,000): throwaway records sent as pings' senders could keep the loop busy."""
    clock = FakeClock()
    directory = PeerDirectory("me", clock, NetCounters(), max_value_bytes=16384, max_peers=500)

    class CountingGets(dict[str, float]):
        num_gets = 0

        def get(self, key: str, default: Any = None) -> Any:
            CountingGets.num_gets += 1
            return super().get(key, default)

    directory.last_contact_wall_s = CountingGets()
    value = net_pb2.PeerRecordValue(addresses=["10.0.0.1:1"])
    for _ in range(510):
        directory.learn(sign_peer_record(Identity.generate(), value, now_s=clock.wall(), ttl_s=60))
        clock.advance(0.001)
    assert len(directory) == 500
    assert CountingGets.num_gets <= 10 * 64  # ten evictions, each of a sample


def test_contact_times_of_peers_without_records_do_not_pile_up() -> None:
    clock = FakeClock()
    directory = PeerDirectory("me", clock, NetCounters(), max_value_bytes=16384, max_peers=10)
    for i in range(1000):  # sessions of peers whose records never came
        directory.contacted(f"peer{i}")
    directory.expire()
    assert directory.last_contact_wall_s == {}


def test_a_find_node_tests_a_bounded_number_of_records_against_the_requester_s_filter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A filter that claims every record (the worst case) made a FindNode test the whole
    directory: 130 ms each at 10,000 peers, and any peer may send them."""
    clock = FakeClock()
    dht = lone_dht(clock, EndlessSybilsTransport(clock))
    for _ in range(3000):
        value = net_pb2.PeerRecordValue(addresses=["10.0.0.1:1"])
        dht.learn(sign_peer_record(Identity.generate(), value, now_s=clock.wall(), ttl_s=60))
    everything = PeerFilter.build(r.signed.record.key for r in dht.directory.records())
    num_tests = 0
    might_hold = PeerFilter.might_hold

    def counted(self: PeerFilter, digest: bytes) -> bool:
        nonlocal num_tests
        num_tests += 1
        return might_hold(self, digest)

    monkeypatch.setattr(PeerFilter, "might_hold", counted)
    gossip = dht.gossip_records(known_filter=everything.to_bytes())
    assert len(gossip) == CONFIG.bucket_size
    assert num_tests <= 1024


def test_this_node_s_own_record_under_a_full_key_keeps_the_key_within_its_limit() -> None:
    """Readers throw away a whole answer with more records than the limit: own records went
    past it, and the key was unreadable from this node."""
    clock = FakeClock()
    dht = lone_dht(clock, EndlessSybilsTransport(clock), limits=LimitsConfig(max_records_per_key=4))
    key = hashlib.sha256(b"round").digest()
    for ttl_s in (100.0, 50.0, 300.0, 200.0):
        dht.handle_store(
            sign_record(Identity.generate(), key, b"x", now_s=clock.wall(), ttl_s=ttl_s)
        )
    mine = sign_record(dht.identity, key, b"mine", now_s=clock.wall(), ttl_s=60)
    asyncio.run(dht.store_on_closest(mine, closest=[]))
    kept = dht.local_records(key)
    assert len(kept) == 4
    assert mine in kept
    assert min(r.expires_at_s - r.published_at_s for r in kept if r != mine) == 100.0


def test_a_key_holds_at_most_its_bytes_and_its_own_publisher_still_fits() -> None:
    # A lookup's answer carries every record of a key: with 1,024 publishers a key of 16 KiB
    # values would not fit a message, so a key holds max_key_bytes of values.
    clock = FakeClock()
    limits = LimitsConfig(max_record_value_bytes=1024, max_key_bytes=4096)
    dht = lone_dht(clock, EndlessSybilsTransport(clock), limits=limits)
    owner = Identity.generate()
    for ttl_s in (100.0, 50.0, 300.0, 200.0):
        dht.handle_store(
            sign_record(
                Identity.generate(), owner.digest, b"x" * 1000, now_s=clock.wall(), ttl_s=ttl_s
            )
        )
    with pytest.raises(ProtocolError, match="fill its 4096 bytes"):
        dht.handle_store(
            sign_record(Identity.generate(), owner.digest, b"y" * 100, now_s=clock.wall(), ttl_s=60)
        )
    mine = sign_record(owner, owner.digest, b"m" * 1024, now_s=clock.wall(), ttl_s=60)
    dht.handle_store(mine)  # (under its own id: in place of those nearest expiry)
    kept = dht.local_records(owner.digest)
    assert mine in kept
    assert sum(len(r.value) for r in kept) <= 4096
    assert sorted(r.expires_at_s - r.published_at_s for r in kept if r != mine) == [
        100.0,
        200.0,
        300.0,
    ]  # (the one nearest expiry made room)
    assert dht._key_bytes[owner.digest] == 4024


def test_a_store_refused_for_want_of_room_evicts_nothing() -> None:
    clock = FakeClock()
    limits = LimitsConfig(max_records_per_key=2, max_records_per_publisher=1)
    dht = lone_dht(clock, EndlessSybilsTransport(clock), limits=limits)
    owner = Identity.generate()
    dht.handle_store(sign_record(owner, b"\2" * 32, b"elsewhere", now_s=clock.wall(), ttl_s=60))
    for _ in range(2):
        dht.handle_store(
            sign_record(Identity.generate(), owner.digest, b"x", now_s=clock.wall(), ttl_s=60)
        )
    with pytest.raises(ProtocolError, match="of this publisher"):
        dht.handle_store(sign_record(owner, owner.digest, b"me", now_s=clock.wall(), ttl_s=60))
    assert len(dht.local_records(owner.digest)) == 2


class HangingTransport(EndlessSybilsTransport):
    """Requests that never answer; counts those running."""

    num_running = 0

    async def find_node(
        self, peer_id: str, target: bytes, known_filter: bytes = b""
    ) -> list[net_pb2.SignedPeerRecord]:
        self.num_running += 1
        try:
            await asyncio.Event().wait()
        finally:
            self.num_running -= 1
        return []


def test_a_cancelled_lookup_leaves_no_request_running() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        transport = HangingTransport(clock)
        dht = lone_dht(clock, transport)
        for record in await EndlessSybilsTransport(clock).find_node("", b""):
            dht.learn(record)
        lookup = asyncio.ensure_future(dht.lookup(b"\3" * 32))
        await asyncio.sleep(0.05)
        assert transport.num_running == CONFIG.parallelism
        lookup.cancel()
        with pytest.raises(asyncio.CancelledError):
            await lookup
        assert transport.num_running == 0

    asyncio.run(scenario())


def test_a_record_sent_as_its_own_by_another_peer_is_not_taken_as_contact_with_that_peer() -> None:
    # A peer answered with a sybil's record as its "responder": this node took the sybil for
    # a peer it had spoken to (the "last seen" shown, and the rank a full directory keeps).
    clock = FakeClock()
    dht = lone_dht(clock, EndlessSybilsTransport(clock))
    spoken_to, sybil = Identity.generate(), Identity.generate()
    value = net_pb2.PeerRecordValue(addresses=["10.0.0.1:1"])
    dht.learn(
        sign_peer_record(sybil, value, now_s=clock.wall(), ttl_s=60.0),
        contacted=spoken_to.peer_id,
    )
    assert sybil.peer_id in dht.directory
    assert sybil.peer_id not in dht.directory.last_contact_wall_s
    dht.learn(
        sign_peer_record(spoken_to, value, now_s=clock.wall(), ttl_s=60.0),
        contacted=spoken_to.peer_id,
    )
    assert spoken_to.peer_id in dht.directory.last_contact_wall_s


class DeadPeersTransport(EndlessSybilsTransport):
    """Every request fails: no peer answers."""

    async def find_node(
        self, peer_id: str, target: bytes, known_filter: bytes = b""
    ) -> list[net_pb2.SignedPeerRecord]:
        self.num_requests += 1
        raise PeerUnavailableError(f"{peer_id[:8]} never answers")


def _ghost_record(ghost: Identity, now_s: float, ttl_s: float) -> net_pb2.SignedPeerRecord:
    value = net_pb2.PeerRecordValue(addresses=["10.255.255.1:9"])
    return sign_peer_record(ghost, value, now_s=now_s, ttl_s=ttl_s)


def test_the_directory_holds_a_record_at_most_max_stored_ttl_s_after_it_was_signed() -> None:
    """A record claiming a week of life (MAX_RECORD_TTL_S) kept a peer that never answered in
    every directory, and dialed, for the week; the store keeps records max_stored_ttl_s."""
    clock = FakeClock()
    limits = LimitsConfig(max_stored_ttl_s=3600.0)
    dht = lone_dht(clock, DeadPeersTransport(clock), limits=limits)
    ghost = Identity.generate()
    dht.learn(_ghost_record(ghost, clock.wall(), MAX_RECORD_TTL_S))
    record = dht.directory.get(ghost.peer_id)
    assert record is not None
    assert record.expires_at_s == clock.wall() + 3600.0
    clock.advance(3600.0)
    dht.expire()
    assert ghost.peer_id not in dht.directory
    assert ghost.peer_id not in dht.routing
    # One signed longer ago than that is not taken in at all, whatever it claims.
    old = _ghost_record(ghost, clock.wall() - 3601.0, MAX_RECORD_TTL_S)
    dht.learn(old)
    assert ghost.peer_id not in dht.directory


def test_a_node_with_a_small_store_limit_still_holds_peer_records_for_the_default_hour() -> None:
    """A peer's republish interval is checked against its own limits.max_stored_ttl_s: a
    node whose limit was 600 s dropped the record of a peer republishing every 1,200 s for
    half of every interval, and could not dial it then."""
    clock = FakeClock()
    dht = lone_dht(clock, DeadPeersTransport(clock), limits=LimitsConfig(max_stored_ttl_s=600.0))
    peer = Identity.generate()
    dht.learn(_ghost_record(peer, clock.wall(), 14_400.0))
    record = dht.directory.get(peer.peer_id)
    assert record is not None
    assert record.expires_at_s == clock.wall() + LimitsConfig().max_stored_ttl_s


def test_a_peer_that_failed_is_put_back_in_routing_only_by_news_of_it() -> None:
    """A lookup's failure took a peer that never answered out of routing, and the next gossip
    of the same record put it back: it was dialed at every refresh."""
    clock = FakeClock()
    transport = DeadPeersTransport(clock)
    dht = lone_dht(clock, transport)
    ghost = Identity.generate()
    record = _ghost_record(ghost, clock.wall(), 60.0)
    dht.learn(record)
    assert ghost.peer_id in dht.routing
    asyncio.run(dht.refresh())
    assert transport.num_requests == 1
    assert ghost.peer_id not in dht.routing
    gossiper = Identity.generate().peer_id
    dht.learn(record, source=gossiper)  # the same record, gossiped again
    assert ghost.peer_id not in dht.routing
    asyncio.run(dht.refresh())
    assert transport.num_requests == 1  # not dialed again
    clock.advance(1.0)
    dht.learn(_ghost_record(ghost, clock.wall(), 60.0), source=gossiper)  # renewed: news
    assert ghost.peer_id in dht.routing
    asyncio.run(dht.refresh())
    assert ghost.peer_id not in dht.routing
    held = dht.directory.get(ghost.peer_id)
    assert held is not None
    dht.learn(held.signed, contacted=ghost.peer_id)  # it spoke to this node
    assert ghost.peer_id in dht.routing  # back, with the same record
