"""In-memory counters of the network layer, for ``obs/`` to export.

Updated on the node's event loop; :meth:`NetCounters.snapshot` copies them for readers on other
threads. Recording a count never blocks.
"""

from __future__ import annotations

import bisect
import heapq
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "LATENCY_BUCKETS_S",
    "MAX_PEERS_COUNTED",
    "RELAYED_OTHERS",
    "LatencyHistogram",
    "NetCounters",
    "PeerTraffic",
]

LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
"""Upper bounds of the call-latency buckets: a DHT call takes milliseconds, a whole bulk
transfer (a 100 MB round's part at 100 Mbit/s, a state download) seconds to minutes."""


@dataclass(slots=True)
class PeerTraffic:
    """What went to and came from one remote peer."""

    bytes_sent: int = 0
    """Payload bytes sent (message sizes, before gRPC framing and TLS)."""
    bytes_received: int = 0
    """Payload bytes received."""
    num_rpcs_sent: int = 0
    """Calls this node made to the peer."""
    num_rpcs_received: int = 0
    """Calls the peer made to this node."""
    num_errors: int = 0
    """Failed calls either way."""


@dataclass(slots=True)
class LatencyHistogram:
    """Call latencies in fixed buckets (upper bounds :data:`LATENCY_BUCKETS_S`, then +inf)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    """Calls per bucket."""
    total_s: float = 0.0
    """Sum of all latencies."""
    num_calls: int = 0
    """Calls recorded."""

    def record(self, latency_s: float) -> None:
        """Add one call."""
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_S, latency_s)] += 1
        self.total_s += latency_s
        self.num_calls += 1


RELAYED_OTHERS = "(others)"
"""The key of :attr:`NetCounters.relayed_bytes` that counts the peers past its limit."""
MAX_PEERS_COUNTED = 4096
"""Remote peers counted one by one; beyond it the least busy quarter is folded into one total
(peer ids cost nothing to make: a churning swarm or a peer cycling identities grew the table,
and every scrape sorted it, without bound)."""


class _PeerTable(dict[str, PeerTraffic]):
    """Traffic by remote peer id, a new id counted from zero, at most ``limit`` ids kept."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.folded = PeerTraffic()
        """What the peers folded out of the table exchanged (never shrinks)."""
        self.num_folded = 0
        """Peers folded so far."""
        self.folds_begun = 0
        self.folds_done = 0
        """(folds run on the event loop; a reader on another thread compares the two)"""

    def __missing__(self, peer_id: str) -> PeerTraffic:
        if len(self) >= self.limit:
            self._fold(max(1, self.limit // 4))
        traffic = self[peer_id] = PeerTraffic()
        return traffic

    def _fold(self, count: int) -> None:
        self.folds_begun += 1
        quietest = heapq.nsmallest(
            count, self.items(), key=lambda item: item[1].bytes_sent + item[1].bytes_received
        )
        for peer_id, traffic in quietest:
            del self[peer_id]
            for name in PeerTraffic.__slots__:
                setattr(self.folded, name, getattr(self.folded, name) + getattr(traffic, name))
        self.num_folded += len(quietest)
        self.folds_done += 1


class NetCounters:
    """All counters of one node."""

    def __init__(self, *, max_peers_counted: int = MAX_PEERS_COUNTED) -> None:
        self.peers = _PeerTable(max_peers_counted)
        """Traffic by remote peer id (the least busy folded into ``peers.folded`` beyond
        :data:`MAX_PEERS_COUNTED`)."""
        self.rpc_latency: defaultdict[str, LatencyHistogram] = defaultdict(LatencyHistogram)
        """Client-side latency by method."""
        self.rpc_calls: defaultdict[str, int] = defaultdict(int)
        """Calls by method, both directions."""
        self.errors: defaultdict[str, int] = defaultdict(int)
        """Errors by kind (the Gossamer error class name)."""
        self.connections: defaultdict[str, int] = defaultdict(int)
        """Open outgoing connections by kind: ``direct``, ``relayed``."""
        self.num_handshakes_refused = 0
        """Handshakes this node refused."""
        self.num_protocol_errors = 0
        """Malformed, oversized or out-of-order messages received."""
        self.num_retries = 0
        """Retried attempts."""
        self.relayed_bytes: defaultdict[str, int] = defaultdict(int)
        """Bytes this node relayed, by relayed peer id (both directions), at most
        ``max_peers_counted`` ids: the bytes of peers past them count under
        :data:`RELAYED_OTHERS` (a relay kept a key for every peer it ever served)."""
        self._max_relayed_keys = max_peers_counted
        self.relay_reservations = 0
        """Peers holding a relay reservation on this node now."""
        self.relay_tunnels_opened = 0
        """Tunnels this node spliced as a relay."""
        self.num_relayed_dials = 0
        """Connections this node opened through a relay."""
        self.num_direct_upgrades = 0
        """Relayed connections replaced by a direct path."""
        self.bulk_transfers_expired = 0
        """Incoming multi-stream bulk transfers dropped because their streams stalled."""

    def sent(self, peer_id: str, num_bytes: int) -> None:
        """Count bytes sent to a peer."""
        self.peers[peer_id].bytes_sent += num_bytes

    def relayed(self, peer_id: str, num_bytes: int) -> None:
        """Count bytes relayed for a peer (see :attr:`relayed_bytes`)."""
        if peer_id not in self.relayed_bytes and len(self.relayed_bytes) >= self._max_relayed_keys:
            peer_id = RELAYED_OTHERS
        self.relayed_bytes[peer_id] += num_bytes

    def received(self, peer_id: str, num_bytes: int) -> None:
        """Count bytes received from a peer."""
        self.peers[peer_id].bytes_received += num_bytes

    def call_made(self, peer_id: str, method: str, latency_s: float, ok: bool) -> None:
        """Count one outgoing call."""
        traffic = self.peers[peer_id]
        traffic.num_rpcs_sent += 1
        if not ok:
            traffic.num_errors += 1
        self.rpc_calls[method] += 1
        self.rpc_latency[method].record(latency_s)

    def call_served(self, peer_id: str, method: str) -> None:
        """Count one incoming call."""
        self.peers[peer_id].num_rpcs_received += 1
        self.rpc_calls[method] += 1

    def error(self, exc: BaseException) -> None:
        """Count an error by its class."""
        self.errors[type(exc).__name__] += 1

    def protocol_error(self) -> None:
        """Count a malformed message."""
        self.num_protocol_errors += 1
        self.errors["ProtocolError"] += 1

    def _peers_snapshot(self) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
        """The peers' traffic and the folded peers', both from between two folds: a fold
        between reading one and the other counted a peer in both, or in neither (a counter
        that went down on the next scrape)."""
        table = self.peers
        for _ in range(8):  # (folds are rare: one per thousand new peers at most)
            done = table.folds_done
            peers = {
                peer: {
                    "bytes_sent": t.bytes_sent,
                    "bytes_received": t.bytes_received,
                    "num_rpcs_sent": t.num_rpcs_sent,
                    "num_rpcs_received": t.num_rpcs_received,
                    "num_errors": t.num_errors,
                }
                for peer, t in list(table.items())
            }
            folded = {
                "bytes_sent": table.folded.bytes_sent,
                "bytes_received": table.folded.bytes_received,
                "num_rpcs_sent": table.folded.num_rpcs_sent,
                "num_rpcs_received": table.folded.num_rpcs_received,
                "num_errors": table.folded.num_errors,
                "num_peers": table.num_folded,
            }
            if table.folds_begun == done:
                break
        return peers, folded

    def snapshot(self) -> dict[str, Any]:
        """A plain, JSON-ready copy of every counter."""
        peers, folded = self._peers_snapshot()
        return {
            "peers": peers,
            "folded_peers": folded,
            "rpc_calls": dict(self.rpc_calls),
            "rpc_latency": {
                method: {"num_calls": h.num_calls, "total_s": h.total_s, "buckets": list(h.counts)}
                for method, h in list(self.rpc_latency.items())
            },
            "errors": dict(self.errors),
            "connections": dict(self.connections),
            "num_handshakes_refused": self.num_handshakes_refused,
            "num_protocol_errors": self.num_protocol_errors,
            "num_retries": self.num_retries,
            "relayed_bytes": dict(self.relayed_bytes),
            "relay_reservations": self.relay_reservations,
            "relay_tunnels_opened": self.relay_tunnels_opened,
            "num_relayed_dials": self.num_relayed_dials,
            "num_direct_upgrades": self.num_direct_upgrades,
            "bulk_transfers_expired": self.bulk_transfers_expired,
        }
