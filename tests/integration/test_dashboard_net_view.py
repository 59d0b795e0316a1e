"""The DHT-backed SwarmSource against real nodes on loopback: peers found, a stopped one gone."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest

from gossamer.net.bridge import NodeThread
from gossamer.net.config import NodeConfig
from gossamer.net.swarm_view import NetSwarmSource, NetSwarmViewConfig
from gossamer.obs.dashboard import DashboardService
from gossamer.obs.dashboard.source import SwarmSnapshot

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
