"""A killed and a paused peer leave `peers_connected` and are counted as failures, in time.

Two `gossamer peer start` processes on loopback; an observer node in this process exports its
network metrics (as a swarm peer does) and watches both with heartbeats. One is SIGKILLed, the
other SIGSTOPped: a paused peer keeps its TCP connection open, so only the failure detector can
tell it is gone. Both must leave `gossamer_net_peers_connected` and be counted in
`gossamer_net_failures_detected_total` within the heartbeat timeout plus slack.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from prometheus_client import CollectorRegistry

from gossamer.net.bridge import NodeThread
from gossamer.net.config import DhtConfig, HeartbeatConfig, NodeConfig
from gossamer.net.identity import load_or_create_identity
from gossamer.net.metrics import register_net_metrics
from gossamer.net.node import Node

HEARTBEAT = HeartbeatConfig(interval_s=0.5, timeout_s=2.5)
SLACK_S = 1.5  # two peer processes and this test share two cores
T = TypeVar("T")


def wait_for(condition: Callable[[], T | None], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout_s} s")


class PeerProcess:
    """A `gossamer peer start` child; its address is read from its status file."""

    def __init__(self, tmp: Path, name: str, bootstrap: str | None) -> None:
        key = tmp / f"{name}.pem"
        self.peer_id = load_or_create_identity(key).peer_id
        self.status = tmp / f"{name}.json"
        command = [
            sys.executable, "-m", "gossamer.cli", "peer", "start",
            "--listen", "127.0.0.1:0", "--key-file", str(key), "--status-file", str(self.status),
            "--no-check-reachability",
        ]  # fmt: skip
        if bootstrap:
            command += ["--bootstrap", bootstrap]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

    def address(self) -> str:
        def read() -> str | None:
            try:
                return str(json.loads(self.status.read_text())["addresses"][0])
            except (OSError, ValueError, KeyError, IndexError):
                return None

        return f"{self.peer_id}@{wait_for(read, 30, 'peer status')}"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
        self.process.wait(10)


@pytest.fixture
def victims(tmp_path: Path) -> Iterator[list[PeerProcess]]:
    started: list[PeerProcess] = []
    try:
        started.append(PeerProcess(tmp_path, "killed", None))
        started.append(PeerProcess(tmp_path, "paused", started[0].address()))
        yield started
    finally:
        for peer in started:
            peer.stop()


def test_killed_and_paused_peers_leave_connected_and_count_as_failures(
    victims: list[PeerProcess],
) -> None:
    killed, paused = victims
    config = NodeConfig(
        listen_address="127.0.0.1:0",
        bootstrap=(killed.address(), paused.address()),
        heartbeat=HEARTBEAT,
        dht=DhtConfig(refresh_interval_s=1.0, record_ttl_s=20, republish_interval_s=5),
    )
    registry = CollectorRegistry()
    with NodeThread(config) as node_thread:
        collector = register_net_metrics(registry, node_thread)
        with contextlib.ExitStack() as stack:
            stack.callback(collector.close)

            def value(name: str) -> float:
                sample = registry.get_sample_value(name)
                assert sample is not None, name
                return sample

            async def watch(node: Node) -> None:
                for peer in victims:
                    node.detector.watch(peer.peer_id)
                    await node.detector.wait_for(peer.peer_id, alive=True, timeout_s=10)

            node_thread.run(watch, timeout_s=30)
            wait_for(
                lambda: value("gossamer_net_peers_connected") == 2, 20, "both victims connected"
            )
            assert value("gossamer_net_peers_alive") == 2
            assert value("gossamer_net_failures_detected_total") == 0

            killed.process.send_signal(signal.SIGKILL)
            os.kill(paused.process.pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            limit_s = HEARTBEAT.timeout_s + SLACK_S
            wait_for(
                lambda: value("gossamer_net_peers_connected") == 0,
                limit_s + 10,
                "victims gone from peers_connected",
            )
            took_s = time.monotonic() - stopped_at
            assert took_s <= limit_s, f"connected dropped after {took_s:.2f} s (limit {limit_s})"
            wait_for(lambda: value("gossamer_net_failures_detected_total") == 2, 2, "both failures")
            assert value("gossamer_net_peers_gone") == 2
            assert value("gossamer_net_peers_alive") == 0
