"""Prometheus metrics of a peer, and the HTTP endpoint that serves them.

Every peer owns one :class:`PeerMetrics` with its own registry (several peers can live in one
process, as they do in tests). Names start with ``gossamer_``, carry their unit, counters end in
``_total``, and label sets are bounded (phases are a fixed list; remote peers are bounded by the
swarm's size). Recording a metric is a lock-protected increment: it never blocks training.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gossamer.obs.goodput import GoodputSnapshot, GoodputTracker
from gossamer.obs.trace import PHASES, Span

__all__ = [
    "BACKENDS",
    "ROUND_OUTCOMES",
    "MetricsServer",
    "PeerMetrics",
    "SwarmMetrics",
    "register_peer_info",
    "serve_metrics",
]


_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BACKENDS = ("p2p", "torch")
"""What averages a round with other peers: comm's all-reduce, or a torch.distributed group."""
ROUND_OUTCOMES = ("complete", "shrunk", "alone", "excluded")
"""How an averaging round ended for this peer: every expected peer contributed; some were
dropped or did not come; nobody else came; or the round closed before this peer arrived."""


def register_peer_info(registry: CollectorRegistry, peer_id: str) -> Gauge:
    """Register ``gossamer_peer_info{peer_id}`` (always 1) on ``registry``: what names a peer.

    A node that does not train (``gossamer peer start``) registers this and the network's
    metrics only; :class:`PeerMetrics` would add training series that say step 0 and loss NaN.
    """
    gauge = Gauge(
        "gossamer_peer_info",
        "Always 1; names this peer (its peer id), to match other peers' peer labels.",
        ["peer_id"],
        registry=registry,
    )
    gauge.labels(peer_id=peer_id).set(1)
    return gauge


