"""A killed peer shows as gone in a survivor's Prometheus metrics within the failure-detection time.

Real `gossamer train` swarm processes on loopback serve `/metrics` on port 0 (the URL is in their
status files). Once a survivor watches the victim (after their first averaging round), the victim
is SIGKILLed and the survivor's metrics are scraped until they report it gone.
"""

from __future__ import annotations

import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from swarm_processes import SwarmProcesses

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


def _peers(root: Path) -> SwarmProcesses:
    return SwarmProcesses(
        root,
        run_name="metrics-gone",
        extra_args=[
            "--metrics-port",
            "0",
            "--train.max-steps",
            "100000",
            "--train.batch-size",
            "2",
            "--train.eval-batches",
            "1",
            "--checkpoint.every-steps",
            "0",
        ],
    )


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[SwarmProcesses]:
    running = _peers(tmp_path)
    try:
        yield running
    finally:
        running.stop()


def test_killed_peer_is_gone_in_survivor_metrics_within_detection_time(
    peers: SwarmProcesses,
) -> None:
    survivor_started = time.monotonic()
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
    # The time split: a round's group formation is waiting, counted once (phases <= wall time).
    phase_s = {
        labels[0][1]: value
        for (name, labels), value in before.items()
        if name == "gossamer_time_seconds_total"
    }
    assert phase_s["waiting"] > 0
    assert phase_s["communication"] > 0
    assert phase_s["compute"] > 0
    assert sum(phase_s.values()) <= time.monotonic() - survivor_started
    alive_before = before[("gossamer_net_peers_alive", ())]
    connected_before = before[("gossamer_net_peers_connected", ())]
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
    assert after[("gossamer_net_peers_connected", ())] == connected_before - 1
    assert after[("gossamer_net_peers_gone", ())] >= 1
    assert after[("gossamer_net_failures_detected_total", ())] == failures_before + 1
    assert peers.processes["survivor"].poll() is None
