"""The peer directory: the newest valid record of every peer this node has heard of.

Records reach the directory from handshakes, from the sender and responder fields of DHT calls
and from lookup results; each is checked (signature, expiry) before it is kept. An entry leaves
when its record expires: a peer that stopped republishing (killed, partitioned) drops out within
the lifetime of its last record.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable

from gossamer.core.clock import Clock
from gossamer.core.errors import AuthenticationError, ProtocolError
from gossamer.net.counters import NetCounters
from gossamer.net.identity import peer_id_of_public_key, short_peer_id
from gossamer.net.records import PeerRecord, parse_peer_record
from gossamer.proto import net_pb2

__all__ = ["RECENT_CONTACT_S", "PeerDirectory"]

_log = logging.getLogger(__name__)
RECENT_CONTACT_S = 600.0
"""A peer spoken to within this long ranks above those a full directory evicts first."""
_EVICTION_SAMPLE = 64
"""Records a full directory compares to pick the one to evict (all of them took 1.4 ms of the
event loop per new record at 10,000: a peer sending throwaway records in its pings could keep
the loop busy with 700 a second)."""


class PeerDirectory:
    """Peer records by peer id, newest wins, bounded in size.

    Args:
        own_peer_id: this node's id (never stored).
        clock: wall time for expiry.
        counters: rejected records are counted here.
        max_value_bytes: largest record value accepted.
        max_peers: entries kept. Past it, peers this node never had an authenticated exchange
            with go first, the one whose record was signed longest ago first: a record's
            claimed lifetime (up to a week) does not keep it, so records minted to last cannot
            push out live peers that renew theirs.
    """

    def __init__(
        self,
        own_peer_id: str,
        clock: Clock,
        counters: NetCounters,
        *,
        max_value_bytes: int,
        max_peers: int,
    ) -> None:
        self._own = own_peer_id
        self._clock = clock
        self._counters = counters
        self._max_value_bytes = max_value_bytes
        self._max_peers = max_peers
        self._records: dict[str, PeerRecord] = {}
        self.num_changes = 0
        """Peers that came or left so far (a record renewed is no change)."""
        self.last_contact_wall_s: dict[str, float] = {}
        """Wall time of the last authenticated exchange with each peer."""
        self.on_added: Callable[[PeerRecord], None] | None = None
        """Called when a peer appears (not on updates)."""
        self.on_removed: Callable[[str], None] | None = None
        """Called when a peer's record expires."""

    def learn(self, signed: net_pb2.SignedPeerRecord) -> PeerRecord | None:
        """Check a record from the network and keep it if it is newer; None if rejected."""
        try:
            claimed = peer_id_of_public_key(signed.record.publisher_public_key)
        except ProtocolError:
            claimed = ""
        current = self._records.get(claimed)
        if current is not None and current.published_at_s >= signed.record.published_at_s:
            return current  # not newer: keep what was verified, skip verifying this copy
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
        current = self._records.get(record.peer_id)
        if current is not None and current.published_at_s >= record.published_at_s:
            return current
        self._records[record.peer_id] = record
        if current is None:
            self.num_changes += 1
            self._evict_if_full()
            if record.peer_id not in self._records:
                return None  # no room for it: nothing else may hold it (routing, say)
            if self.on_added is not None:
                self.on_added(record)
        return record

    def contacted(self, peer_id: str) -> None:
        """Note an authenticated exchange with a peer."""
        self.last_contact_wall_s[peer_id] = self._clock.wall()

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
        return gone

    def records(self) -> list[PeerRecord]:
        """Every valid record."""
        self.expire()
        return list(self._records.values())

    def __contains__(self, peer_id: object) -> bool:
        return isinstance(peer_id, str) and self.get(peer_id) is not None

    def __len__(self) -> int:
        return len(self._records)

    def _remove(self, peer_id: str) -> None:
        del self._records[peer_id]
        self.num_changes += 1
        self.last_contact_wall_s.pop(peer_id, None)
        _log.info("peer %s: peer %s left the directory", short_peer_id(self._own), peer_id)
        if self.on_removed is not None:
            self.on_removed(peer_id)

    def _evict_if_full(self) -> None:
        """Evict, while the directory is full, peers not spoken to lately (one handshake long
        ago, as a throwaway identity makes, does not keep a record forever), the oldest
        published first, of a random sample of ``_EVICTION_SAMPLE`` records."""
        recent_after = self._clock.wall() - RECENT_CONTACT_S
        while len(self._records) > self._max_peers:
            records = list(self._records.values())
            if len(records) > _EVICTION_SAMPLE:  # the oldest of a random sample
                records = random.sample(records, _EVICTION_SAMPLE)
            first = min(
                records,
                key=lambda r: (
                    self.last_contact_wall_s.get(r.peer_id, -math.inf) >= recent_after,
                    r.published_at_s,
                ),
            )
            self._remove(first.peer_id)