class PeerMetrics:
    """The metrics of one peer: training, goodput, and (set from ``train/``) the swarm's rounds.

    The network layer's counters are added to :attr:`registry` by ``gossamer.net.metrics``.
    Every recording method is a lock-protected update of a pre-created series: none allocates a
    label child or blocks the caller.

    Args:
        goodput: the tracker whose figures are exported; a new one if None.
    """

    def __init__(self, goodput: GoodputTracker | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.goodput = goodput or GoodputTracker()
        r = self.registry
        self.peer_info: Gauge | None = None
        """``gossamer_peer_info{peer_id}``, registered by :meth:`set_peer_id`."""
        self.step = Gauge("gossamer_train_step", "Optimizer steps taken.", registry=r)
        self.loss = Gauge("gossamer_train_loss", "Training loss of the last step.", registry=r)
        self.loss.set(math.nan)
        self.validation_loss = Gauge(
            "gossamer_validation_loss", "Validation loss at the last evaluation.", registry=r
        )
        self.validation_loss.set(math.nan)
        self.tokens = Counter(
            "gossamer_train_tokens", "Training tokens processed by this peer.", registry=r
        )
        self.tokens_per_second = Gauge(
            "gossamer_train_tokens_per_second",
            "Training tokens per second of training time since this run started (set at each "
            "step's end: a peer held up in a round keeps its last figure).",
            registry=r,
        )
        self.phase_seconds = Counter(
            "gossamer_time_seconds",
            "Seconds spent per phase (compute, communication, waiting, checkpoint, ...).",
            ["phase"],
            registry=r,
        )
        self._phase_children = {phase: self.phase_seconds.labels(phase=phase) for phase in PHASES}
        self.checkpoint_seconds = Histogram(
            "gossamer_checkpoint_write_seconds",
            "Time to write one checkpoint.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.goodput_ratio = Gauge(
            "gossamer_goodput_ratio",
            "Kept tokens per wall second over this peer's compute-only token rate.",
            registry=r,
        )
        self.goodput_tokens_per_second = Gauge(
            "gossamer_goodput_tokens_per_second",
            "Kept training tokens per wall second.",
            registry=r,
        )
        self.goodput_ratio.set_function(lambda: self.goodput.snapshot().goodput_ratio)
        self.goodput_tokens_per_second.set_function(
            lambda: self.goodput.snapshot().goodput_tokens_per_s
        )
        r.register(_GoodputCollector(self.goodput))
        self.swarm: SwarmMetrics | None = None
        """The swarm's rounds, resyncs and state downloads, once :meth:`enable_swarm` ran."""

    def enable_swarm(self) -> SwarmMetrics:
        """Add the metrics of a peer that trains in a swarm (idempotent); a local run has none."""
        if self.swarm is None:
            self.swarm = SwarmMetrics(self.registry)
        return self.swarm

    def set_peer_id(self, peer_id: str) -> None:
        """Name this peer in ``gossamer_peer_info`` (once its identity is known).

        Registered only then, so a peer without an identity (local training) exports no name
        and is shown by its metrics address.
        """
        if self.peer_info is None:
            self.peer_info = register_peer_info(self.registry, peer_id)
            return
        self.peer_info.clear()
        self.peer_info.labels(peer_id=peer_id).set(1)

    def record_span(self, span: Span) -> None:
        """A :class:`~gossamer.obs.trace.SpanSink`: count the span's seconds under its phase.

        Only its exclusive seconds: those of spans nested in it are counted under their own
        phases, so no second is counted twice and the phases add up to at most the wall time.
        """
        child = self._phase_children.get(span.name)
        if child is not None:
            child.inc(span.own_s)
        if span.name == "compute":
            self.goodput.add_compute(span.own_s)
        elif span.name == "checkpoint":
            self.checkpoint_seconds.observe(span.duration_s)


class SwarmMetrics:
    """Metrics of a peer training in a swarm: averaging rounds, resyncs, state downloads.

    Recorded once per round or download, never per step.

    Args:
        registry: where the series are registered (a :class:`PeerMetrics`'s).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.outer_step = Gauge(
            "gossamer_outer_step", "Averaging rounds this peer's global state has seen.", registry=r
        )
        self.allreduce_seconds = Histogram(
            "gossamer_allreduce_duration_seconds",
            "Wall time of one averaging round from when the peer waits for it (formation the "
            "peer waits for included; formed while it trains, as by default, not).",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.compression_ratio = Gauge(
            "gossamer_allreduce_compression_ratio",
            "float32 bytes over encoded bytes of the last round's tensors (1: no compression).",
            registry=r,
        )
        self.group_size = Gauge(
            "gossamer_group_size", "Peers whose contributions were in the last round.", registry=r
        )
        self.rounds = Counter(
            "gossamer_averaging_rounds",
            "Averaging rounds by how they ended for this peer.",
            ["outcome"],
            registry=r,
        )
        self._round_children = {o: self.rounds.labels(outcome=o) for o in ROUND_OUTCOMES}
        self.backend_rounds = Counter(
            "gossamer_averaging_backend_rounds",
            "Rounds averaged with other peers, by what averaged them: p2p (comm's all-reduce over "
            "the peers' links) or torch (a torch.distributed group).",
            ["backend"],
            registry=r,
        )
        self._backend_children = {b: self.backend_rounds.labels(backend=b) for b in BACKENDS}
        self.round_peers_dropped = Counter(
            "gossamer_round_peers_dropped",
            "Peers dropped from a round this peer was in (failed mid-round).",
            registry=r,
        )
        self.round_peers_missing = Counter(
            "gossamer_round_peers_missing",
            "Peers of the run that did not come to a round this peer was in (gone or late).",
            registry=r,
        )
        self.round_bytes_sent = Counter(
            "gossamer_averaging_sent_bytes", "Bytes this peer sent in averaging rounds.", registry=r
        )
        self.round_bytes_received = Counter(
            "gossamer_averaging_received_bytes",
            "Bytes this peer received in averaging rounds.",
            registry=r,
        )
        self.resyncs = Counter(
            "gossamer_resyncs",
            "Times this peer replaced its state with the swarm's (behind, excluded, or differed).",
            registry=r,
        )
        self.state_download_seconds = Histogram(
            "gossamer_state_download_duration_seconds",
            "Time to download the global state from donors (newcomer sync and resyncs).",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.state_download_bytes = Counter(
            "gossamer_state_download_bytes", "Bytes of state downloaded from donors.", registry=r
        )

    def record_round(
        self,
        *,
        seconds: float,
        group_size: int,
        outcome: str,
        bytes_sent: int,
        bytes_received: int,
        compression_ratio: float,
        num_dropped: int = 0,
        num_missing: int = 0,
        backend: str = "",
    ) -> None:
        """Count one averaging round (``outcome`` is one of :data:`ROUND_OUTCOMES`; ``backend``
        one of :data:`BACKENDS`, or '' when nobody else was averaged with)."""
        self._round_children[outcome].inc()
        if backend:
            self._backend_children[backend].inc()
        self.allreduce_seconds.observe(seconds)
        self.group_size.set(group_size)
        self.compression_ratio.set(compression_ratio)
        self.round_bytes_sent.inc(bytes_sent)
        self.round_bytes_received.inc(bytes_received)
        if num_dropped:
            self.round_peers_dropped.inc(num_dropped)
        if num_missing:
            self.round_peers_missing.inc(num_missing)

    def record_state_download(self, seconds: float, num_bytes: int) -> None:
        """Count one download of the global state from donors."""
        self.state_download_seconds.observe(seconds)
        self.state_download_bytes.inc(num_bytes)


class _GoodputCollector(Collector):
    """The goodput tracker's totals, read when scraped (nothing is done per step)."""

    def __init__(self, tracker: GoodputTracker) -> None:
        self._tracker = tracker

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self._tracker.snapshot())

    @staticmethod
    def _families(snap: GoodputSnapshot | None) -> list[Metric]:
        # A gauge: a step counted as kept is taken back when a later failure rolls it back,
        # and a counter that goes down reads as a reset to Prometheus (rate() would spike).
        kept = GaugeMetricFamily(
            "gossamer_goodput_kept_tokens",
            "Tokens of steps whose result was kept (the numerator of goodput); goes down when "
            "a later failure rolls steps back.",
        )
        processed = CounterMetricFamily(
            "gossamer_goodput_processed_tokens",
            "Every token pushed through the model (kept + discarded).",
        )
        discarded = CounterMetricFamily(
            "gossamer_goodput_discarded_tokens",
            "Tokens of steps whose result was thrown away (excluded rounds, catch-ups).",
        )
        compute = GaugeMetricFamily(
            "gossamer_compute_tokens_per_second",
            "This peer's compute-only rate: tokens per second of compute, no communication.",
        )
        wall = GaugeMetricFamily(
            "gossamer_goodput_wall_seconds", "Wall seconds over which goodput is measured."
        )
        if snap is not None:
            kept.add_metric([], snap.tokens_kept)
            processed.add_metric([], snap.tokens_processed)
            discarded.add_metric([], snap.tokens_discarded)
            compute.add_metric([], snap.compute_tokens_per_s)
            wall.add_metric([], snap.wall_s)
        return [kept, processed, discarded, compute, wall]


@dataclass(frozen=True, kw_only=True, slots=True)
class MetricsServer:
    """A running ``/metrics`` endpoint."""

    host: str
    """The address it listens on."""
    port: int
    """The port it listens on (the real one when 0 was asked for)."""
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        """Where to scrape (an IPv6 host in brackets, as a URL needs it)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and wait for the server thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(
    registry: CollectorRegistry, *, host: str = "127.0.0.1", port: int = 0
) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` from a background thread.

    Args:
        registry: what to serve.
        host: the address to bind; loopback unless the peer should be scraped from outside.
        port: the port; 0 picks a free one (read it back from the result).
    """
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(host=host, port=server.server_port, _server=server, _thread=thread)
