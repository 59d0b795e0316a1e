"""The peer directory: the newest valid record of every peer this node has heard of.

Records reach the directory from handshakes, from the sender and responder fields of DHT calls
and from lookup results; each is checked (signature, expiry) before it is kept. An entry leaves
when its record expires: a peer that stopped republishing (killed, partitioned) drops out within
the lifetime of its last record, and at most ``max_lifetime_s`` after it was signed, whatever
lifetime it claims.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Callable

from gossamer.core.clock import Clock
from gossamer.core.errors import AuthenticationError, ProtocolError
from gossamer.net.counters import NetCounters
from gossamer.net.identity import peer_id_of_public_key, short_peer_id
from gossamer.net.records import MAX_RECORD_TTL_S, PeerRecord, parse_peer_record
from gossamer.proto import net_pb2

__all__ = ["RECENT_CONTACT_S", "PeerDirectory"]

_log = logging.getLogger(__name__)
RECENT_CONTACT_S = 600.0
"""A peer spoken to within this long ranks above those a full directory evicts first."""
_SCAN_SLACK = 64
"""Records :meth:`PeerDirectory.recently_renewed` looks at past twice what it is asked for
(expired ones it skips)."""


class PeerDirectory:
    """Peer records by peer id, newest wins, bounded in size.

    Records are kept in the order their newest version reached this node, so the least
    recently renewed comes first and the most recently renewed last, and in a list for drawing
    at random: serving a request touches a few of them, never all (a FindNode that listed,
    expired and sorted the whole directory took 2.3 ms at 10,000 peers, and a flood of them
    made the node miss its heartbeats).

    Args:
        own_peer_id: this node's id (never stored).
        clock: wall time for expiry, monotonic time for the per-source budget.
        counters: rejected records are counted here.
        max_value_bytes: largest record value accepted.
        max_peers: entries kept. Past it, peers this node had no authenticated exchange with
            lately go first, the one whose newest record reached this node longest ago first:
            not the time a record claims it was signed (anyone may mint records signed "now",
            or up to ``MAX_CLOCK_SKEW_S`` ahead, that pushed out every live peer learned
            through gossip), and not its claimed lifetime (up to a week).
        max_new_peers_per_source: peers one source may add per ``new_peers_interval_s``.
        new_peers_interval_s: see above.
        max_lifetime_s: a record is held at most this long after it was signed, whatever
            lifetime it claims (the DHT sets its ``limits.max_stored_ttl_s``: see
            :meth:`limit_lifetime`).
    """

    def __init__(
        self,
        own_peer_id: str,
        clock: Clock,
        counters: NetCounters,
        *,
        max_value_bytes: int,
        max_peers: int,
        max_new_peers_per_source: int = 1024,
        new_peers_interval_s: float = 60.0,
        max_lifetime_s: float = MAX_RECORD_TTL_S,
    ) -> None:
        self._own = own_peer_id
        self._clock = clock
        self._counters = counters
        self._max_value_bytes = max_value_bytes
        self._max_peers = max_peers
        self._max_new_per_source = max_new_peers_per_source
        self._new_peers_interval_s = new_peers_interval_s
        self._max_lifetime_s = max_lifetime_s
        self._records: dict[str, PeerRecord] = {}
        """Least recently renewed or spoken to first (either moves a record to the end)."""
        self._never_contacted: dict[str, None] = {}
        """The peers of ``_records`` this node never spoke to, least recently renewed first."""
        self._ids: list[str] = []
        self._slot: dict[str, int] = {}
        """Where each peer id is in ``_ids`` (for drawing records at random in O(1))."""
        self._new_from: dict[str, tuple[float, int]] = {}
        """Per source: when its current interval began, peers it added in it."""
        self.num_changes = 0
        """Peers that came or left so far (a record renewed is no change)."""
        self.num_refused_new = 0
        """New peers ignored because their source had used its budget."""
        self.last_contact_wall_s: dict[str, float] = {}
        """Wall time of the last authenticated exchange with each peer."""
        self.on_added: Callable[[PeerRecord], None] | None = None
        """Called when a peer appears (not on updates)."""
        self.on_removed: Callable[[str], None] | None = None
        """Called when a peer's record expires."""

    def learn(
        self, signed: net_pb2.SignedPeerRecord, *, source: str | None = None
    ) -> PeerRecord | None:
        """Check a record from the network and keep it if it is newer; None if rejected.

        Args:
            signed: the record.
            source: the peer it came from, when that is not the record's own peer (a lookup
                answer, gossip): such a source adds at most ``max_new_peers_per_source`` new
                peers per ``new_peers_interval_s``; renewals of known peers are not counted.
        """
        try:
            claimed = peer_id_of_public_key(signed.record.publisher_public_key)
        except ProtocolError:
            claimed = ""
        current = self._records.get(claimed)
        if current is not None and current.published_at_s >= signed.record.published_at_s:
            return current  # not newer: keep what was verified, skip verifying this copy
        charged = current is None and source is not None and source != claimed
        if charged and not self._has_budget(source or ""):
            self.num_refused_new += 1
            return None  # (before the signature is checked: the budget bounds that work too)
        try:
            record = parse_peer_record(
                signed, now_s=self._clock.wall(), max_value_bytes=self._max_value_bytes
            )
        except (ProtocolError, AuthenticationError) as exc:
            self._counters.error(exc)
            if isinstance(exc, ProtocolError):
                self._counters.num_protocol_errors += 1
            _log.debug("peer %s: ignored a peer record: %s", short_peer_id(self._own), exc)
            return None
        if record.peer_id == self._own:
            return None
        expires_at_s = min(record.expires_at_s, record.published_at_s + self._max_lifetime_s)
        if expires_at_s <= self._clock.wall():
            return None  # (older than any record a live peer keeps renewed)
        if expires_at_s < record.expires_at_s:
            record = dataclasses.replace(record, expires_at_s=expires_at_s)
        current = self._records.get(record.peer_id)
        if current is not None and current.published_at_s >= record.published_at_s:
            return current
        if current is not None:
            del self._records[record.peer_id]  # (re-inserted last: the most recently renewed)
        self._records[record.peer_id] = record
        if record.peer_id in self._never_contacted or (
            current is None and record.peer_id not in self.last_contact_wall_s
        ):
            self._never_contacted.pop(record.peer_id, None)  # (re-inserted last, as above)
            self._never_contacted[record.peer_id] = None
        if current is None:
            if charged:
                self._charge(source or "")
            self._slot[record.peer_id] = len(self._ids)
            self._ids.append(record.peer_id)
            self.num_changes += 1
            self._evict_if_full()
            if record.peer_id not in self._records:
                return None  # no room for it: nothing else may hold it (routing, say)
            if self.on_added is not None:
                self.on_added(record)
        return record

    def limit_new_peers(self, count: int, interval_s: float) -> None:
        """Set how many new peers one source may add per ``interval_s`` (the DHT's config)."""
        self._max_new_per_source = count
        self._new_peers_interval_s = interval_s

    def limit_lifetime(self, max_lifetime_s: float) -> None:
        """Hold a record at most ``max_lifetime_s`` after it was signed (records learned from
        now on). The DHT sets its ``limits.max_stored_ttl_s``: every node republishes its
        record faster than that (the config requires it), so a live peer's record is always
        renewed in time, while a record claiming a week of life for a peer that never answered
        kept that peer in every directory, and dialed, for the week."""
        self._max_lifetime_s = max_lifetime_s

    def _has_budget(self, source: str) -> bool:
        started_s, count = self._new_from.get(source, (0.0, 0))
        fresh = self._clock.monotonic() - started_s >= self._new_peers_interval_s
        return fresh or count < self._max_new_per_source

    def _charge(self, source: str) -> None:
        now_s = self._clock.monotonic()
        started_s, count = self._new_from.get(source, (now_s, 0))
        if now_s - started_s >= self._new_peers_interval_s:
            started_s, count = now_s, 0
        self._new_from[source] = (started_s, count + 1)

    def contacted(self, peer_id: str) -> None:
        """Note an authenticated exchange with a peer; its record moves to the end of the
        eviction order, as a renewal does (else live peers drifted to its front while records
        learned later piled up behind them, and a full directory evicted them)."""
        self.last_contact_wall_s[peer_id] = self._clock.wall()
        self._never_contacted.pop(peer_id, None)
        record = self._records.pop(peer_id, None)
        if record is not None:
            self._records[peer_id] = record

    def get(self, peer_id: str) -> PeerRecord | None:
        """The peer's record if it is still valid."""
        record = self._records.get(peer_id)
        if record is not None and record.expires_at_s <= self._clock.wall():
            self._remove(peer_id)
            return None
        return record

    def expire(self) -> list[str]:
        """Drop expired records; returns the peers that left."""
        now = self._clock.wall()
        gone = [peer for peer, record in self._records.items() if record.expires_at_s <= now]
        for peer_id in gone:
            self._remove(peer_id)
        for peer_id in [p for p in self.last_contact_wall_s if p not in self._records]:
            del self.last_contact_wall_s[peer_id]  # sessions of peers whose records never came
        now_s = self._clock.monotonic()
        for source in [
            s
            for s, (started_s, _) in self._new_from.items()
            if now_s - started_s >= self._new_peers_interval_s
        ]:
            del self._new_from[source]
        return gone

    def records(self) -> list[PeerRecord]:
        """Every valid record."""
        self.expire()
        return list(self._records.values())

    def recently_renewed(self, count: int, exclude: str = "") -> list[PeerRecord]:
        """Up to ``count`` valid records, the one whose newest version came last first; looks
        at no more than ``2 * count + 64`` records."""
        now = self._clock.wall()
        found: list[PeerRecord] = []
        for looked, peer_id in enumerate(reversed(self._records)):
            if len(found) == count or looked >= 2 * count + _SCAN_SLACK:
                break
            record = self._records[peer_id]
            if peer_id != exclude and record.expires_at_s > now:
                found.append(record)
        return found

    def sample(self, count: int, rng: random.Random) -> list[PeerRecord]:
        """Up to ``count`` records drawn at random (valid ones: expired ones drawn are left
        out), in O(``count``)."""
        now = self._clock.wall()
        drawn = rng.sample(range(len(self._ids)), min(count, len(self._ids)))
        records = (self._records[self._ids[i]] for i in drawn)
        return [r for r in records if r.expires_at_s > now]

    def __contains__(self, peer_id: object) -> bool:
        return isinstance(peer_id, str) and self.get(peer_id) is not None

    def __len__(self) -> int:
        return len(self._records)

    def _remove(self, peer_id: str) -> None:
        del self._records[peer_id]
        slot = self._slot.pop(peer_id)
        last = self._ids.pop()
        if last != peer_id:  # the last id fills the hole
            self._ids[slot] = last
            self._slot[last] = slot
        self.num_changes += 1
        self.last_contact_wall_s.pop(peer_id, None)
        self._never_contacted.pop(peer_id, None)
        _log.info("peer %s: peer %s left the directory", short_peer_id(self._own), peer_id)
        if self.on_removed is not None:
            self.on_removed(peer_id)

    def _evict_if_full(self) -> None:
        """Evict, while the directory is full: the record of least recent activity (renewal
        or exchange) if this node has not spoken to its peer lately (one handshake long ago,
        as a throwaway identity makes, does not keep a record forever); else the least
        recently renewed of the peers this node never spoke to (records learned after the
        last exchange with a live peer sit behind it in the first order, and it was evicted
        for them); else the record of least recent activity. Each choice is O(1)."""
        recent_after = self._clock.wall() - RECENT_CONTACT_S
        while len(self._records) > self._max_peers:
            victim = next(iter(self._records))
            spoken_to_lately = self.last_contact_wall_s.get(victim, -math.inf) >= recent_after
            if spoken_to_lately and self._never_contacted:
                victim = next(iter(self._never_contacted))
            self._remove(victim)
