"""What one peer can make a DHT node hold or do: the store's totals and shares, the lifetime of
stored records, the directory's budget per source and its eviction order, the cost of serving a
FindNode and of checking a get's records, and a re-published record after the clock stepped back.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossamer.core.clock import FakeClock
from gossamer.core.errors import ConfigError, PeerUnavailableError, ProtocolError
from gossamer.net import dht as dht_module
from gossamer.net.config import DhtConfig, LimitsConfig, NodeConfig
from gossamer.net.counters import NetCounters
from gossamer.net.dht import Dht
from gossamer.net.dht_service import RequestBudget
from gossamer.net.directory import RECENT_CONTACT_S, PeerDirectory
from gossamer.net.handshake import Session
from gossamer.net.identity import Identity
from gossamer.net.node import Node
from gossamer.net.records import (
    MAX_RECORD_TTL_S,
    MAX_TLS_CERT_BYTES,
    parse_peer_record,
    sign_peer_record,
    sign_record,
)
from gossamer.proto import net_pb2
from net_fakes import FakeDhtNetwork

CONFIG = DhtConfig(bucket_size=8, parallelism=3, record_ttl_s=30.0, republish_interval_s=10.0)


def _lone_dht(clock: FakeClock, limits: LimitsConfig | None = None) -> Dht:
    limits = limits or LimitsConfig()
    identity = Identity.generate()
    directory = PeerDirectory(
        identity.peer_id, clock, NetCounters(), max_value_bytes=16384, max_peers=10_000
    )
    return Dht(identity, CONFIG, limits, clock, NetCounters(), directory, _NoTransport())


class _NoTransport:
    """A node alone: every request fails."""

    async def find_node(
        self, peer_id: str, target: bytes, known_filter: bytes = b""
    ) -> list[net_pb2.SignedPeerRecord]:
        raise PeerUnavailableError("alone")

    async def find_value(
        self, peer_id: str, key: bytes
    ) -> tuple[list[net_pb2.SignedRecord], list[net_pb2.SignedPeerRecord]]:
        raise PeerUnavailableError("alone")

    async def store(self, peer_id: str, record: net_pb2.SignedRecord) -> bool:
        raise PeerUnavailableError("alone")


def _record(
    clock: FakeClock, identity: Identity, name: str, value: bytes = b"v", ttl_s: float = 60.0
) -> net_pb2.SignedRecord:
    key = hashlib.sha256(name.encode()).digest()
    return sign_record(identity, key, value, now_s=clock.wall(), ttl_s=ttl_s)


def _peer_record(identity: Identity, now_s: float, ttl_s: float = 60.0) -> net_pb2.SignedPeerRecord:
    value = net_pb2.PeerRecordValue(addresses=["10.0.0.1:1"])
    return sign_peer_record(identity, value, now_s=now_s, ttl_s=ttl_s)


# ---- the store ----------------------------------------------------------------------------


def test_one_sender_cannot_fill_the_store_with_throwaway_publishers() -> None:
    """The per-publisher share counted publisher keys, which cost nothing: one authenticated
    peer stored 100,000 records of as many keys (1.7 GB) and every other record was refused."""
    clock = FakeClock()
    dht = _lone_dht(clock, LimitsConfig(max_stored_records=100, max_records_per_publisher=4))
    for i in range(4):
        dht.handle_store(_record(clock, Identity.generate(), f"k{i}"), sender="mallory")
    with pytest.raises(ProtocolError, match="sent by this peer"):
        dht.handle_store(_record(clock, Identity.generate(), "k9"), sender="mallory")
    honest = Identity.generate()
    assert dht.handle_store(_record(clock, honest, "mine"), sender=honest.peer_id)


def test_a_full_store_refuses_the_peer_holding_most_and_keeps_room_for_others() -> None:
    clock = FakeClock()
    limits = LimitsConfig(max_record_value_bytes=1000, max_key_bytes=4096, max_stored_bytes=8192)
    dht = _lone_dht(clock, limits)
    big = b"x" * 1000  # 1,256 bytes counted each: six fit in 8 KiB
    for i in range(6):
        dht.handle_store(_record(clock, Identity.generate(), f"m{i}", big), sender="mallory")
    # Mallory's seventh takes the place of its first: it cannot grow past the others.
    assert dht.handle_store(_record(clock, Identity.generate(), "m6", big), sender="mallory")
    assert dht.local_records(hashlib.sha256(b"m0").digest()) == []
    honest = Identity.generate()
    entry = _record(clock, honest, "round 7", big)
    assert dht.handle_store(entry, sender=honest.peer_id)  # in place of mallory's oldest
    assert dht.local_records(entry.key) == [entry]
    assert dht.local_records(hashlib.sha256(b"m1").digest()) == []
    assert dht._stored_bytes <= 8192
    assert dht._num_stored == 6
    # This node's own records are never refused for want of room.
    mine = _record(clock, dht.identity, "mine", big)
    assert asyncio.run(dht.store_on_closest(mine, closest=[])) == 0
    assert dht.local_records(mine.key) == [mine]


def test_a_busy_peer_among_many_holding_a_little_less_is_never_refused() -> None:
    # Refused while it held the most: identities that cost nothing, each holding a little
    # less than an honest peer, had every new round entry of it refused (and peers holding
    # equal shares were all refused).
    clock = FakeClock()
    dht = _lone_dht(clock, LimitsConfig(max_stored_records=200, max_records_per_publisher=50))
    honest = Identity.generate()
    for r in range(40):
        dht.handle_store(_record(clock, honest, f"round {r}"), sender=honest.peer_id)
    for n in range(8):
        others = Identity.generate()
        for j in range(20):
            dht.handle_store(_record(clock, others, f"{n}/{j}"), sender=others.peer_id)
    newest = _record(clock, honest, "round 40")
    assert dht.handle_store(newest, sender=honest.peer_id)
    assert dht.local_records(newest.key) == [newest]
    assert dht._num_stored <= 200


def test_records_stored_for_others_live_at_most_max_stored_ttl_s() -> None:
    clock = FakeClock()
    dht = _lone_dht(clock, LimitsConfig(max_stored_ttl_s=3600.0))
    theirs = _record(clock, Identity.generate(), "theirs", ttl_s=MAX_RECORD_TTL_S)
    dht.handle_store(theirs)
    mine = _record(clock, dht.identity, "mine", ttl_s=7200.0)
    asyncio.run(dht.store_on_closest(mine, closest=[]))
    clock.advance(3599.0)
    assert dht.local_records(theirs.key) == [theirs]
    clock.advance(2.0)
    assert dht.local_records(theirs.key) == []
    assert dht.local_records(mine.key) == [mine]
    dht.expire()
    assert dht._num_stored == 1


def test_a_republish_slower_than_others_keep_records_is_refused() -> None:
    # Records renewed every 2 h were dropped by every other node after 1 h.
    with pytest.raises(ConfigError, match=r"dht.republish_interval_s: must be below limits"):
        NodeConfig(dht=DhtConfig(record_ttl_s=9000.0, republish_interval_s=7200.0))
    NodeConfig(dht=DhtConfig(record_ttl_s=9000.0, republish_interval_s=3000.0))


def test_store_limits_are_checked_when_the_config_is_made() -> None:
    with pytest.raises(ValueError, match="max_stored_bytes"):
        LimitsConfig(max_stored_bytes=1000)
    with pytest.raises(ValueError, match="max_stored_ttl_s"):
        LimitsConfig(max_stored_ttl_s=1.0)
    with pytest.raises(ValueError, match="requests_per_s_per_peer"):
        DhtConfig(requests_per_s_per_peer=0.0)


# ---- a clock that steps back ----------------------------------------------------------------


class SteppedClock(FakeClock):
    """A fake clock whose wall time can be set back (an NTP correction)."""

    step_s = 0.0

    def wall(self) -> float:
        return super().wall() + self.step_s


async def _publisher_and_reader(clock: FakeClock) -> tuple[Dht, Dht]:
    """Two of six DHT nodes that know each other, on ``clock``."""
    network = FakeDhtNetwork(clock, CONFIG)
    nodes = [network.add_node() for _ in range(6)]
    for node in nodes[1:]:
        node.learn(nodes[0].own_record())
        await node.lookup(node.identity.digest)
    return nodes[1], nodes[-1]


def test_a_value_put_after_the_clock_stepped_back_replaces_the_older_one_everywhere() -> None:
    """The new record, signed at the earlier time, was dropped by every store, the publisher's
    own included, and the put still counted them as having taken it."""

    async def scenario() -> None:
        clock = SteppedClock()
        publisher, reader = await _publisher_and_reader(clock)
        key = hashlib.sha256(b"membership").digest()
        assert await publisher.put(key, b"active") >= 1
        clock.step_s = -30.0
        assert await publisher.put(key, b"left") >= 1
        assert [r.value for r in await reader.get(key)] == [b"left"]
        assert [r.value for r in publisher.local_records(key)] == [b"left"]

    asyncio.run(scenario())


def test_a_nodes_own_record_signed_after_the_clock_stepped_back_is_still_the_newer() -> None:
    # A record with new addresses (or a renewal) signed at the earlier time was dropped by
    # every directory holding the one before, until the clock caught up.
    clock = SteppedClock()
    node = Node(NodeConfig(), clock=clock)
    first = node.sign_own_record()
    clock.step_s = -30.0
    second = node.sign_own_record()
    assert second.record.published_at_s > first.record.published_at_s
    directory = PeerDirectory(
        "observer", clock, NetCounters(), max_value_bytes=16384, max_peers=100
    )
    directory.learn(first)
    learned = directory.learn(second)
    assert learned is not None
    assert learned.published_at_s == second.record.published_at_s


def test_after_a_fast_clock_is_set_back_records_are_signed_at_the_true_time() -> None:
    # A clock an hour fast (a VM resumed, a wrong RTC at boot) corrected by NTP: signed after
    # the records of the fast hour, every new record was an hour ahead too, refused by every
    # peer (and a put raised on this node's own store) for as long as the clock had been off.
    async def scenario() -> None:
        clock = SteppedClock()
        publisher, reader = await _publisher_and_reader(clock)
        publisher.clock = own_clock = SteppedClock()  # (the others' clocks are right)
        key = hashlib.sha256(b"membership").digest()
        own_clock.step_s = 3600.0
        assert await publisher.put(key, b"fast") == 0  # refused: an hour ahead of the others
        own_clock.step_s = 0.0
        assert await publisher.put(key, b"true") >= 1
        assert [r.value for r in await reader.get(key)] == [b"true"]
        assert [r.value for r in publisher.local_records(key)] == [b"true"]

    asyncio.run(scenario())
    clock = SteppedClock()
    node = Node(NodeConfig(), clock=clock)
    clock.step_s = 3600.0
    node.sign_own_record()
    clock.step_s = 0.0
    assert node.sign_own_record().record.published_at_s == clock.wall()


def test_a_store_keeping_a_newer_record_says_it_did_not_store_the_older_one() -> None:
    clock = FakeClock()
    dht = _lone_dht(clock)
    publisher = Identity.generate()
    older = _record(clock, publisher, "k", b"old")
    clock.advance(1.0)
    newer = _record(clock, publisher, "k", b"new")
    assert dht.handle_store(newer) is True
    assert dht.handle_store(newer) is True  # (the same record again: held)
    assert dht.handle_store(older) is False
    assert dht.local_records(newer.key) == [newer]


# ---- the directory ---------------------------------------------------------------------------


def test_a_full_directory_keeps_the_peers_it_speaks_to_over_records_learned_after() -> None:
    # Records learned after this node last spoke to its live peers sat behind them in the
    # eviction order, and a full directory evicted the live peers for them (63 of 100 kept).
    clock = FakeClock()
    directory = PeerDirectory("me", clock, NetCounters(), max_value_bytes=16384, max_peers=300)
    live = [Identity.generate() for _ in range(100)]
    for identity in live:
        directory.learn(_peer_record(identity, clock.wall(), ttl_s=3600.0))
        directory.contacted(identity.peer_id)
    clock.advance(1.0)
    learned = [Identity.generate() for _ in range(400)]
    for n, identity in enumerate(learned):
        directory.learn(_peer_record(identity, clock.wall(), ttl_s=3600.0), source=f"s{n % 4}")
    assert all(identity.peer_id in directory for identity in live)
    assert len(directory) == 300
    # One exchange long ago keeps no record for ever (a throwaway identity's handshake).
    clock.advance(RECENT_CONTACT_S + 1.0)
    for n, identity in enumerate(Identity.generate() for _ in range(100)):
        directory.learn(_peer_record(identity, clock.wall(), ttl_s=3600.0), source=f"t{n % 4}")
    assert not any(identity.peer_id in directory for identity in live)


def test_records_a_handshake_carries_of_other_peers_count_against_its_budget() -> None:
    # Learned with no source, a handshake could bring any number of throwaway identities'
    # records into the directory past the per-source budget.
    node = Node(NodeConfig(dht=DhtConfig(max_new_peers_per_source=2)))
    caller = Identity.generate()
    session = Session(caller.peer_id, caller.public_key, 0.0)
    own = _peer_record(caller, node.clock.wall())
    node._on_session(session, own)
    assert caller.peer_id in node.directory
    others = [Identity.generate() for _ in range(5)]
    for identity in others:
        node._on_session(session, _peer_record(identity, node.clock.wall()))
    assert sum(identity.peer_id in node.directory for identity in others) == 2


def test_one_source_adds_a_bounded_number_of_new_peers_per_interval() -> None:
    clock = FakeClock()
    directory = PeerDirectory(
        "me",
        clock,
        NetCounters(),
        max_value_bytes=16384,
        max_peers=1000,
        max_new_peers_per_source=5,
        new_peers_interval_s=60.0,
    )
    first = [Identity.generate() for _ in range(10)]
    for identity in first:
        directory.learn(_peer_record(identity, clock.wall()), source="gossiper")
    assert sum(i.peer_id in directory for i in first) == 5
    assert directory.num_refused_new == 5
    # Its own record, renewals of known peers and other sources are not held back.
    gossiper = Identity.generate()
    assert directory.learn(_peer_record(gossiper, clock.wall()), source=gossiper.peer_id)
    clock.advance(1.0)
    known = [i for i in first if i.peer_id in directory]
    for identity in known:
        assert directory.learn(_peer_record(identity, clock.wall()), source="gossiper")
    assert directory.learn(_peer_record(first[-1], clock.wall()), source="another")
    clock.advance(60.0)
    directory.learn(_peer_record(first[-2], clock.wall()), source="gossiper")
    assert first[-2].peer_id in directory


def test_a_record_claiming_a_later_signing_time_does_not_outrank_a_later_renewal() -> None:
    """A full directory evicted the record signed longest ago by the time it claims: records
    minted "now" (or up to two minutes ahead) pushed out every live peer learned through
    gossip, whose renewals were signed seconds before they arrived."""
    clock = FakeClock()
    directory = PeerDirectory("me", clock, NetCounters(), max_value_bytes=16384, max_peers=10)
    minted = [Identity.generate() for _ in range(5)]
    honest = [Identity.generate() for _ in range(5)]
    for identity in minted:
        directory.learn(_peer_record(identity, clock.wall() + 100.0))
    for identity in honest:
        directory.learn(_peer_record(identity, clock.wall() - 20.0))
    clock.advance(10.0)
    for identity in honest:  # renewals, signed a few seconds before they came
        directory.learn(_peer_record(identity, clock.wall() - 5.0))
    for _ in range(5):
        directory.learn(_peer_record(Identity.generate(), clock.wall()))
    assert all(i.peer_id in directory for i in honest)
    assert not any(i.peer_id in directory for i in minted)


def test_serving_a_find_node_does_not_walk_the_directory() -> None:
    """A FindNode listed, expired and sorted the whole directory (2.3 ms at 10,000 peers): a
    flood of them kept the node from answering heartbeats."""
    clock = FakeClock()
    dht = _lone_dht(clock)
    identities = [Identity.generate() for _ in range(300)]
    for identity in identities:
        dht.learn(_peer_record(identity, clock.wall()))

    def walked() -> None:
        raise AssertionError("the whole directory was walked")

    dht.directory.records = walked  # type: ignore[assignment,method-assign]
    dht.directory.expire = walked  # type: ignore[assignment,method-assign]
    closest = dht.handle_find_node("someone", b"\7" * 32)
    gossip = dht.gossip_records(exclude=identities[-1].peer_id)
    assert len(closest) == CONFIG.bucket_size
    assert len(gossip) == CONFIG.bucket_size
    ids = [dht_module._peer_id_of(r) for r in gossip]
    assert len(set(ids)) == len(ids)
    assert identities[-1].peer_id not in ids
    # The newest half: the records that reached this node last.
    assert set(ids[: CONFIG.bucket_size // 2]) == {i.peer_id for i in identities[-5:-1]}


def test_a_peer_record_with_an_oversized_certificate_is_refused() -> None:
    identity = Identity.generate()
    normal = net_pb2.PeerRecordValue(addresses=["10.0.0.1:1"], tls_cert_der=b"c" * 354)
    signed = sign_peer_record(identity, normal, now_s=1e9, ttl_s=60)
    assert parse_peer_record(signed, now_s=1e9, max_value_bytes=16384).peer_id
    big = net_pb2.PeerRecordValue(tls_cert_der=b"c" * (MAX_TLS_CERT_BYTES + 1))
    signed = sign_peer_record(identity, big, now_s=1e9, ttl_s=60)
    with pytest.raises(ProtocolError, match="certificate"):
        parse_peer_record(signed, now_s=1e9, max_value_bytes=16384)
    long_address = ".".join(["a" * 60] * 3) + ":1"  # (185 characters: each part allowed)
    huge = net_pb2.PeerRecordValue(addresses=[long_address] * 16, tls_cert_der=b"c" * 2000)
    huge.capabilities.gpu_names.extend(["g" * 250] * 16)
    signed = sign_peer_record(identity, huge, now_s=1e9, ttl_s=60)
    with pytest.raises(ProtocolError, match="value of"):
        parse_peer_record(signed, now_s=1e9, max_value_bytes=16384)


# ---- requests per peer -------------------------------------------------------------------------


def test_the_request_budget_allows_a_burst_then_the_rate() -> None:
    clock = FakeClock()
    budget = RequestBudget(rate_per_s=10.0, burst=5, clock=clock, max_peers=2)
    assert [budget.take("a") for _ in range(6)] == [True] * 5 + [False]
    assert budget.take("b")  # another peer has its own
    clock.advance(0.1)
    assert budget.take("a")
    assert not budget.take("a")
    clock.advance(100.0)
    assert sum(budget.take("a") for _ in range(10)) == 5  # (no more than the burst saved up)
    budget.take("c")
    assert len(budget._buckets) == 2


# ---- a get's checks ---------------------------------------------------------------------------


def test_a_get_checks_each_record_once_and_lets_the_loop_run_while_checking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every replica's answer was checked whole, a signature per record: 1,024 records from 6
    replicas held the event loop 228 ms."""

    async def scenario() -> None:
        clock = FakeClock()
        network = FakeDhtNetwork(clock, CONFIG)
        nodes = [network.add_node() for _ in range(6)]
        for node in nodes[1:]:
            node.learn(nodes[0].own_record())
            await node.lookup(node.identity.digest)
        key = hashlib.sha256(b"round").digest()
        records = [
            sign_record(Identity.generate(), key, b"e", now_s=clock.wall(), ttl_s=60)
            for _ in range(200)
        ]
        reader = nodes[-1]
        for node in nodes[:-1]:
            for record in records:
                node.handle_store(record)
        num_checks = 0
        check_record = dht_module.check_record

        def counted(record: net_pb2.SignedRecord, **kwargs: float) -> str:
            nonlocal num_checks
            num_checks += 1
            return check_record(record, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(dht_module, "check_record", counted)
        seen_between: list[int] = []
        done = False

        async def watch() -> None:
            while not done:
                if num_checks % len(records) > 0:
                    seen_between.append(num_checks)
                await asyncio.sleep(0)

        watcher = asyncio.ensure_future(watch())
        found = await reader.get(key)
        done = True
        await watcher
        assert len(found) == len(records)
        assert num_checks == len(records)
        assert seen_between, "the loop never ran while a replica's answer was checked"

    asyncio.run(scenario())


class _ScriptedFindValue(_NoTransport):
    """FindValue answers by peer id, as scripted; every other request fails."""

    def __init__(self, answers: dict[str, list[net_pb2.SignedRecord]]) -> None:
        self.answers = answers

    async def find_value(
        self, peer_id: str, key: bytes
    ) -> tuple[list[net_pb2.SignedRecord], list[net_pb2.SignedPeerRecord]]:
        return self.answers[peer_id], []


def test_a_find_value_answer_with_more_bytes_than_a_key_holds_is_no_answer() -> None:
    """Only the number of records was bounded: one answer of validly signed records 8 times a
    key's bytes was taken in, and a get against 20 such peers grew by 243 MiB."""
    clock = FakeClock()
    limits = LimitsConfig(max_record_value_bytes=1000, max_key_bytes=4096, max_stored_bytes=8192)
    key = hashlib.sha256(b"round 7").digest()
    honest, hostile = Identity.generate(), Identity.generate()
    entry = sign_record(Identity.generate(), key, b"e" * 1000, now_s=clock.wall(), ttl_s=60)
    flood = [
        sign_record(Identity.generate(), key, b"x" * 1000, now_s=clock.wall(), ttl_s=60)
        for _ in range(8)
    ]
    dht = _lone_dht(clock, limits)
    dht.transport = _ScriptedFindValue({honest.peer_id: [entry], hostile.peer_id: flood})
    for identity in (honest, hostile):
        dht.learn(_peer_record(identity, clock.wall()), contacted=identity.peer_id)
    found = asyncio.run(dht.get(key))
    assert len(found) == 1
    assert found[0] == entry
    assert hostile.peer_id in dht.routing  # (no answer, not a failure: its limit may be larger)
    assert honest.peer_id in dht.routing
    assert dht.counters.num_protocol_errors >= 1


def test_a_lookup_keeps_one_copy_of_each_publisher_s_record_however_many_answer() -> None:
    """Every answer's copies were kept until the lookup ended: k replicas of a full key held
    k times its bytes."""

    async def scenario() -> None:
        clock = FakeClock()
        network = FakeDhtNetwork(clock, CONFIG)
        nodes = [network.add_node() for _ in range(6)]
        for node in nodes[1:]:
            node.learn(nodes[0].own_record())
            await node.lookup(node.identity.digest)
        key = hashlib.sha256(b"round").digest()
        publishers = [Identity.generate() for _ in range(20)]
        older = [sign_record(p, key, b"1", now_s=clock.wall(), ttl_s=60) for p in publishers]
        clock.advance(1.0)
        newer = [sign_record(p, key, b"2", now_s=clock.wall(), ttl_s=60) for p in publishers]
        reader = nodes[-1]
        for index, node in enumerate(nodes[:-1]):
            for record in newer if index % 2 else older:
                node.handle_store(record)
        _, found = await reader._iterate(key, want_value=True)
        assert sorted(bytes(r.signature) for _, r in found) == sorted(
            bytes(r.signature) for r in newer
        )
        assert {r.value for r in await reader.get(key)} == {b"2"}

    asyncio.run(scenario())


def test_a_replicated_read_still_tells_the_publisher_s_own_answer_apart() -> None:
    # One copy per publisher is kept while iterating, but the publisher's own answer (newer,
    # not yet copied) and the replicas' (older) are kept apart: a replicated read counts the
    # older one.
    async def scenario() -> None:
        clock = FakeClock()
        network = FakeDhtNetwork(clock, CONFIG)
        nodes = [network.add_node() for _ in range(5)]
        for node in nodes[1:]:
            node.learn(nodes[0].own_record())
            await node.lookup(node.identity.digest)
        publisher, reader = nodes[0], nodes[-1]
        await reader.lookup(publisher.identity.digest)
        key = hashlib.sha256(b"entry").digest()
        old = sign_record(publisher.identity, key, b"old", now_s=clock.wall(), ttl_s=60)
        for node in nodes[:-1]:
            node.handle_store(old)
        clock.advance(1.0)
        new = sign_record(publisher.identity, key, b"new", now_s=clock.wall(), ttl_s=60)
        publisher.handle_store(new, own=True)  # not copied yet
        assert [r.value for r in await reader.get(key)] == [b"new"]
        assert [r.value for r in await reader.get(key, replicated_only=True)] == [b"old"]

    asyncio.run(scenario())


# ---- a full store's choice of who gives way -----------------------------------------------


class _CountingDict(dict[str, dict[tuple[bytes, str], None]]):
    """A dict that counts the keys iterated over."""

    num_iterated = 0

    def __iter__(self) -> Iterator[str]:
        for key in super().__iter__():
            self.num_iterated += 1
            yield key


def test_a_store_into_a_full_store_does_not_look_at_every_sender() -> None:
    """The peer holding the most was found by a scan of every sender: 26 ms a Store with
    100,000 of them, and 40 Stores a second, within one peer's budget, held the event loop."""
    clock = FakeClock()
    num_senders = 2000
    dht = _lone_dht(clock, LimitsConfig(max_stored_records=num_senders))
    for i in range(num_senders):
        dht.handle_store(_record(clock, Identity.generate(), f"k{i}"), sender=f"sender-{i}")
    counting = _CountingDict(dht._by_sender)
    dht._by_sender = counting
    for j in range(20):
        newcomer = Identity.generate()
        assert dht.handle_store(_record(clock, newcomer, f"new {j}"), sender=newcomer.peer_id)
        # the one holding the most (all hold one: the one holding it longest) gave way
        assert dht.local_records(hashlib.sha256(f"k{j}".encode()).digest()) == []
        assert dht.local_records(hashlib.sha256(f"k{j + 1}".encode()).digest()) != []
    assert counting.num_iterated == 0
    assert dht._num_stored == num_senders


def test_a_full_store_takes_room_from_the_sender_holding_the_most() -> None:
    clock = FakeClock()
    dht = _lone_dht(clock, LimitsConfig(max_stored_records=30, max_records_per_publisher=20))
    held = {"a": 5, "b": 12, "c": 8, "d": 5}
    for sender, count in held.items():
        for i in range(count):
            dht.handle_store(_record(clock, Identity.generate(), f"{sender}{i}"), sender=sender)
    # b gives way until it holds what c holds (4); then, tied, the one holding longest (b),
    # and c
    for j in range(6):
        newcomer = Identity.generate()
        dht.handle_store(_record(clock, newcomer, f"new {j}"), sender=newcomer.peer_id)
    assert {s: len(dht._by_sender.get(s, ())) for s in held} == {"a": 5, "b": 7, "c": 7, "d": 5}
    # b's oldest went first
    assert dht.local_records(hashlib.sha256(b"b0").digest()) == []
    assert dht.local_records(hashlib.sha256(b"b11").digest()) != []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(-40, 40)), max_size=300))
def test_the_holdings_index_names_the_peer_holding_the_most(
    changes: list[tuple[int, int]],
) -> None:
    holdings = dht_module._Holdings()
    amounts: dict[str, int] = {}  # in the order peers came to hold something (max's tie-break)
    for index, delta in changes:
        peer = f"p{index}"
        holdings.add(peer, delta)
        amount = amounts.get(peer, 0) + delta
        if amount > 0:
            amounts[peer] = amount
        else:
            amounts.pop(peer, None)
        assert holdings.largest() == max(amounts, key=lambda p: amounts[p], default=None)
        assert len(holdings) == len(amounts)
        assert all(holdings[p] == a for p, a in amounts.items())
