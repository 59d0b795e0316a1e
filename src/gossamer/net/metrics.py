"""The network layer's counters and state as Prometheus metrics of a peer.

:class:`NetMetricsCollector` is a custom collector registered on a peer's registry (usually
:class:`~gossamer.obs.metrics.PeerMetrics`'s). Nothing is done per message: the counters the
node keeps anyway (:class:`~gossamer.net.counters.NetCounters`) are read when Prometheus scrapes.
Counters are copied from the scraping thread (their snapshot is safe there); what only the node's
event loop may touch (the directory, the connection pool, the failure detector) is read by a small
coroutine submitted to the loop with a short deadline, and if the loop does not answer in time the
last answer is served again, so a busy node never makes a scrape hang; a scrape that comes while
another is reading serves the last answer at once, rather than queue behind it. The one thing
counted as it happens is a failure: the collector observes the failure detector
(:meth:`NetMetricsCollector.count_liveness_change`), so a peer that went and came back between
two scrapes is still counted.

Labels are bounded: remote peers by :attr:`NetMetricsConfig.max_peer_labels` (the first peers
seen, each for as long as the counters keep it; the rest are summed under ``peer="other"``, so
that no series goes down when peers change places), methods and error kinds by the code's fixed
sets, connection kinds and reachability by their enums.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from gossamer.core.errors import GossamerError
from gossamer.net.bridge import NodeThread
from gossamer.net.counters import LATENCY_BUCKETS_S
from gossamer.net.node import Node
from gossamer.proto import net_pb2

__all__ = [
    "OTHER_PEERS",
    "LiveView",
    "NetMetricsCollector",
    "NetMetricsConfig",
    "live_view",
    "register_net_metrics",
]

_log = logging.getLogger(__name__)

OTHER_PEERS = "other"
"""The ``peer`` label under which peers beyond the label bound are summed."""

_REACHABILITY = {
    net_pb2.REACHABILITY_UNKNOWN: "unknown",
    net_pb2.REACHABILITY_DIRECT: "direct",
    net_pb2.REACHABILITY_RELAYED: "relayed",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class NetMetricsConfig:
    """How the network metrics are read."""

    max_peer_labels: int = 64
    """Remote peers exported by name; the others are summed under ``peer="other"``."""
    live_timeout_s: float = 1.0
    """Deadline for reading the node's live state on its event loop during a scrape."""

    def __post_init__(self) -> None:
        if self.max_peer_labels < 1:
            raise ValueError(
                f"NetMetricsConfig.max_peer_labels: must be at least 1, not {self.max_peer_labels}"
            )
        if self.live_timeout_s <= 0:
            raise ValueError(
                f"NetMetricsConfig.live_timeout_s: must be positive, not {self.live_timeout_s}"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class LiveView:
    """What only the node's event loop may read, copied there."""

    peers_known: int = 0
    """Peers with a valid record in the directory."""
    peers_connected: int = 0
    """Peers with a live connection: open and ready, and not reported gone by the detector."""
    peers_relayed: int = 0
    """Known peers that are reachable only through a relay."""
    reachability: str = "unknown"
    """Whether others can reach this node: direct, relayed or unknown."""
    num_relays: int = 0
    """Relays this node holds a reservation with."""
    liveness: tuple[tuple[str, bool, float], ...] = ()
    """(peer id, alive, monotonic time of the last change) of every watched peer."""


def _peers_connected(node: Node) -> int:
    """Peers with a live connection; call it on the node's event loop.

    A connection stays in the pool until a call on it fails, so a peer that stopped answering
    without closing its connections (paused, its machine gone, the link cut) would count as
    connected for as long as nobody calls it. Counted here are only connections whose channel is
    ready and whose peer the failure detector does not report gone.
    """
    count = 0
    for peer_id in node.pool.peer_ids:
        liveness = node.detector.liveness(peer_id)
        if liveness is not None and not liveness.alive:
            continue
        connection = node.pool.get(peer_id)
        if connection is None:
            continue
        if connection.channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.READY:
            count += 1
    return count


def live_view(node: Node) -> LiveView:
    """Copy the node's live state; call it on the node's event loop."""
    records = node.peers()
    liveness = []
    for peer_id in node.detector.watched:
        state = node.detector.liveness(peer_id)
        if state is not None:
            liveness.append((peer_id, state.alive, state.changed_at_s))
    return LiveView(
        peers_known=len(records),
        peers_connected=_peers_connected(node),
        peers_relayed=sum(r.reachability == net_pb2.REACHABILITY_RELAYED for r in records),
        reachability=_REACHABILITY.get(node.reachability, "unknown"),
        num_relays=len(node.relays),
        liveness=tuple(liveness),
    )


class NetMetricsCollector(Collector):
    """Exports a node's counters and live state when scraped.

    Args:
        read_counters: returns :meth:`NetCounters.snapshot` (safe from any thread).
        read_live: returns the node's :class:`LiveView`, or raises if it cannot in time.
        config: label bound and deadline.
    """

    def __init__(
        self,
        read_counters: Callable[[], Mapping[str, Any]],
        read_live: Callable[[], LiveView],
        config: NetMetricsConfig | None = None,
    ) -> None:
        self._read_counters = read_counters
        self._read_live = read_live
        self.config = config or NetMetricsConfig()
        self._lock = threading.Lock()
        self._closed = False
        self._live = LiveView()
        self._failures_lock = threading.Lock()  # not _lock: a scrape holds that while it
        # waits for the node's loop, and the loop calls count_liveness_change
        self._failures = 0
        self._labels_lock = threading.Lock()
        self._named: list[str] = []
        """Peers with a ``peer`` label of their own, for as long as the counters keep them."""
        self._unnamed: set[str] = set()
        """Peers counted under ``other``, for as long as the counters keep them."""

    def count_liveness_change(self, peer_id: str, alive: bool) -> None:
        """A failure detector observer: count every watched peer reported gone, when it is.

        Counting the change itself, not the state a scrape finds, misses no failure that came
        and went (a peer gone and back) between two scrapes.
        """
        del peer_id
        if not alive:
            with self._failures_lock:
                self._failures += 1

    def close(self) -> None:
        """Stop reading the node (call before it stops); later scrapes serve the last view."""
        with self._lock:
            self._closed = True

    def describe(self) -> Iterable[Metric]:
        return self._families({}, LiveView(), 0, set())

    def collect(self) -> Iterable[Metric]:
        counters = self._read_counters()
        live = self._read_live_view()
        with self._failures_lock:
            failures = self._failures
        named = self._label_peers(counters.get("peers", {}))
        return self._families(counters, live, failures, named)

    def _read_live_view(self) -> LiveView:
        """The node's live state, or the last one read where it cannot be read now: the node
        was closed, its loop did not answer in time, or another scrape is reading it.

        One live read at a time, and a scrape that finds one under way serves the last view at
        once rather than wait for the lock: each read may wait ``live_timeout_s`` for a busy
        loop, so scrapes queued behind one another (two dashboards and Prometheus) and the
        third waited three times as long, past a dashboard's deadline, which showed the busy
        but live peer gone.
        """
        if not self._lock.acquire(blocking=False):
            return self._live
        try:
            if not self._closed:  # never after close()
                try:
                    self._live = self._read_live()
                except (GossamerError, RuntimeError) as exc:
                    _log.debug("metrics: node state not read (%s); serving the last one", exc)
            return self._live
        finally:
            self._lock.release()

    def _label_peers(self, peers: Mapping[str, Mapping[str, int]]) -> set[str]:
        """The peers that have a label of their own: the first ``max_peer_labels`` peers seen
        (the busiest first among those seen at once), each for as long as the counters keep
        it. Labels that followed a ranking on every scrape made counters go down: a peer
        leaving ``other`` for a label of its own took its bytes out of ``other``."""
        with self._labels_lock:
            self._named = [peer for peer in self._named if peer in peers]
            self._unnamed &= peers.keys()
            known = {*self._named, *self._unnamed}
            new = sorted(
                (peer for peer in peers if peer not in known),
                key=lambda peer: (
                    peers[peer].get("bytes_sent", 0) + peers[peer].get("bytes_received", 0)
                ),
                reverse=True,
            )
            for peer in new:
                if len(self._named) < self.config.max_peer_labels:
                    self._named.append(peer)
                else:
                    self._unnamed.add(peer)
            return set(self._named)

    def _families(
        self, counters: Mapping[str, Any], live: LiveView, failures: int, named: set[str]
    ) -> list[Metric]:
        families: list[Metric] = []
        families += self._traffic(
            counters.get("peers", {}), counters.get("folded_peers", {}), named
        )
        families += self._rpcs(counters)
        families += self._peers(live, failures, named, self.config.max_peer_labels)
        families += self._connections_and_relays(counters, live)
        return families

    def _traffic(
        self, peers: Mapping[str, Mapping[str, int]], folded: Mapping[str, int], named: set[str]
    ) -> list[Metric]:
        """Per-peer traffic: the ``named`` peers by id (see :meth:`_label_peers`), the rest (and
        the peers the counters folded away) as one ``other`` series."""
        fields = {
            "bytes_sent": CounterMetricFamily(
                "gossamer_net_sent_bytes",
                "Payload bytes sent to a remote peer (before gRPC framing and TLS): requests of "
                "the calls this node made and bulk transfers; answers to calls it served are "
                "not counted.",
                labels=["peer"],
            ),
            "bytes_received": CounterMetricFamily(
                "gossamer_net_received_bytes",
                "Payload bytes received from a remote peer: answers to the calls this node "
                "made and bulk transfers; requests of calls it served are not counted.",
                labels=["peer"],
            ),
            "num_rpcs_sent": CounterMetricFamily(
                "gossamer_net_peer_rpcs_sent", "Calls this node made to a peer.", labels=["peer"]
            ),
            "num_rpcs_received": CounterMetricFamily(
                "gossamer_net_peer_rpcs_received",
                "Calls a peer made to this node.",
                labels=["peer"],
            ),
            "num_errors": CounterMetricFamily(
                "gossamer_net_peer_rpc_errors",
                "Failed calls with a peer, either way.",
                labels=["peer"],
            ),
        }
        other = {name: folded.get(name, 0) for name in fields}
        for peer_id, traffic in sorted(peers.items()):
            for name, family in fields.items():
                if peer_id in named:
                    family.add_metric([peer_id], traffic.get(name, 0))
                else:
                    other[name] += traffic.get(name, 0)
        if len(peers) > len(named) or folded.get("num_peers", 0):
            for name, family in fields.items():
                family.add_metric([OTHER_PEERS], other[name])
        return list(fields.values())

    @staticmethod
    def _rpcs(counters: Mapping[str, Any]) -> list[Metric]:
        calls = CounterMetricFamily(
            "gossamer_net_rpcs", "Calls by method, made and served.", labels=["method"]
        )
        for method, count in sorted(counters.get("rpc_calls", {}).items()):
            calls.add_metric([method], count)
        latency = HistogramMetricFamily(
            "gossamer_net_rpc_duration_seconds",
            "Latency of calls this node made, by method.",
            labels=["method"],
        )
        bounds = [str(b) for b in LATENCY_BUCKETS_S] + ["+Inf"]
        for method, histogram in sorted(counters.get("rpc_latency", {}).items()):
            cumulative, buckets = 0, []
            for bound, count in zip(bounds, histogram["buckets"], strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric([method], buckets, histogram["total_s"])
        errors = CounterMetricFamily(
            "gossamer_net_errors", "Errors by kind (Gossamer error class).", labels=["kind"]
        )
        for kind, count in sorted(counters.get("errors", {}).items()):
            errors.add_metric([kind], count)
        families: list[Metric] = [calls, latency, errors]
        for key, name, help_text in (
            ("num_retries", "gossamer_net_retries", "Retried call attempts."),
            ("num_handshakes_refused", "gossamer_net_handshakes_refused", "Handshakes refused."),
            (
                "num_protocol_errors",
                "gossamer_net_protocol_errors",
                "Malformed, oversized or out-of-order messages received.",
            ),
        ):
            family = CounterMetricFamily(name, help_text)
            family.add_metric([], counters.get(key, 0))
            families.append(family)
        return families

    @staticmethod
    def _peers(live: LiveView, failures: int, named: set[str], limit: int) -> list[Metric]:
        families: list[Metric] = []
        for name, help_text, value in (
            ("gossamer_net_peers_known", "Peers with a valid record.", live.peers_known),
            (
                "gossamer_net_peers_connected",
                "Peers with an open connection.",
                live.peers_connected,
            ),
            (
                "gossamer_net_peers_relayed",
                "Known peers reachable only through a relay.",
                live.peers_relayed,
            ),
            (
                "gossamer_net_peers_alive",
                "Watched peers answering heartbeats.",
                sum(alive for _, alive, _ in live.liveness),
            ),
            (
                "gossamer_net_peers_gone",
                "Watched peers the failure detector reports gone.",
                sum(not alive for _, alive, _ in live.liveness),
            ),
        ):
            family = GaugeMetricFamily(name, help_text)
            family.add_metric([], value)
            families.append(family)
        up = GaugeMetricFamily(
            "gossamer_net_peer_up",
            "1 while a watched peer answers heartbeats, 0 once it is reported gone.",
            labels=["peer"],
        )
        # At most ``limit`` series (the peers with traffic labels first): a peer that watched
        # rotating groups had one for every peer it watched in the last 10 minutes. The rest
        # are in the alive and gone counts above.
        watched = sorted(live.liveness, key=lambda entry: (entry[0] not in named, entry[0]))
        for peer_id, alive, _ in watched[:limit]:
            up.add_metric([peer_id], 1.0 if alive else 0.0)
        detected = CounterMetricFamily(
            "gossamer_net_failures_detected",
            "Times a watched peer was reported gone by the failure detector.",
        )
        detected.add_metric([], failures)
        return [*families, up, detected]

    @staticmethod
    def _connections_and_relays(counters: Mapping[str, Any], live: LiveView) -> list[Metric]:
        connections = GaugeMetricFamily(
            "gossamer_net_connections", "Open connections by kind.", labels=["kind"]
        )
        for kind, count in sorted(counters.get("connections", {}).items()):
            connections.add_metric([kind], count)
        reachability = GaugeMetricFamily(
            "gossamer_net_reachability",
            "1 for how others reach this node now (direct, relayed or unknown).",
            labels=["state"],
        )
        for state in _REACHABILITY.values():
            reachability.add_metric([state], 1.0 if state == live.reachability else 0.0)
        relays = GaugeMetricFamily(
            "gossamer_net_relays", "Relays this node holds a reservation with."
        )
        relays.add_metric([], live.num_relays)
        reservations = GaugeMetricFamily(
            "gossamer_net_relay_reservations", "Peers holding a relay reservation on this node."
        )
        reservations.add_metric([], counters.get("relay_reservations", 0))
        relayed_bytes = CounterMetricFamily(
            "gossamer_net_relayed_bytes", "Bytes this node relayed for others, both directions."
        )
        relayed_bytes.add_metric([], sum(counters.get("relayed_bytes", {}).values()))
        families: list[Metric] = [connections, reachability, relays, reservations, relayed_bytes]
        for key, name, help_text in (
            ("relay_tunnels_opened", "gossamer_net_relay_tunnels", "Tunnels spliced as a relay."),
            ("num_relayed_dials", "gossamer_net_relayed_dials", "Connections via a relay."),
            (
                "num_direct_upgrades",
                "gossamer_net_direct_upgrades",
                "Relayed connections replaced by a direct path.",
            ),
            (
                "bulk_transfers_expired",
                "gossamer_net_bulk_transfers_expired",
                "Incoming bulk transfers dropped because their streams stalled.",
            ),
        ):
            family = CounterMetricFamily(name, help_text)
            family.add_metric([], counters.get(key, 0))
            families.append(family)
        return families


def register_net_metrics(
    registry: CollectorRegistry, node_thread: NodeThread, config: NetMetricsConfig | None = None
) -> NetMetricsCollector:
    """Export ``node_thread``'s node on ``registry``; call :meth:`~NetMetricsCollector.close`
    before the node stops.
    """
    config = config or NetMetricsConfig()
    counters = node_thread.node.counters

    async def read(node: Node) -> LiveView:
        return live_view(node)

    collector = NetMetricsCollector(
        counters.snapshot,
        lambda: node_thread.run(read, timeout_s=config.live_timeout_s),
        config,
    )

    async def observe(node: Node) -> None:
        node.detector.add_observer(collector.count_liveness_change)

    node_thread.run(observe, timeout_s=10)
    registry.register(collector)
    return collector
