"""`gossamer peer start --metrics-port 0`: two peer processes on loopback serve network metrics."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class PeerProcess:
    """A `gossamer peer start` process whose output lines are read by a thread."""

    def __init__(self, tmp: Path, name: str, bootstrap: str | None = None) -> None:
        command = [
            sys.executable, "-m", "gossamer.cli", "peer", "start",
            "--listen", "127.0.0.1:0", "--key-file", str(tmp / f"{name}.pem"),
            "--no-check-reachability", "--metrics-port", "0",
        ]  # fmt: skip
        if bootstrap:
            command += ["--bootstrap", bootstrap]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def wait_line(self, pattern: str, timeout_s: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        seen = []
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r} within {timeout_s} s: {seen[-20:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def peer_processes(tmp_path: Path) -> Iterator[list[PeerProcess]]:
    started: list[PeerProcess] = []
    try:
        yield started
    finally:
        for peer in started:
            peer.stop()


def test_peer_start_serves_network_metrics(
    tmp_path: Path, peer_processes: list[PeerProcess]
) -> None:
    first = PeerProcess(tmp_path, "first")
    peer_processes.append(first)
    first_url = first.wait_line(r"metrics at (http://\S+)").group(1)
    listening = first.wait_line(r"peer (\S+) listening on (\S+)")
    first_id, first_address = listening.group(1), listening.group(2)
    second = PeerProcess(tmp_path, "second", bootstrap=f"{first_id}@{first_address}")
    peer_processes.append(second)
    second_url = second.wait_line(r"metrics at (http://\S+)").group(1)
    second_id = second.wait_line(r"peer (\S+) listening on").group(1)

    deadline = time.monotonic() + 30
    samples = scrape(second_url)
    while samples.get(("gossamer_net_peers_known", ()), 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)  # polling a condition with a deadline
        samples = scrape(second_url)
    assert samples[("gossamer_peer_info", (("peer_id", second_id),))] == 1
    # It trains nothing: no training series (they said step 0 and loss NaN).
    assert not [name for name, _ in samples if name.startswith(("gossamer_train", "gossamer_good"))]
    assert samples[("gossamer_net_peers_known", ())] >= 1
    assert samples[("gossamer_net_sent_bytes_total", (("peer", first_id),))] > 0
    assert samples[("gossamer_net_received_bytes_total", (("peer", first_id),))] > 0
    assert samples[("gossamer_net_retries_total", ())] >= 0
    assert any(name == "gossamer_net_rpcs_total" for name, _ in samples)
    assert sum(v for (n, _), v in samples.items() if n == "gossamer_net_reachability") == 1
    # The bootstrap peer sees the newcomer's calls.
    first_samples = scrape(first_url)
    assert first_samples[("gossamer_peer_info", (("peer_id", first_id),))] == 1
    assert first_samples[("gossamer_net_peer_rpcs_received_total", (("peer", second_id),))] > 0
