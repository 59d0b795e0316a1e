"""Peer metrics in memory: the network collector, swarm rounds, goodput, the demo's aggregate."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gossamer.core.clock import FakeClock
from gossamer.core.errors import DeadlineExceededError
from gossamer.net.counters import RELAYED_OTHERS, NetCounters
from gossamer.net.metrics import OTHER_PEERS, LiveView, NetMetricsCollector, NetMetricsConfig
from gossamer.obs.goodput import GoodputTracker
from gossamer.obs.metrics import PeerMetrics
from gossamer.train.averaging import AverageOutcome
from gossamer.train.demo_swarm import swarm_goodput
from gossamer.train.swarm_observed_averager import ObservedAverager


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class _Live:
    """A scripted live reader: returns views in turn, or raises when told to."""

    def __init__(self) -> None:
        self.view = LiveView()
        self.fail = False
        self.calls = 0

    def __call__(self) -> LiveView:
        self.calls += 1
        if self.fail:
            raise DeadlineExceededError("node work did not finish within 1.0 s")
        return self.view


def _collector(
    counters: NetCounters, live: _Live, **config: Any
) -> tuple[NetMetricsCollector, CollectorRegistry]:
    registry = CollectorRegistry()
    collector = NetMetricsCollector(counters.snapshot, live, NetMetricsConfig(**config))
    registry.register(collector)
    return collector, registry


def test_net_counters_are_exported_with_prometheus_names() -> None:
    counters = NetCounters()
    counters.sent("peer-a", 1000)
    counters.received("peer-a", 250)
    counters.call_made("peer-a", "/gossamer.Dht/FindNode", 0.003, ok=True)
    counters.call_made("peer-a", "/gossamer.Dht/FindNode", 0.2, ok=False)
    counters.call_made("peer-a", "/gossamer.Bulk/Push", 42.0, ok=True)  # a long transfer
    counters.call_served("peer-b", "/gossamer.Dht/Ping")
    counters.error(DeadlineExceededError("late"))
    counters.num_retries = 3
    counters.connections["direct"] = 2
    live = _Live()
    live.view = LiveView(peers_known=4, peers_connected=2, peers_relayed=1, reachability="direct")
    _, registry = _collector(counters, live)
    s = _samples(registry)
    assert s[("gossamer_net_sent_bytes_total", (("peer", "peer-a"),))] == 1000
    assert s[("gossamer_net_received_bytes_total", (("peer", "peer-a"),))] == 250
    assert s[("gossamer_net_peer_rpc_errors_total", (("peer", "peer-a"),))] == 1
    assert s[("gossamer_net_rpcs_total", (("method", "/gossamer.Dht/FindNode"),))] == 2
    method = (("method", "/gossamer.Dht/FindNode"),)
    assert s[("gossamer_net_rpc_duration_seconds_count", method)] == 2
    assert s[("gossamer_net_rpc_duration_seconds_sum", method)] == pytest.approx(0.203)
    assert s[("gossamer_net_rpc_duration_seconds_bucket", (("le", "0.005"), *method))] == 1
    assert s[("gossamer_net_rpc_duration_seconds_bucket", (("le", "+Inf"), *method))] == 2
    push = (("method", "/gossamer.Bulk/Push"),)  # (buckets ended at 5 s: all of it was +Inf)
    assert s[("gossamer_net_rpc_duration_seconds_bucket", (("le", "30.0"), *push))] == 0
    assert s[("gossamer_net_rpc_duration_seconds_bucket", (("le", "60.0"), *push))] == 1
    assert s[("gossamer_net_errors_total", (("kind", "DeadlineExceededError"),))] == 1
    assert s[("gossamer_net_retries_total", ())] == 3
    assert s[("gossamer_net_connections", (("kind", "direct"),))] == 2
    assert s[("gossamer_net_peers_known", ())] == 4
    assert s[("gossamer_net_peers_connected", ())] == 2
    assert s[("gossamer_net_peers_relayed", ())] == 1
    assert s[("gossamer_net_reachability", (("state", "direct"),))] == 1
    assert s[("gossamer_net_reachability", (("state", "relayed"),))] == 0


def test_the_per_peer_table_is_bounded_and_folded_traffic_still_counted() -> None:
    # Every peer id ever seen kept an entry and every scrape sorted them all: 300,000 ids took
    # 62 MiB and 7.3 s per scrape.
    counters = NetCounters(max_peers_counted=100)
    for i in range(1000):
        counters.sent(f"peer-{i}", i)
        counters.call_served(f"peer-{i}", "/gossamer.Dht/Ping")
    assert len(counters.peers) <= 100
    assert "peer-999" in counters.peers  # the busiest stay counted one by one
    _, registry = _collector(counters, _Live(), max_peer_labels=3)
    s = _samples(registry)
    sent = {
        labels[0][1]: value
        for (name, labels), value in s.items()
        if name == "gossamer_net_sent_bytes_total"
    }
    assert set(sent) == {"peer-999", "peer-998", "peer-997", OTHER_PEERS}
    assert sum(sent.values()) == sum(range(1000))
    served = sum(
        value for (name, _), value in s.items() if name == "gossamer_net_peer_rpcs_received_total"
    )
    assert served == 1000


def test_bytes_relayed_keep_a_bounded_table_and_their_total() -> None:
    # A relay kept a key for every peer it ever served.
    counters = NetCounters(max_peers_counted=100)
    for i in range(1000):
        counters.relayed(f"peer-{i}", i)
    counters.relayed("peer-5", 1)  # one counted one by one goes on being counted so
    assert len(counters.relayed_bytes) == 101
    assert counters.relayed_bytes["peer-5"] == 6
    assert counters.relayed_bytes[RELAYED_OTHERS] == sum(range(100, 1000))
    _, registry = _collector(counters, _Live())
    assert _samples(registry)[("gossamer_net_relayed_bytes_total", ())] == sum(range(1000)) + 1


def test_remote_peer_labels_are_bounded_and_the_rest_summed() -> None:
    counters = NetCounters()
    for i in range(10):
        counters.sent(f"peer-{i}", 100 * (i + 1))
    _, registry = _collector(counters, _Live(), max_peer_labels=3)
    sent = {
        labels[0][1]: value
        for (name, labels), value in _samples(registry).items()
        if name == "gossamer_net_sent_bytes_total"
    }
    assert set(sent) == {"peer-9", "peer-8", "peer-7", OTHER_PEERS}
    assert sent[OTHER_PEERS] == sum(100 * (i + 1) for i in range(7))


def test_a_fold_while_a_scrape_copies_the_table_counts_every_byte_once() -> None:
    # The scrape copied the table, then read the folded total: a fold on the node's loop in
    # between counted the folded peers twice (the next scrape, once: a counter that went down).
    counters = NetCounters(max_peers_counted=8)
    for i in range(8):
        counters.sent(f"peer-{i}", 10)
    table = counters.peers
    items = table.items
    folds = []

    def items_then_a_fold() -> Any:
        copied = list(items())
        if not folds:
            folds.append(1)
            counters.sent("newcomer", 10)  # a ninth peer: the quietest quarter is folded
        return copied

    table.items = items_then_a_fold  # type: ignore[method-assign]
    snapshot = counters.snapshot()
    sent = sum(t["bytes_sent"] for t in snapshot["peers"].values())
    assert folds
    assert sent + snapshot["folded_peers"]["bytes_sent"] == 90


def test_no_per_peer_series_goes_down_when_peers_change_places() -> None:
    # Labels followed the ranking at every scrape: a peer that overtook a named one took its
    # bytes out of "other", which went down (5 to 0 in the review), and a rate summed over
    # peers came out 50 times too high.
    counters = NetCounters()
    for i in range(3):
        counters.sent(f"peer-{i}", 10 * (i + 1))
    _, registry = _collector(counters, _Live(), max_peer_labels=2)

    def sent() -> dict[str, float]:
        return {
            labels[0][1]: value
            for (name, labels), value in _samples(registry).items()
            if name == "gossamer_net_sent_bytes_total"
        }

    first = sent()
    assert set(first) == {"peer-2", "peer-1", OTHER_PEERS}
    counters.sent("peer-0", 1000)  # now the busiest by far
    counters.sent("peer-3", 5)  # and a newcomer
    second = sent()
    assert set(second) == set(first)
    for label, value in first.items():
        assert second[label] >= value, label
    assert second[OTHER_PEERS] == 10 + 1000 + 5


def test_peer_up_has_as_many_series_as_peer_labels_at_most() -> None:
    # One series for every peer watched in the last 10 minutes, past the 64 labels the docs
    # promise; the peers with traffic labels keep theirs.
    counters = NetCounters()
    counters.sent("busy", 10)
    live = _Live()
    _, registry = _collector(counters, live, max_peer_labels=3)
    live.view = LiveView(liveness=tuple((f"w{i:02d}", i % 2 == 0, 1.0) for i in range(20)))
    live.view = LiveView(liveness=(*live.view.liveness, ("busy", True, 1.0)))
    s = _samples(registry)
    up = {labels[0][1] for (name, labels) in s if name == "gossamer_net_peer_up"}
    assert up == {"busy", "w00", "w01"}
    assert s[("gossamer_net_peers_alive", ())] == 11
    assert s[("gossamer_net_peers_gone", ())] == 10


def test_failures_are_counted_when_the_detector_reports_them() -> None:
    live = _Live()
    collector, registry = _collector(NetCounters(), live)
    live.view = LiveView(liveness=(("a", True, 1.0), ("b", True, 1.0)))
    s = _samples(registry)
    assert s[("gossamer_net_failures_detected_total", ())] == 0
    assert s[("gossamer_net_peers_alive", ())] == 2
    collector.count_liveness_change("a", False)
    live.view = LiveView(liveness=(("a", False, 5.0), ("b", True, 1.0)))
    s = _samples(registry)
    s = _samples(registry)  # scraped twice: still one failure
    assert s[("gossamer_net_failures_detected_total", ())] == 1
    assert s[("gossamer_net_peer_up", (("peer", "a"),))] == 0
    assert s[("gossamer_net_peers_gone", ())] == 1
    # Between two scrapes, a goes, comes back and goes again, b goes and comes back: every
    # failure counts although no scrape saw b gone.
    for peer_id, alive in (("a", True), ("a", False), ("b", False), ("b", True), ("a", True)):
        collector.count_liveness_change(peer_id, alive)
    live.view = LiveView(liveness=(("a", True, 9.0), ("b", True, 9.5)))
    s = _samples(registry)
    assert s[("gossamer_net_failures_detected_total", ())] == 3
    assert s[("gossamer_net_peers_gone", ())] == 0


def test_a_busy_or_stopped_node_serves_the_last_view() -> None:
    live = _Live()
    collector, registry = _collector(NetCounters(), live)
    live.view = LiveView(peers_known=3)
    assert _samples(registry)[("gossamer_net_peers_known", ())] == 3
    live.fail = True
    assert _samples(registry)[("gossamer_net_peers_known", ())] == 3
    collector.close()
    calls = live.calls
    assert _samples(registry)[("gossamer_net_peers_known", ())] == 3
    assert live.calls == calls  # never asks a stopped node


def test_a_scrape_while_another_waits_on_the_node_serves_the_last_view_at_once() -> None:
    # Live reads were queued on a lock, each waiting up to live_timeout_s for a busy loop: with
    # three scrapers the third waited three times as long, and dashboards showed the peer gone.
    reading = threading.Event()
    release = threading.Event()
    num_reads = 0

    def slow_live() -> LiveView:
        nonlocal num_reads
        num_reads += 1
        if num_reads == 2:
            reading.set()
            release.wait(30)  # a busy node's loop
        return LiveView(peers_known=num_reads)

    registry = CollectorRegistry()
    collector = NetMetricsCollector(NetCounters().snapshot, slow_live)
    registry.register(collector)
    assert _samples(registry)[("gossamer_net_peers_known", ())] == 1
    first: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    second: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    reader = threading.Thread(target=lambda: first.update(_samples(registry)))
    concurrent = threading.Thread(target=lambda: second.update(_samples(registry)))
    reader.start()
    try:
        assert reading.wait(10)
        concurrent.start()
        concurrent.join(5)
        assert not concurrent.is_alive(), "the scrape queued behind the read under way"
    finally:
        release.set()
        reader.join(10)
        if concurrent.ident is not None:
            concurrent.join(10)
    assert second[("gossamer_net_peers_known", ())] == 1  # the last view, at once
    assert first[("gossamer_net_peers_known", ())] == 2


def test_net_metrics_config_is_checked() -> None:
    with pytest.raises(ValueError, match="max_peer_labels"):
        NetMetricsConfig(max_peer_labels=0)
    with pytest.raises(ValueError, match="live_timeout_s"):
        NetMetricsConfig(live_timeout_s=0)


def test_peer_info_and_swarm_metrics_appear_only_when_enabled() -> None:
    metrics = PeerMetrics()
    names = {name for name, _ in _samples(metrics.registry)}
    assert "gossamer_peer_info" not in names
    assert "gossamer_resyncs_total" not in names
    assert "gossamer_goodput_kept_tokens" in names
    metrics.set_peer_id("abc")
    metrics.set_peer_id("abd")  # renamed: one series
    swarm = metrics.enable_swarm()
    assert metrics.enable_swarm() is swarm
    swarm.resyncs.inc()
    swarm.record_state_download(1.5, 4096)
    s = _samples(metrics.registry)
    assert s[("gossamer_peer_info", (("peer_id", "abd"),))] == 1
    assert ("gossamer_peer_info", (("peer_id", "abc"),)) not in s
    assert s[("gossamer_resyncs_total", ())] == 1
    assert s[("gossamer_state_download_duration_seconds_sum", ())] == 1.5
    assert s[("gossamer_state_download_bytes_total", ())] == 4096


class _FakeSwarmAverager:
    """Stands in for SwarmAverager: returns scripted outcomes."""

    def __init__(self, codec: str, outcomes: list[AverageOutcome]) -> None:
        self.config = SimpleNamespace(codec=codec)
        self.outcomes = outcomes

    def average(
        self, tensors: list[torch.Tensor], *, round_key: str, weight: float
    ) -> AverageOutcome:
        return self.outcomes.pop(0)


def _outcome(tensors: list[torch.Tensor], **fields: Any) -> AverageOutcome:
    defaults: dict[str, Any] = {"group_size": 3, "bytes_sent": 100, "bytes_received": 90}
    return AverageOutcome(tensors=tensors, seconds=0.5, **(defaults | fields))


def test_observed_averager_counts_rounds_by_outcome() -> None:
    tensors = [torch.zeros(100_000), torch.zeros(10)]
    metrics = PeerMetrics()
    fake = _FakeSwarmAverager(
        "int8",
        [
            _outcome(tensors, backend="torch"),
            _outcome(tensors, group_size=2, failed_peers=["x"], missing_peers=["y"], backend="p2p"),
            _outcome(tensors, group_size=1),
            _outcome(tensors, group_size=0, excluded=True),
        ],
    )
    averager = ObservedAverager(fake, metrics.enable_swarm())  # type: ignore[arg-type]
    for i in range(4):
        assert averager.average(tensors, round_key=f"r/{i}", weight=1.0).tensors is tensors
    s = _samples(metrics.registry)
    for outcome in ("complete", "shrunk", "alone", "excluded"):
        assert s[("gossamer_averaging_rounds_total", (("outcome", outcome),))] == 1
    for backend in ("p2p", "torch"):  # the rounds alone or excluded had no backend
        assert s[("gossamer_averaging_backend_rounds_total", (("backend", backend),))] == 1
    assert s[("gossamer_round_peers_dropped_total", ())] == 1
    assert s[("gossamer_round_peers_missing_total", ())] == 1
    assert s[("gossamer_allreduce_duration_seconds_count", ())] == 4
    assert s[("gossamer_averaging_sent_bytes_total", ())] == 400
    assert s[("gossamer_group_size", ())] == 0
    # 8-bit blockwise on the large tensor, the small one uncompressed: close to 4x, under it.
    assert 3.5 < s[("gossamer_allreduce_compression_ratio", ())] < 4.0


def test_goodput_exports_no_counter_that_goes_down() -> None:
    # Kept tokens are taken back when a round is discarded: exported as a counter, Prometheus
    # read each drop as a reset and rate() spiked by the whole total.
    metrics = PeerMetrics()
    for _ in range(10):
        metrics.goodput.add_step(1000)
    metrics.goodput.discard(4000)
    text = generate_latest(metrics.registry).decode()
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert types["gossamer_goodput_kept_tokens"] == "gauge"
    assert types["gossamer_goodput_processed_tokens"] == "counter"
    s = _samples(metrics.registry)
    assert s[("gossamer_goodput_kept_tokens", ())] == 6000
    assert s[("gossamer_goodput_processed_tokens_total", ())] == 10000
    assert s[("gossamer_goodput_discarded_tokens_total", ())] == 4000


def test_goodput_counts_discarded_tokens() -> None:
    clock = FakeClock()
    tracker = GoodputTracker(clock)
    tracker.add_compute(4.0)
    tracker.add_step(1000)
    tracker.add_step(1000)
    tracker.discard(1500)
    tracker.add_step(500, kept=False)
    clock.advance(10.0)
    snap = tracker.snapshot()
    assert (snap.tokens_kept, snap.tokens_discarded, snap.tokens_processed) == (500, 2000, 2500)
    assert snap.goodput_ratio == pytest.approx(50.0 / 625.0)


def test_swarm_goodput_weighs_peers_by_the_time_they_ran() -> None:
    statuses: dict[str, dict[str, Any]] = {
        "a": {"goodput": {"tokens_kept": 800, "wall_s": 10.0, "compute_tokens_per_s": 100.0}},
        "b": {"goodput": {"tokens_kept": 100, "wall_s": 5.0, "compute_tokens_per_s": 100.0}},
        "c": {"state": "starting"},
    }
    goodput = swarm_goodput(statuses, wall_s=10.0)
    assert set(goodput["peers"]) == {"a", "b"}
    assert goodput["peers"]["a"]["ratio"] == pytest.approx(0.8)
    assert goodput["peers"]["b"]["ratio"] == pytest.approx(0.2)
    assert goodput["swarm"]["tokens_per_s"] == pytest.approx(90.0)
    assert goodput["swarm"]["ratio"] == pytest.approx(900 / 1500)
    assert swarm_goodput({}, wall_s=0.0)["swarm"]["ratio"] == 0.0
    killed = swarm_goodput(statuses, wall_s=10.0, lost_tokens={"b": 100})
    assert killed["peers"]["b"]["tokens_kept"] == 0
    assert killed["swarm"]["ratio"] == pytest.approx(800 / 1500)
