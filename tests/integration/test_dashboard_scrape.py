"""The dashboard's scrape of real ``/metrics`` endpoints on 127.0.0.1: a hostile one, a busy one."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from collections.abc import Iterator

import pytest

from gossamer.net.bridge import NodeThread
from gossamer.net.config import NodeConfig
from gossamer.net.metrics import NetMetricsConfig, register_net_metrics
from gossamer.obs.dashboard.scrape import ScrapeConfig, ScrapeSwarmSource
from gossamer.obs.dashboard.source import SwarmSnapshot
from gossamer.obs.metrics import MetricsServer, PeerMetrics, serve_metrics

_HOSTILE_PAGE = ("# " + " " * 250_000 + "x\n").encode()
"""A comment prometheus_client's parser takes about a second over (quadratic: 1.28 MB, 24 s)."""


class _HostilePage(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(_HOSTILE_PAGE)))
        self.end_headers()
        self.wfile.write(_HOSTILE_PAGE)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def hostile_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HostilePage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def honest() -> Iterator[MetricsServer]:
    metrics = PeerMetrics()
    metrics.set_peer_id("honest-peer")
    metrics.step.set(7)
    server = serve_metrics(metrics.registry)
    try:
        yield server
    finally:
        server.close()


def test_a_hostile_page_never_holds_the_dashboard_s_loop(
    hostile_url: str, honest: MetricsServer
) -> None:
    # Its page was parsed on the event loop, in time quadratic in a line's length: /api/state
    # froze for everyone, and honest peers showed as gone.
    source = ScrapeSwarmSource(ScrapeConfig(urls=(honest.url, hostile_url)))

    async def snapshot_while_ticking() -> tuple[SwarmSnapshot, float, float]:
        longest_gap_s = 0.0
        done = asyncio.Event()

        async def tick() -> None:
            nonlocal longest_gap_s
            last = time.monotonic()
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                longest_gap_s = max(longest_gap_s, now - last)
                last = now

        ticker = asyncio.create_task(tick())
        started = time.monotonic()
        try:
            snapshot = await source.snapshot()
        finally:
            done.set()
            await ticker
        return snapshot, time.monotonic() - started, longest_gap_s

    snapshot, took_s, longest_gap_s = asyncio.run(snapshot_while_ticking())
    assert longest_gap_s < 0.5, f"the loop was held {longest_gap_s:.2f} s"
    assert took_s < ScrapeConfig(urls=("x",)).snapshot_wait_s + 1.0
    statuses = {p.peer_id: p.status for p in snapshot.peers}
    assert statuses["honest-peer"] == "alive"
    assert snapshot.samples["honest-peer"].step == 7.0


def test_a_busy_peer_serving_its_last_view_is_shown_alive() -> None:
    # A peer whose node's loop is busy answers /metrics after NetMetricsConfig.live_timeout_s
    # (1 s) with its last view; at a scrape deadline of 1 s it was shown as gone.
    with NodeThread(NodeConfig(listen_address="127.0.0.1:0")) as node_thread:
        metrics = PeerMetrics()
        metrics.set_peer_id(node_thread.node.peer_id)
        collector = register_net_metrics(metrics.registry, node_thread)
        server = serve_metrics(metrics.registry)
        release = threading.Event()
        busy = threading.Event()

        def hold_the_loop() -> None:
            busy.set()
            release.wait(30)

        try:
            node_thread.call_soon(hold_the_loop)
            assert busy.wait(10)
            source = ScrapeSwarmSource(ScrapeConfig(urls=(server.url,)))
            started = time.monotonic()
            snapshot = asyncio.run(source.snapshot())
            took_s = time.monotonic() - started
        finally:
            release.set()
            collector.close()
            server.close()
    assert took_s > NetMetricsConfig().live_timeout_s  # it was served its last view
    (peer,) = snapshot.peers
    assert (peer.peer_id, peer.status) == (node_thread.node.peer_id, "alive")
