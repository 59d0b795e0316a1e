"""A killed peer shows as gone in a survivor's Prometheus metrics within the failure-detection time.

Real `gossamer train` swarm processes on loopback serve `/metrics` on port 0 (the URL is in their
status files). Once a survivor watches the victim (after their first averaging round), the victim
is SIGKILLed and the survivor's metrics are scraped until they report it gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

HEARTBEAT_TIMEOUT_S = 2.5  # gossamer.train.swarm's heartbeat timeout for swarm peers
SCRAPE_INTERVAL_S = 0.25
SLACK_S = 1.5  # two busy training processes share two cores with this test

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class Peers:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[Any] = []
        (root / "corpus.txt").write_text("def f(x):\n    return x * 2\n" * 400)

    def start(self, name: str, bootstrap: str | None = None) -> None:
        command = [
            sys.executable, "-m", "gossamer.cli", "--verbose", "train",
            "--name", "metrics-gone",
            "--metrics-port", "0",
            "--model.num-layers", "1", "--model.num-heads", "2",
            "--model.width", "32", "--model.context", "32",
            "--data.source", "text", "--data.path", str(self.root / "corpus.txt"),
            "--train.max-steps", "100000", "--train.batch-size", "2",
            "--train.eval-every", "0", "--train.eval-batches", "1",
            "--train.num-threads", "1",
            "--swarm.strategy", "diloco", "--swarm.inner-steps", "5",
            "--swarm.join-window-s", "8",
            "--swarm.status-file", str(self.root / f"{name}.json"),
            "--checkpoint.directory", str(self.root / name),
            "--checkpoint.every-steps", "0",
        ]  # fmt: skip
        if bootstrap:
            command += ["--bootstrap", bootstrap]
        log = (self.root / f"{name}.log").open("ab")
        self._logs.append(log)
        self.processes[name] = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )

    def status(self, name: str) -> dict[str, Any]:
        try:
            status: dict[str, Any] = json.loads((self.root / f"{name}.json").read_text())
        except (OSError, ValueError):
            return {}
        return status

    def wait_for(self, condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.1)  # polling interval of a condition with a deadline
        logs = {
            n: (self.root / f"{n}.log").read_text(errors="replace")[-2000:] for n in self.processes
        }
        raise AssertionError(f"{what} within {timeout_s} s; logs: {logs}")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        for log in self._logs:
            log.close()


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[Peers]:
    running = Peers(tmp_path)
    try:
        yield running
    finally:
        running.stop()


def test_killed_peer_is_gone_in_survivor_metrics_within_detection_time(peers: Peers) -> None:
    peers.start("survivor")
    address = peers.wait_for(lambda: peers.status("survivor").get("address"), 60, "listening")
    peers.start("victim", address)
    url = peers.wait_for(lambda: peers.status("survivor").get("metrics_url"), 30, "metrics url")
    victim_id = peers.wait_for(lambda: peers.status("victim").get("peer_id"), 60, "victim up")
    survivor_id = peers.status("survivor")["peer_id"]
    up = ("gossamer_net_peer_up", (("peer", victim_id),))

    def watched_and_averaged() -> Samples | None:
        samples = scrape(url)
        rounds = samples.get(("gossamer_averaging_rounds_total", (("outcome", "complete"),)), 0)
        return samples if samples.get(up) == 1.0 and rounds >= 1 else None

    before = peers.wait_for(watched_and_averaged, 90, "survivor watching the victim after a round")
    # What a scrape of a training swarm peer says (the metric set, with sensible values).
    assert before[("gossamer_peer_info", (("peer_id", survivor_id),))] == 1.0
    assert before[("gossamer_net_sent_bytes_total", (("peer", victim_id),))] > 0
    assert before[("gossamer_net_received_bytes_total", (("peer", victim_id),))] > 0
    assert before[("gossamer_net_peers_known", ())] >= 1
    assert before[("gossamer_net_peers_connected", ())] >= 1
    assert before[("gossamer_net_peers_alive", ())] >= 1
    assert before[("gossamer_group_size", ())] == 2
    assert before[("gossamer_allreduce_duration_seconds_count", ())] >= 1
    assert before[("gossamer_allreduce_compression_ratio", ())] == pytest.approx(1.0)
    assert before[("gossamer_resyncs_total", ())] == 0
    assert before[("gossamer_train_step", ())] >= 5
    assert 0 < before[("gossamer_goodput_ratio", ())] <= 1.0
    assert any(name == "gossamer_net_rpc_duration_seconds_count" for name, _ in before)
    alive_before = before[("gossamer_net_peers_alive", ())]
    failures_before = before[("gossamer_net_failures_detected_total", ())]

    victim = peers.processes["victim"]
    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    victim.wait(timeout=10)

    def gone() -> Samples | None:
        samples = scrape(url)
        return samples if samples.get(up) == 0.0 else None

    limit_s = HEARTBEAT_TIMEOUT_S + SCRAPE_INTERVAL_S + SLACK_S
    deadline = killed_at + limit_s + 10  # to report how late, not only that it was
    after: Samples | None = None
    while after is None and time.monotonic() < deadline:
        after = gone()
        if after is None:
            time.sleep(SCRAPE_INTERVAL_S)  # the scrape interval of this test's "Prometheus"
    took_s = time.monotonic() - killed_at
    assert after is not None, f"victim not reported gone within {limit_s + 10:.1f} s"
    assert took_s <= limit_s, f"reported gone after {took_s:.2f} s (limit {limit_s:.2f} s)"
    assert after[("gossamer_net_peers_alive", ())] == alive_before - 1
    assert after[("gossamer_net_peers_gone", ())] >= 1
    assert after[("gossamer_net_failures_detected_total", ())] == failures_before + 1
    assert peers.processes["survivor"].poll() is None
