"""In-memory doubles for the network layer's unit tests (no sockets)."""

from __future__ import annotations

from gossamer.core.clock import FakeClock
from gossamer.core.errors import PeerUnavailableError
from gossamer.net.config import DhtConfig, LimitsConfig
from gossamer.net.counters import NetCounters
from gossamer.net.dht import Dht
from gossamer.net.directory import PeerDirectory
from gossamer.net.identity import Identity
from gossamer.net.records import sign_peer_record
from gossamer.proto import net_pb2


class FakeDhtNetwork:
    """Many DHT nodes wired together in memory; nodes can be killed."""

    def __init__(self, clock: FakeClock, config: DhtConfig) -> None:
        self.clock = clock
        self.config = config
        self.nodes: dict[str, Dht] = {}
        self.dead: set[str] = set()
        self.num_requests = 0

    def add_node(self) -> Dht:
        identity = Identity.generate()
        counters = NetCounters()
        limits = LimitsConfig()
        directory = PeerDirectory(
            identity.peer_id,
            self.clock,
            counters,
            max_value_bytes=limits.max_record_value_bytes,
            max_peers=10_000,
        )
        dht = Dht(
            identity,
            self.config,
            limits,
            self.clock,
            counters,
            directory,
            FakeDhtTransport(self, identity.peer_id),
        )
        record = sign_peer_record(
            identity,
            net_pb2.PeerRecordValue(addresses=[f"{identity.peer_id[:8]}.mem:1"]),
            now_s=self.clock.wall(),
            ttl_s=self.config.record_ttl_s,
        )
        dht.own_record = lambda: record
        self.nodes[identity.peer_id] = dht
        return dht

    def renew(self, dht: Dht) -> None:
        record = sign_peer_record(
            dht.identity,
            net_pb2.PeerRecordValue(addresses=["x.mem:1"]),
            now_s=self.clock.wall(),
            ttl_s=self.config.record_ttl_s,
        )
        dht.own_record = lambda: record

    def reach(self, caller: str, peer_id: str) -> Dht:
        self.num_requests += 1
        if peer_id in self.dead or peer_id not in self.nodes:
            raise PeerUnavailableError(f"{peer_id[:8]} is down")
        target = self.nodes[peer_id]
        caller_dht = self.nodes[caller]
        target.learn(caller_dht.own_record(), contacted=caller)
        caller_dht.learn(target.own_record(), contacted=peer_id)
        return target


class FakeDhtTransport:
    """A DhtTransport that calls the other node's handlers directly."""

    def __init__(self, network: FakeDhtNetwork, own: str) -> None:
        self.network = network
        self.own = own

    async def find_node(
        self, peer_id: str, target: bytes, known_filter: bytes = b""
    ) -> list[net_pb2.SignedPeerRecord]:
        remote = self.network.reach(self.own, peer_id)
        found = remote.handle_find_node(self.own, target)
        for record in remote.gossip_records(exclude=self.own, known_filter=known_filter):
            self.network.nodes[self.own].learn(record)
        return found

    async def find_value(
        self, peer_id: str, key: bytes
    ) -> tuple[list[net_pb2.SignedRecord], list[net_pb2.SignedPeerRecord]]:
        return self.network.reach(self.own, peer_id).handle_find_value(self.own, key)

    async def store(self, peer_id: str, record: net_pb2.SignedRecord) -> bool:
        return self.network.reach(self.own, peer_id).handle_store(record, sender=self.own)
