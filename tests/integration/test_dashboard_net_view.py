"""The DHT-backed SwarmSource against real nodes on loopback: peers found, a stopped one gone."""

from __future__ import annotations

import asyncio
import http.server
import logging
import socket
import threading
import time

import pytest
from prometheus_client import generate_latest

from gossamer.net.bridge import NodeThread
from gossamer.net.config import NodeConfig
from gossamer.net.swarm_view import NetSwarmSource, NetSwarmViewConfig
from gossamer.obs.dashboard import DashboardService
from gossamer.obs.dashboard.exposition import MAX_LINE_CHARS
from gossamer.obs.dashboard.source import SwarmSnapshot
from gossamer.obs.metrics import PeerMetrics

GONE_AFTER_S = 1.5


def _statuses(snapshot: SwarmSnapshot) -> dict[str, str]:
    return {p.peer_id: p.status for p in snapshot.peers}


def _wait_for_statuses(
    source: NetSwarmSource, wanted: dict[str, str], timeout_s: float
) -> SwarmSnapshot:
    deadline = time.monotonic() + timeout_s
    while True:
        snapshot = asyncio.run(source.snapshot())
        seen = _statuses(snapshot)
        if all(seen.get(peer) == status for peer, status in wanted.items()):
            return snapshot
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout_s} s: wanted {wanted}, saw {seen}")
        time.sleep(0.1)  # pacing between looks; the loop ends on the condition or the deadline


def test_net_view_finds_peers_and_reports_a_stopped_one_gone() -> None:
    with NodeThread(NodeConfig(listen_address="127.0.0.1:0")) as first:
        address = first.node.addresses[0]
        second = NodeThread(NodeConfig(listen_address="127.0.0.1:0", bootstrap=(address,)))
        second.start()
        try:
            config = NetSwarmViewConfig(
                bootstrap=(address,), listen_address="127.0.0.1:0", gone_after_s=GONE_AFTER_S
            )
            with NetSwarmSource(config) as source:
                ids = {first.node.peer_id: "alive", second.node.peer_id: "alive"}
                snapshot = _wait_for_statuses(source, ids, timeout_s=15)
                views = {p.peer_id: p for p in snapshot.peers}
                assert views[first.node.peer_id].address == address
                assert views[second.node.peer_id].last_seen_wall_s is not None
                gone_id = second.node.peer_id
                second.stop()
                stopped_at = time.monotonic()
                _wait_for_statuses(source, {gone_id: "gone"}, timeout_s=GONE_AFTER_S + 3)
                assert time.monotonic() - stopped_at <= GONE_AFTER_S + 3
                assert _statuses(asyncio.run(source.snapshot()))[first.node.peer_id] == "alive"
        finally:
            second.stop()


def test_a_bootstrap_peer_that_does_not_answer_shows_on_the_page_and_in_the_log_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The page said "No peers yet" and no error, while the log had a warning at every poll.
    with socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))  # bound, not listening: a connection is refused
        address = f"127.0.0.1:{refusing.getsockname()[1]}"
        config = NetSwarmViewConfig(
            bootstrap=(address,), listen_address="127.0.0.1:0", look_timeout_s=2.0
        )
        with NetSwarmSource(config) as source:
            service = DashboardService(source)
            with caplog.at_level(logging.DEBUG, logger="gossamer.net.swarm_view"):
                for _ in range(3):
                    asyncio.run(service.poll_once())
            error = service.state()["error"] or ""
    assert error.startswith("no bootstrap peer answered: " + address), error
    warnings = [
        r
        for r in caplog.records
        if r.name == "gossamer.net.swarm_view" and r.levelno >= logging.WARNING
    ]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


def _serve_page(page: bytes) -> http.server.ThreadingHTTPServer:
    """An endpoint on 127.0.0.1 (port 0) that answers every GET with ``page``."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_why_a_peer_s_page_was_read_in_part_shows_with_the_peer_found_through_the_dht() -> None:
    # The peer's view was rebuilt from the DHT's without the scrape's `problem`: with
    # --bootstrap and --scrape, why its page was not read whole never showed.
    with NodeThread(NodeConfig(listen_address="127.0.0.1:0")) as node_thread:
        peer_id = node_thread.node.peer_id
        metrics = PeerMetrics()
        metrics.set_peer_id(peer_id)
        metrics.step.set(5)
        overlong = 'gossamer_net_sent_bytes_total{peer="' + "x" * MAX_LINE_CHARS + '"} 1\n'
        server = _serve_page(generate_latest(metrics.registry) + overlong.encode())
        try:
            config = NetSwarmViewConfig(
                bootstrap=(node_thread.node.addresses[0],),
                listen_address="127.0.0.1:0",
                metrics_urls=(f"http://127.0.0.1:{server.server_port}/metrics",),
            )
            with NetSwarmSource(config) as source:
                deadline = time.monotonic() + 15
                while True:
                    snapshot = asyncio.run(source.snapshot())
                    views = {p.peer_id: p for p in snapshot.peers}
                    if peer_id in views and peer_id in snapshot.samples:
                        break
                    assert time.monotonic() < deadline, f"never seen: {views}"
                    time.sleep(0.1)  # pacing between looks; ends on the condition or deadline
        finally:
            server.shutdown()
            server.server_close()
    view = views[peer_id]
    assert len(snapshot.peers) == 1  # the DHT's view and the scraped one are one peer
    assert view.metrics_url is not None
    assert snapshot.samples[peer_id].step == 5.0
    assert view.problem == f"1 line(s) over {MAX_LINE_CHARS:,} characters left out"
