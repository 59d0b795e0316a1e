"""Prometheus metrics of a peer, and the HTTP endpoint that serves them.

Every peer owns one :class:`PeerMetrics` with its own registry (several peers can live in one
process, as they do in tests). Names start with ``gossamer_``, carry their unit, counters end in
``_total``, and label sets are bounded (phases are a fixed list; remote peers are bounded by the
swarm's size). Recording a metric is a lock-protected increment: it never blocks training.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from gossamer.obs.goodput import GoodputTracker
from gossamer.obs.trace import PHASES, Span

__all__ = ["MetricsServer", "PeerMetrics", "serve_metrics"]


class PeerMetrics:
    """The metrics of one peer's training: loss, throughput, time split, goodput.

    Args:
        goodput: the tracker whose figures are exported; a new one if None.
    """

    def __init__(self, goodput: GoodputTracker | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.goodput = goodput or GoodputTracker()
        r = self.registry
        self.step = Gauge("gossamer_train_step", "Optimizer steps taken.", registry=r)
        self.loss = Gauge("gossamer_train_loss", "Training loss of the last step.", registry=r)
        self.validation_loss = Gauge(
            "gossamer_validation_loss", "Validation loss at the last evaluation.", registry=r
        )
        self.tokens = Counter(
            "gossamer_train_tokens", "Training tokens processed by this peer.", registry=r
        )
        self.tokens_per_second = Gauge(
            "gossamer_train_tokens_per_second",
            "Training tokens per second of training time (recent).",
            registry=r,
        )
        self.phase_seconds = Counter(
            "gossamer_time_seconds",
            "Seconds spent per phase (compute, communication, waiting, checkpoint, ...).",
            ["phase"],
            registry=r,
        )
        for phase in PHASES:
            self.phase_seconds.labels(phase=phase)
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

    def record_span(self, span: Span) -> None:
        """A :class:`~gossamer.obs.trace.SpanSink`: count the span's seconds under its phase."""
        if span.name in PHASES:
            self.phase_seconds.labels(phase=span.name).inc(span.duration_s)
        if span.name == "compute":
            self.goodput.add_compute(span.duration_s)
        elif span.name == "checkpoint":
            self.checkpoint_seconds.observe(span.duration_s)


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
        """Where to scrape."""
        return f"http://{self.host}:{self.port}/metrics"

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
