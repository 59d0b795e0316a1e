"""Spans, their Chrome-trace export, and goodput accounting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gossamer.core.clock import FakeClock
from gossamer.obs.goodput import GoodputTracker
from gossamer.obs.metrics import PeerMetrics
from gossamer.obs.trace import Span, SpanRecorder, export_chrome_trace, read_spans


def test_spans_go_to_memory_sinks_and_file(tmp_path: Path) -> None:
    seen: list[Span] = []
    path = tmp_path / "spans.jsonl"
    recorder = SpanRecorder(peer="p1", path=path, sinks=[seen.append])
    with recorder.span("compute", step=3, bytes=10):
        pass
    recorder.close()
    assert [s.name for s in recorder.spans()] == ["compute"]
    assert seen[0].step == 3
    assert seen[0].attrs == {"bytes": 10}
    assert seen[0].duration_s >= 0
    assert read_spans(path) == seen


def test_ring_is_bounded() -> None:
    recorder = SpanRecorder(max_spans=3)
    for i in range(10):
        recorder.record(Span(name="compute", start_unix_s=float(i), duration_s=0.1))
    assert [s.start_unix_s for s in recorder.spans()] == [7.0, 8.0, 9.0]


def test_torn_last_line_is_skipped_but_garbage_elsewhere_is_an_error(tmp_path: Path) -> None:
    good = json.dumps({"name": "compute", "start_unix_s": 1.0, "duration_s": 0.5})
    path = tmp_path / "spans.jsonl"
    path.write_text(good + "\n" + good[:10])
    assert len(read_spans(path)) == 1
    path.write_text("garbage\n" + good + "\n")
    with pytest.raises(ValueError, match=r"spans\.jsonl:1"):
        read_spans(path)


def test_chrome_trace_has_one_row_per_peer_and_phase() -> None:
    spans = [
        Span(name="compute", start_unix_s=10.0, duration_s=0.5, peer="a", step=1),
        Span(name="communication", start_unix_s=10.5, duration_s=0.25, peer="a", step=1),
        Span(name="compute", start_unix_s=10.0, duration_s=0.5, peer="b", step=1),
    ]
    trace = export_chrome_trace(spans)
    complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(complete) == 3
    assert complete[0]["ts"] == pytest.approx(10e6)
    assert complete[0]["dur"] == pytest.approx(0.5e6)
    assert len({e["pid"] for e in complete}) == 2
    assert len({(e["pid"], e["tid"]) for e in complete}) == 3
    json.dumps(trace)


def test_goodput_counts_only_kept_tokens() -> None:
    clock = FakeClock()
    tracker = GoodputTracker(clock)
    tracker.add_compute(5.0)
    tracker.add_step(1000)
    tracker.add_step(1000, kept=False)
    clock.advance(10.0)
    snap = tracker.snapshot()
    assert snap.compute_tokens_per_s == pytest.approx(400.0)
    assert snap.goodput_tokens_per_s == pytest.approx(100.0)
    assert snap.goodput_ratio == pytest.approx(0.25)
    tracker.discard(1000)
    assert tracker.snapshot().tokens_kept == 0


def test_metrics_count_phase_seconds_from_spans() -> None:
    metrics = PeerMetrics()
    metrics.record_span(Span(name="compute", start_unix_s=0.0, duration_s=2.0))
    metrics.record_span(Span(name="checkpoint", start_unix_s=0.0, duration_s=0.5))
    value = metrics.registry.get_sample_value
    assert value("gossamer_time_seconds_total", {"phase": "compute"}) == 2.0
    assert value("gossamer_time_seconds_total", {"phase": "checkpoint"}) == 0.5
    assert value("gossamer_time_seconds_total", {"phase": "waiting"}) == 0.0
    assert value("gossamer_checkpoint_write_seconds_count") == 1.0
