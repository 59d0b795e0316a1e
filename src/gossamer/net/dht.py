"""Kademlia discovery: iterative lookups with parallel requests, signed records with expiry.

The DHT speaks through a :class:`DhtTransport` (gRPC in a node, an in-memory fake in unit tests).
Peers are known by their signed peer records, kept in the :class:`PeerDirectory`; the routing
table holds the ids of those records. Every request and answer carries the sender's own record, so
records spread as the DHT is used, and a record that is no longer renewed expires everywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import logging
import random
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gossamer.core.clock import Clock
from gossamer.core.errors import AuthenticationError, GossamerError, ProtocolError
from gossamer.net.config import DhtConfig, LimitsConfig
from gossamer.net.counters import NetCounters
from gossamer.net.directory import PeerDirectory
from gossamer.net.identity import (
    Identity,
    digest_of_peer_id,
    peer_id_of_public_key,
    short_peer_id,
)
from gossamer.net.peer_filter import PeerFilter
from gossamer.net.records import (
    RECORD_OVERHEAD_BYTES,
    PeerRecord,
    check_record,
    sign_record,
    signing_time_after,
)
from gossamer.net.routing import RoutingTable
from gossamer.proto import net_pb2

__all__ = ["Dht", "DhtTransport"]

_log = logging.getLogger(__name__)
_MAX_GOSSIP_SCAN = 1024
"""Records of the directory a FindNode's gossip tests against the requester's filter, at most."""
_CHECKS_PER_YIELD = 32
"""Records a lookup checks (a signature each, ~150 us) before it lets the event loop run."""


@dataclass(slots=True)
class _Held:
    """A record this node stores, with what the store counts of it."""

    record: net_pb2.SignedRecord
    sender: str
    """The authenticated peer that sent it (this node for its own)."""
    expires_at_s: float
    """When this node drops it: its own expiry, or ``max_stored_ttl_s`` after it came."""
    num_bytes: int
    """Its value and ``RECORD_OVERHEAD_BYTES``: what it counts against ``max_stored_bytes``."""


class _Holdings:
    """How much each peer holds, and the peer holding the most in O(log n) (amortized), ties
    to the one holding something longest: a max-heap with lazy deletion (an entry is stale once
    its peer's amount changed after it was pushed; stale entries are dropped as they surface,
    and the heap is rebuilt when they outnumber the live ones)."""

    def __init__(self) -> None:
        self._amounts: dict[str, int] = {}
        self._since: dict[str, int] = {}
        """When each peer came to hold something (a counter: the tie-break)."""
        self._heap: list[tuple[int, int, str]] = []
        """(-amount, since, peer), possibly stale."""
        self._num_arrived = 0

    def __getitem__(self, peer: str) -> int:
        return self._amounts.get(peer, 0)

    def __len__(self) -> int:
        return len(self._amounts)

    def add(self, peer: str, delta: int) -> None:
        """Change what ``peer`` holds by ``delta``; a peer left holding nothing is forgotten."""
        amount = self._amounts.get(peer, 0) + delta
        if amount <= 0:
            self._amounts.pop(peer, None)
            self._since.pop(peer, None)
            return
        if peer not in self._since:
            self._since[peer] = self._num_arrived
            self._num_arrived += 1
        self._amounts[peer] = amount
        heapq.heappush(self._heap, (-amount, self._since[peer], peer))
        if len(self._heap) > 2 * len(self._amounts) + 64:
            self._heap = [(-a, self._since[p], p) for p, a in self._amounts.items()]
            heapq.heapify(self._heap)

    def largest(self) -> str | None:
        """The peer holding the most (None if none holds anything)."""
        while self._heap:
            negative, since, peer = self._heap[0]
            if self._amounts.get(peer) == -negative and self._since.get(peer) == since:
                return peer
            heapq.heappop(self._heap)
        return None


class DhtTransport(Protocol):
    """How the DHT reaches another peer; errors are Gossamer errors."""

    async def find_node(
        self, peer_id: str, target: bytes, known_filter: bytes = b""
    ) -> list[net_pb2.SignedPeerRecord]:
        """Ask ``peer_id`` for the peers it knows nearest to ``target``.

        ``known_filter`` is a :class:`PeerFilter` of the records held here; the gossip that comes
        back with the answer (learned by the transport) favours records outside it.
        """
        ...

    async def find_value(
        self, peer_id: str, key: bytes
    ) -> tuple[list[net_pb2.SignedRecord], list[net_pb2.SignedPeerRecord]]:
        """Ask ``peer_id`` for records under ``key``, and the peers nearest to it."""
        ...

    async def store(self, peer_id: str, record: net_pb2.SignedRecord) -> bool:
        """Ask ``peer_id`` to store ``record``; whether it did."""
        ...


class Dht:
    """One node's part of the DHT.

    Args:
        identity: this node's identity (signs its records).
        config: bucket size, parallelism, lifetimes.
        limits: sizes accepted from the network.
        clock: time source.
        counters: where rejections are counted.
        directory: the peer directory this DHT fills.
        transport: how requests reach other peers.
    """

    def __init__(
        self,
        identity: Identity,
        config: DhtConfig,
        limits: LimitsConfig,
        clock: Clock,
        counters: NetCounters,
        directory: PeerDirectory,
        transport: DhtTransport,
    ) -> None:
        self.identity = identity
        self.config = config
        self.limits = limits
        self.clock = clock
        self.counters = counters
        self.directory = directory
        self.transport = transport
        self.routing = RoutingTable(identity.digest, config.bucket_size)
        self._store: dict[bytes, dict[str, _Held]] = {}
        self._num_stored = 0
        self._stored_bytes = 0
        """Bytes of every held record (``_Held.num_bytes``)."""
        self._key_bytes: Counter[bytes] = Counter()
        """Value bytes stored under each key."""
        self._num_by_publisher: Counter[str] = Counter()
        self._by_sender: dict[str, dict[tuple[bytes, str], None]] = {}
        """(key, publisher) of the records each peer sent, oldest first."""
        self._sender_bytes = _Holdings()
        """Bytes each peer other than this node sent (``_Held.num_bytes``), the most first."""
        self._sender_records = _Holdings()
        """Records each peer other than this node sent, the most first."""
        self._filter: tuple[float, int, bytes] | None = None
        """The last known-peer filter made: when, at which directory change, its bytes."""
        self._published: dict[bytes, bytes] = {}
        self._rng = random.Random()
        self.own_record: Callable[[], net_pb2.SignedPeerRecord | None] = lambda: None
        """This node's current peer record (set by the node)."""
        self._failed: dict[str, float] = {}
        """Peers taken out of routing for failing a request, with the signing time of their
        record then: only a newer record, or an exchange with the peer, puts one back (the
        same record gossiped again put a peer that never answered back at once)."""
        directory.on_removed = self.routing.remove
        directory.limit_new_peers(config.max_new_peers_per_source, config.new_peers_interval_s)
        # (at least the default: a peer's republish interval is checked against its own
        # limit, and a node with a smaller one left such a peer out of its directory half the
        # time, so it could not be dialed)
        directory.limit_lifetime(max(limits.max_stored_ttl_s, LimitsConfig().max_stored_ttl_s))

    @property
    def _short(self) -> str:
        return short_peer_id(self.identity.peer_id)

    # ---- learning about peers --------------------------------------------------------------

    def learn(
        self,
        signed: net_pb2.SignedPeerRecord | None,
        *,
        contacted: str | None = None,
        source: str | None = None,
    ) -> None:
        """Take in a peer record from the network (checked; bad ones are counted and dropped).

        Args:
            signed: the record.
            contacted: the peer this node just spoke to, that sent it as its own: marked
                contacted if the record is that peer's (one that names another peer, sent as
                its own, made this node take that one for a peer it had spoken to).
            source: the peer it came from (a lookup's answer, gossip): the new peers one
                source adds are bounded (:meth:`PeerDirectory.learn`). None for records this
                node asked for by id, or that came with a handshake.
        """
        if signed is None or not signed.HasField("record"):
            return
        record = self.directory.learn(signed, source=source if source is not None else contacted)
        if record is None:
            return
        spoke = contacted is not None and contacted == record.peer_id
        failed_with = self._failed.get(record.peer_id)
        if failed_with is not None and not spoke and record.published_at_s <= failed_with:
            return  # (the record it failed with: no news of the peer)
        self._failed.pop(record.peer_id, None)
        self.routing.add(record.peer_id, record.signed.record.key)
        if spoke:
            self.directory.contacted(record.peer_id)

    def peer_failed(self, peer_id: str) -> None:
        """A request to ``peer_id`` failed: take it out of the routing table until a newer
        record of it comes, or it speaks to this node."""
        self.routing.remove(peer_id)
        record = self.directory.get(peer_id)
        if record is not None:
            self._failed[peer_id] = record.published_at_s

    def _closest_records(self, target: bytes, exclude: str = "") -> list[net_pb2.SignedPeerRecord]:
        found = []
        for peer_id in self.routing.closest(target, self.config.bucket_size, frozenset({exclude})):
            record = self.directory.get(peer_id)
            if record is not None:
                found.append(record.signed)
        return found

    # ---- serving requests ------------------------------------------------------------------

    def handle_find_node(self, sender: str, target: bytes) -> list[net_pb2.SignedPeerRecord]:
        """The records of the peers nearest ``target`` that this node knows."""
        if len(target) != 32:
            raise ProtocolError(f"FindNode target has {len(target)} bytes, not 32")
        return self._closest_records(target, exclude=sender)

    def gossip_records(
        self, exclude: str = "", known_filter: bytes = b""
    ) -> list[net_pb2.SignedPeerRecord]:
        """Up to k records to spread: the most recently renewed half, and a random half.

        The random half is drawn first from the records the requester's ``known_filter`` (a
        :class:`PeerFilter`; empty for none) says it lacks, looking at no more than
        :data:`_MAX_GOSSIP_SCAN` records a request (in a random order): testing every record of a
        full directory against the filter took 130 ms per FindNode, and any peer may send them.

        Raises:
            ProtocolError: the filter is larger than the protocol allows.
        """
        known = PeerFilter.parse(known_filter)
        k = self.config.bucket_size
        if len(self.directory) <= k + 1:
            return [r.signed for r in self.directory.records() if r.peer_id != exclude][:k]
        # The newest by when they reached this node, not by the time they claim (records
        # minted "now" would be in every answer); both halves cost O(k), not O(directory).
        half = k // 2 or 1
        newest = self.directory.recently_renewed(half, exclude)
        chosen = {r.peer_id for r in newest} | {exclude}
        num_wanted = k - len(newest)
        drawn = self.directory.sample(
            _MAX_GOSSIP_SCAN if known is not None else num_wanted + half + 1, self._rng
        )
        rest = [r for r in drawn if r.peer_id not in chosen]
        if known is not None:  # the lacking first, each side still in random order
            lacking: list[PeerRecord] = []
            held: list[PeerRecord] = []
            for record in rest:
                (held if known.might_hold(record.signed.record.key) else lacking).append(record)
                if len(lacking) == num_wanted:
                    break
            rest = lacking + held
        return [r.signed for r in newest + rest[:num_wanted]]

    def handle_find_value(
        self, sender: str, key: bytes
    ) -> tuple[list[net_pb2.SignedRecord], list[net_pb2.SignedPeerRecord]]:
        """Records under ``key`` that are still valid, and the nearest peers."""
        if len(key) != 32:
            raise ProtocolError(f"FindValue key has {len(key)} bytes, not 32")
        return self.local_records(key), self._closest_records(key, exclude=sender)

    def handle_store(
        self, record: net_pb2.SignedRecord, *, own: bool = False, sender: str | None = None
    ) -> bool:
        """Keep a record for others, after checking it.

        Room is bounded four ways: records in all (``max_stored_records``) and their bytes
        (``max_stored_bytes``); per publisher and per sending peer
        (``max_records_per_publisher``: one peer cannot fill the store with its own keys, nor
        with throwaway ones); per key (``max_records_per_key`` publishers and
        ``max_key_bytes`` of values: what one answer to a lookup carries; a peer's record
        under its own id always fits, in place of those nearest expiry). When the store is
        full, the peer whose records take the most of it gives way: its oldest go, for a new
        record of its own or anyone else's (see :meth:`_room_for`). A record is
        kept at most ``max_stored_ttl_s``, whatever lifetime it claims.
        ``own``: this node's own record, stored before it goes out; bounded by what this node
        publishes, it is never refused for want of room (under a full key it too takes the
        place of those nearest expiry).

        Args:
            record: the record.
            own: whether it is this node's own.
            sender: the authenticated peer that sent it (its publisher if not given).

        Returns:
            True if the record is held now; False if this node already holds a newer record
            of its publisher under its key (a publisher's clock stepped back, say), and keeps
            that one.

        Raises:
            ProtocolError: malformed, oversized, expired, or no room.
            AuthenticationError: forged.
        """
        now_s = self.clock.wall()
        publisher = check_record(
            record, now_s=now_s, max_value_bytes=self.limits.max_record_value_bytes
        )
        sender = self.identity.peer_id if own else (sender or publisher)
        key = bytes(record.key)
        under_key = self._store.get(key, {})
        current = under_key.get(publisher)
        if current is not None and current.record.published_at_s >= record.published_at_s:
            return current.record.signature == record.signature
        if not self._fits(key, publisher, record):
            self._drop_expired(key)
            under_key = self._store.get(key, {})
            current = under_key.get(publisher)
        make_room = not self._fits(key, publisher, record)
        if make_room and not own and key != digest_of_peer_id(publisher):
            raise ProtocolError(
                "too many publishers under this key"
                if current is None and len(under_key) >= self.limits.max_records_per_key
                else f"the records under this key fill its {self.limits.max_key_bytes} bytes"
            )
        num_bytes = len(record.value) + RECORD_OVERHEAD_BYTES
        victims: list[tuple[bytes, str]] = []
        if not own:
            limit = self.limits.max_records_per_publisher
            if current is None and self._num_by_publisher[publisher] >= limit:
                raise ProtocolError(f"this node stores no more records of this publisher ({limit})")
            resent = current is not None and current.sender == sender
            if not resent and len(self._by_sender.get(sender, ())) >= limit:
                raise ProtocolError(f"this node stores no more records sent by this peer ({limit})")
            replaced_bytes = current.num_bytes if current is not None else 0
            victims = self._room_for(
                sender, (key, publisher), current is None, num_bytes - replaced_bytes
            )
        while make_room and self._store.get(key):
            # This node's own record, or a peer's under its own id: it comes first, in place of
            # those nearest expiry (never in place of the one it replaces).
            others = {p: h for p, h in self._store[key].items() if p != publisher}
            if not others:
                break
            self._forget(key, min(others, key=lambda p: others[p].expires_at_s))
            make_room = not self._fits(key, publisher, record)
        for victim_key, victim_publisher in victims:
            if victim_publisher in self._store.get(victim_key, {}):
                self._forget(victim_key, victim_publisher)
        if self._store.get(key, {}).get(publisher) is not None:
            self._forget(key, publisher)
        expires_at_s = record.expires_at_s
        if not own:
            expires_at_s = min(expires_at_s, now_s + self.limits.max_stored_ttl_s)
        self._store.setdefault(key, {})[publisher] = _Held(record, sender, expires_at_s, num_bytes)
        self._key_bytes[key] += len(record.value)
        self._num_stored += 1
        self._stored_bytes += num_bytes
        self._num_by_publisher[publisher] += 1
        self._by_sender.setdefault(sender, {})[(key, publisher)] = None
        if sender != self.identity.peer_id:  # (this node's own records never give way)
            self._sender_bytes.add(sender, num_bytes)
            self._sender_records.add(sender, 1)
        return True

    def _room_for(
        self, sender: str, replacing: tuple[bytes, str], adds_one: bool, extra_bytes: int
    ) -> list[tuple[bytes, str]]:
        """The records to drop so that ``sender``'s record fits the store's totals: the oldest
        of the peer holding the most (by bytes, or by records when only their number is full),
        ``sender``'s own where it holds as much as any (never this node's own records). A peer
        cannot grow past the others that way, and is never refused: its newest records take
        the place of its oldest (refused while it held the most, an honest peer whose
        identities-for-free neighbours each held a little less lost every new round entry;
        several holding equal shares were all refused).

        Raises:
            ProtocolError: the store is full of this node's own records, or of records larger
                than all the giving peer holds.
        """
        num_over = self._num_stored + adds_one - self.limits.max_stored_records
        bytes_over = self._stored_bytes + extra_bytes - self.limits.max_stored_bytes
        if num_over <= 0 and bytes_over <= 0:
            return []
        # (an index, not a scan of every sender: 26 ms a Store with 100,000 of them, and 40
        # Stores a second, within one peer's request rate, held the event loop)
        held = self._sender_bytes if bytes_over > 0 else self._sender_records
        top = held.largest()
        giver = (
            sender
            if sender in self._by_sender and (top is None or held[sender] >= held[top])
            else top
        )
        victims: list[tuple[bytes, str]] = []
        for key, publisher in self._by_sender.get(giver or "", {}):
            if num_over <= 0 and bytes_over <= 0:
                break
            if (key, publisher) == replacing:  # (already counted as replaced)
                continue
            victims.append((key, publisher))
            num_over -= 1
            bytes_over -= self._store[key][publisher].num_bytes
        if num_over > 0 or bytes_over > 0:
            raise ProtocolError("this node stores no more records: its store is full")
        return victims

    def _fits(self, key: bytes, publisher: str, record: net_pb2.SignedRecord) -> bool:
        """Whether ``record`` fits under ``key`` in place of what ``publisher`` has there: one
        more publisher within ``max_records_per_key``, its bytes within ``max_key_bytes`` (an
        answer to a lookup carries them all)."""
        under_key = self._store.get(key, {})
        current = under_key.get(publisher)
        if current is None and len(under_key) >= self.limits.max_records_per_key:
            return False
        replaced = len(current.record.value) if current is not None else 0
        return self._key_bytes[key] - replaced + len(record.value) <= self.limits.max_key_bytes

    def _forget(self, key: bytes, publisher: str) -> None:
        under_key = self._store[key]
        held = under_key.pop(publisher)
        self._key_bytes[key] -= len(held.record.value)
        self._num_stored -= 1
        self._stored_bytes -= held.num_bytes
        self._num_by_publisher[publisher] -= 1
        if not self._num_by_publisher[publisher]:
            del self._num_by_publisher[publisher]
        sent = self._by_sender[held.sender]
        del sent[(key, publisher)]
        if held.sender != self.identity.peer_id:
            self._sender_bytes.add(held.sender, -held.num_bytes)
            self._sender_records.add(held.sender, -1)
        if not sent:
            del self._by_sender[held.sender]
        if not under_key:
            del self._store[key], self._key_bytes[key]

    def local_records(self, key: bytes) -> list[net_pb2.SignedRecord]:
        """Valid records this node holds under ``key``."""
        self._drop_expired(key)
        return [held.record for held in self._store.get(bytes(key), {}).values()]

    def _drop_expired(self, key: bytes) -> None:
        under_key = self._store.get(bytes(key))
        if not under_key:
            return
        now = self.clock.wall()
        for publisher in [p for p, h in under_key.items() if h.expires_at_s <= now]:
            self._forget(bytes(key), publisher)

    def expire(self) -> None:
        """Drop expired stored records and expired peers."""
        for key in list(self._store):
            self._drop_expired(key)
        self.directory.expire()
        for peer_id in [p for p in self._failed if p not in self.directory]:
            del self._failed[peer_id]  # (its record expired: a new one is news)

    # ---- lookups ---------------------------------------------------------------------------

    async def lookup(self, target: bytes) -> list[str]:
        """Iterative FindNode: the k peers nearest ``target`` that answered, nearest first."""
        closest, _ = await self._iterate(target, want_value=False)
        return closest

    async def get(self, key: bytes, *, replicated_only: bool = False) -> list[net_pb2.SignedRecord]:
        """Every valid record under ``key`` found on the nearest peers (one per publisher).

        Args:
            key: the record key.
            replicated_only: leave out what a publisher answered about its own records; count
                only copies held by this node or by other peers. A put stores the record on
                its publisher first and on the others after: until then, or for good if the
                publisher dies in between, only readers that asked the publisher itself see
                it. Readers that must all count the same records (the members of a round)
                ask for this, so a publisher killed during its put is left out by all.
        """
        _, found = await self._iterate(key, want_value=True)
        best: dict[bytes, net_pb2.SignedRecord] = {}
        me = self.identity.peer_id
        held = [(me, r) for r in self.local_records(key)]
        peer_ids: dict[bytes, str] = {}
        for source, record in [*held, *found]:
            publisher = bytes(record.publisher_public_key)
            # (records are checked when found or stored: the publisher's key is well formed)
            if replicated_only and source != me:
                if publisher not in peer_ids:
                    peer_ids[publisher] = peer_id_of_public_key(publisher)
                if source == peer_ids[publisher]:
                    continue
            if publisher not in best or best[publisher].published_at_s < record.published_at_s:
                best[publisher] = record
        return list(best.values())

    async def put(
        self,
        key: bytes,
        value: bytes,
        ttl_s: float | None = None,
        *,
        closest: list[str] | None = None,
        renew: bool = True,
    ) -> int:
        """Sign a record and store it on the peers nearest ``key``; returns how many took it.

        Args:
            key: where the record lies.
            value: what it says.
            ttl_s: how long the stored copies live (``record_ttl_s`` without).
            closest: the nearest peers from a :meth:`lookup` just made (a value that carries
                the time it was written is then stored one round trip after it was made, not a
                lookup and a round trip); looked up here otherwise.
            renew: re-sign and store it again at every :meth:`republish` while this node runs
                (what says something about the node now: its membership of a run). False for
                a record of one moment (a round's entry): stored once, gone after ``ttl_s``;
                renewed, such records would pile up, one more at every republish per round.
        """
        ttl_s = ttl_s or self.config.record_ttl_s
        now_s = self.clock.wall()
        previous = self._store.get(bytes(key), {}).get(self.identity.peer_id)
        signed_at_s = signing_time_after(
            previous.record.published_at_s if previous is not None else None, now_s
        )
        if previous is not None and signed_at_s <= previous.record.published_at_s:
            self._forget(bytes(key), self.identity.peer_id)  # (signed by a clock since set back)
        record = sign_record(self.identity, key, value, now_s=signed_at_s, ttl_s=ttl_s)
        if renew:
            self._published[bytes(key)] = value
        else:
            self._published.pop(bytes(key), None)
        return await self.store_on_closest(record, closest)

    async def store_on_closest(
        self, record: net_pb2.SignedRecord, closest: list[str] | None = None
    ) -> int:
        """Store a signed record on the k nearest peers to its key (and locally).

        Args:
            record: the signed record.
            closest: the nearest peers if a lookup just found them; looked up otherwise.
        """
        self.handle_store(record, own=True)
        if closest is None:
            closest = await self.lookup(record.key)

        async def store_one(peer_id: str) -> bool:
            try:
                return await self.transport.store(peer_id, record)
            except GossamerError as exc:
                _log.debug("peer %s: store on %s failed: %s", self._short, peer_id[:12], exc)
                return False

        results = await asyncio.gather(*(store_one(p) for p in closest))
        return sum(results)

    async def republish(self) -> None:
        """Re-sign and re-store what this node published (records must be renewed to live)."""
        for key, value in list(self._published.items()):
            await self.put(key, value)

    async def refresh(self) -> None:
        """A lookup of a random id: fills buckets and spreads peer records."""
        await self.lookup(secrets.token_bytes(32))

    async def _iterate(
        self, target: bytes, *, want_value: bool
    ) -> tuple[list[str], list[tuple[str, net_pb2.SignedRecord]]]:
        """The k nearest peers that answered, and the records found with the peer each came
        from: of each publisher, the newest one it answered itself and the newest one others
        answered."""
        k, alpha = self.config.bucket_size, self.config.parallelism
        target_int = int.from_bytes(target, "big")
        candidates = set(self.routing.closest(target, k))
        queried: set[str] = set()
        answered: set[str] = set()
        newest: dict[tuple[bytes, bool], tuple[str, net_pb2.SignedRecord]] = {}
        """The newest record found of each publisher, apart from what the publisher answered
        itself and what others hold (what :meth:`get` tells apart), with the peer it came
        from: every answer's copies kept grew a lookup's memory with each answer."""
        peer_ids: dict[bytes, str] = {}
        known_filter = b"" if want_value else self._known_filter()
        verified: set[bytes] = set()
        """Digests of the records checked in this lookup: replicas answer with the same ones."""
        max_rounds = 64  # bounded even if the network keeps offering new peers

        def distance(peer_id: str) -> int:
            return int.from_bytes(digest_of_peer_id(peer_id), "big") ^ target_int

        deadline = self.clock.monotonic() + self.config.lookup_timeout_s
        for _ in range(max_rounds):
            remaining_s = deadline - self.clock.monotonic()
            nearest = sorted(candidates - {self.identity.peer_id}, key=distance)[:k]
            batch = [p for p in nearest if p not in queried][:alpha]
            if not batch or remaining_s <= 0:
                break
            queried.update(batch)
            results = await self._ask_all(
                batch, target, want_value, known_filter, remaining_s, verified
            )
            for peer_id, (ok, found_records, found_peers) in zip(batch, results, strict=True):
                if not ok:
                    candidates.discard(peer_id)
                    continue
                answered.add(peer_id)
                for record in found_records:
                    publisher = bytes(record.publisher_public_key)
                    if publisher not in peer_ids:  # (checked: the key is well formed)
                        peer_ids[publisher] = peer_id_of_public_key(publisher)
                    slot = (publisher, peer_ids[publisher] == peer_id)
                    kept = newest.get(slot)
                    if kept is None or kept[1].published_at_s < record.published_at_s:
                        newest[slot] = (peer_id, record)
                for signed in found_peers:
                    self.learn(signed, source=peer_id)
                    peer = self.directory.get(_peer_id_of(signed))
                    if peer is not None:
                        candidates.add(peer.peer_id)
        closest = sorted(answered, key=distance)[:k]
        return closest, list(newest.values())

    async def _ask_all(
        self,
        batch: list[str],
        target: bytes,
        want_value: bool,
        known_filter: bytes,
        timeout_s: float,
        verified: set[bytes],
    ) -> list[tuple[bool, list[net_pb2.SignedRecord], list[net_pb2.SignedPeerRecord]]]:
        """One lookup step: ask ``batch`` at once; those that have not answered within
        ``timeout_s`` (the lookup's deadline) count as no answer. Every request has ended when
        this returns, cancelled with it if it is."""
        asks = [
            asyncio.ensure_future(self._ask(p, target, want_value, known_filter, verified))
            for p in batch
        ]
        try:
            _, late = await asyncio.wait(asks, timeout=timeout_s)
        finally:
            for ask in asks:
                ask.cancel()  # (no effect on those done)
            outcomes = await asyncio.gather(*asks, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(
                outcome, asyncio.CancelledError
            ):
                raise outcome  # a bug (_ask maps the network's errors), after all were collected
        return [(False, [], []) if ask in late else ask.result() for ask in asks]

    def _known_filter(self) -> bytes:
        """The filter of this node's records sent with its lookups, with a fresh salt each time
        (a false positive then never hides the same record twice), except in a directory of over
        :data:`_MAX_GOSSIP_SCAN` peers (a full one's filter takes 100 ms to make): there it is
        made again when a peer came or left, or after ``refresh_interval_s``."""
        now_s = self.clock.monotonic()
        made_of = self.directory.num_changes
        if self._filter is not None and len(self.directory) > _MAX_GOSSIP_SCAN:
            made_at_s, changes, data = self._filter
            if changes == made_of and now_s - made_at_s < self.config.refresh_interval_s:
                return data
        data = PeerFilter.build(r.signed.record.key for r in self.directory.records()).to_bytes()
        self._filter = (now_s, made_of, data)
        return data

    async def _ask(
        self,
        peer_id: str,
        target: bytes,
        want_value: bool,
        known_filter: bytes,
        verified: set[bytes],
    ) -> tuple[bool, list[net_pb2.SignedRecord], list[net_pb2.SignedPeerRecord]]:
        """One request of a lookup; the records in its answer checked (each one once per
        lookup: ``verified`` holds the digests of the encodings already checked, and replicas
        answer with the same records, 1,024 of a round's key from each of up to k). An answer
        with more records or value bytes than a key holds (``max_records_per_key``,
        ``max_key_bytes``) is no answer: 8 MiB of validly signed records from each of 20
        peers took 243 MiB."""
        try:
            if want_value:
                raw_records, peers = await self.transport.find_value(peer_id, target)
            else:
                raw_records = []
                peers = await self.transport.find_node(peer_id, target, known_filter)
        except GossamerError as exc:
            _log.debug("peer %s: lookup request to %s failed: %s", self._short, peer_id[:12], exc)
            self.peer_failed(peer_id)
            return False, [], []
        if (
            len(peers) > self.config.bucket_size
            or len(raw_records) > self.limits.max_records_per_key
        ):
            self.counters.protocol_error()
            return True, [], []
        num_value_bytes = sum(len(record.value) for record in raw_records)
        if num_value_bytes > self.limits.max_key_bytes:
            self.counters.protocol_error()
            _log.info(
                "peer %s: %s answered a lookup with %d bytes of records, over a key's %d",
                self._short,
                peer_id[:12],
                num_value_bytes,
                self.limits.max_key_bytes,
            )
            # (not a failed peer: one whose limits.max_key_bytes is larger answers honestly so)
            return True, [], []
        good = []
        num_checked = 0
        for record in raw_records:
            if record.key != target:
                self.counters.protocol_error()
                continue
            now_s = self.clock.wall()
            encoded = hashlib.sha256(record.SerializeToString()).digest()
            if encoded in verified:  # (the same bytes: the same signature over the same fields)
                if record.expires_at_s > now_s:
                    good.append(record)
                continue
            try:
                check_record(
                    record, now_s=now_s, max_value_bytes=self.limits.max_record_value_bytes
                )
            except (ProtocolError, AuthenticationError) as exc:
                self.counters.error(exc)
                continue
            finally:
                num_checked += 1
            verified.add(encoded)
            good.append(record)
            if num_checked % _CHECKS_PER_YIELD == 0:
                # A signature each: 1,024 held the loop 150 ms. (Yielding after the check, so
                # the lookup's other requests skip what this one checked.)
                await asyncio.sleep(0)
        return True, good, peers


def _peer_id_of(signed: net_pb2.SignedPeerRecord) -> str:
    try:
        return peer_id_of_public_key(signed.record.publisher_public_key)
    except ProtocolError:
        return ""
