"""Spans, their Chrome-trace export, and goodput accounting."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gossamer.cli import trace as trace_cli
from gossamer.core.clock import FakeClock
from gossamer.obs import trace as trace_module
from gossamer.obs.goodput import GoodputTracker
from gossamer.obs.metrics import PeerMetrics
from gossamer.obs.trace import (
    PHASES,
    Span,
    SpanRecorder,
    active_recorder,
    export_chrome_trace,
    nested_span,
    read_spans,
    record_nested,
)


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


def _span_line(start_unix_s: float = 1.0) -> str:
    return json.dumps({"name": "compute", "start_unix_s": start_unix_s, "duration_s": 0.5})


def test_a_restarted_recorder_ends_a_torn_last_line_before_its_spans(tmp_path: Path) -> None:
    # A peer's disk filled up mid-line; restarted with the same --trace file, it appended its
    # spans onto the torn line, and the export refused the whole file.
    path = tmp_path / "spans.jsonl"
    torn = _span_line()[:25]
    path.write_text(_span_line() + "\n" + torn)
    recorder = SpanRecorder(peer="p2", path=path)
    with recorder.span("compute", step=5):
        pass
    recorder.close()
    assert path.read_text().splitlines()[1] == torn  # on a line of its own
    assert [s.step for s in read_spans(path)] == [-1, 5]


def test_lines_that_are_not_spans_amid_spans_are_skipped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spans.jsonl"
    lines = [
        _span_line(1.0),
        _span_line()[:25] + _span_line(),  # torn, then a restarted peer's first span
        '{"name": "compute", "start_unix_s": "late", "duration_s": 0.5}',
        _span_line(1e305),  # infinite once in microseconds
        _span_line(2.0),
        _span_line()[:10],  # torn last line
    ]
    path.write_text("\n".join(lines))
    assert [s.start_unix_s for s in read_spans(path)] == [1.0, 2.0]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "4 line(s) not spans, skipped" in warnings[0].getMessage()
    assert "line 2" in warnings[0].getMessage()


def test_a_line_nested_too_deep_to_parse_amid_spans_is_skipped(tmp_path: Path) -> None:
    # json.loads raised RecursionError, not caught: a traceback from `gossamer trace export`.
    spans = tmp_path / "spans.jsonl"
    nested = '{"name": ' + "[" * 100_000
    spans.write_text(f"{_span_line(1.0)}\n{nested}\n{'[' * 100_000}\n{_span_line(2.0)}\n")
    output = tmp_path / "trace.json"
    result = CliRunner().invoke(trace_cli.app, [str(spans), "--output", str(output)])
    assert result.exception is None, result.exception
    assert result.exit_code == 0, result.output
    assert "2 spans written" in result.output


@pytest.mark.parametrize(
    "first",
    ["\x00" * 4096, "\x00 \x00\t", "\x00\x00" + _span_line()[:20]],
    ids=["nul", "nul-and-spaces", "nul-then-torn-span"],
)
def test_a_first_line_of_nul_bytes_a_crash_left_is_torn(tmp_path: Path, first: str) -> None:
    # The same line amid spans was skipped, but first in the file it was read as the sign of a
    # file that is no trace, and every span in it was refused.
    path = tmp_path / "spans.jsonl"
    path.write_text(first + "\n" + _span_line(1.0) + "\n" + _span_line(2.0) + "\n")
    assert [s.start_unix_s for s in read_spans(path)] == [1.0, 2.0]


def test_a_torn_last_line_alone_is_skipped_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spans.jsonl"
    path.write_text(_span_line() + "\n" + _span_line()[:30])
    assert len(read_spans(path)) == 1
    assert not caplog.records


@pytest.mark.parametrize(
    "start", ["1e305", "1e400", "9" * 400], ids=["overflows-in-us", "infinite", "huge-integer"]
)
def test_trace_export_skips_a_span_whose_times_are_out_of_range(tmp_path: Path, start: str) -> None:
    # 1e305 s overflowed to infinity in microseconds: json.dumps(allow_nan=False) raised out of
    # `gossamer trace export` as a traceback.
    spans = tmp_path / "spans.jsonl"
    bad = '{"name": "compute", "start_unix_s": ' + start + ', "duration_s": 0.5}'
    spans.write_text(_span_line(1.0) + "\n" + bad + "\n" + _span_line(2.0) + "\n")
    output = tmp_path / "trace.json"
    result = CliRunner().invoke(trace_cli.app, [str(spans), "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert result.exception is None
    assert "2 spans written" in result.output
    json.loads(output.read_text())
    spans.write_text(bad + "\n" + _span_line(2.0) + "\n")  # first: the file is no trace
    result = CliRunner().invoke(trace_cli.app, [str(spans), "--output", str(output)])
    assert result.exit_code == 2, result.output
    assert "spans.jsonl:1 is not a span" in result.output
    assert "out of range" in result.output


@pytest.mark.parametrize(
    "text", ["", "\n", "junk\n", "junk"], ids=["empty", "blank", "junk", "torn"]
)
def test_a_file_without_any_span_is_an_error(tmp_path: Path, text: str) -> None:
    # One junk line was read as a torn last line: "0 spans written" and exit 0.
    path = tmp_path / "spans.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match="holds no span"):
        read_spans(path)


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "compute", "start_unix_s": "1.0", "duration_s": 0.5},
        {"name": "compute", "start_unix_s": 1.0, "duration_s": 0.5, "attrs": [1]},
        {"name": "compute", "start_unix_s": 1.0, "duration_s": 0.5, "step": True},
        ["compute", 1.0, 0.5],
        # No trace viewer's JSON parser reads NaN or Infinity: the export wrote them on (rc 0).
        {"name": "compute", "start_unix_s": float("nan"), "duration_s": 0.5},
        {"name": "compute", "start_unix_s": 1.0, "duration_s": float("inf")},
        {"name": "compute", "start_unix_s": 1.0, "duration_s": 0.5, "attrs": {"x": -math.inf}},
        {"name": "compute", "start_unix_s": 1.0, "duration_s": -0.5},
        {"name": "compute", "start_unix_s": 1.0, "duration_s": 0.5, "exclusive_s": -1.0},
    ],
    ids=[
        "start-a-string",
        "attrs-a-list",
        "step-a-bool",
        "not-an-object",
        "start-nan",
        "duration-infinite",
        "attr-infinite",
        "duration-negative",
        "exclusive-negative",
    ],
)
def test_a_span_with_fields_of_the_wrong_type_is_an_error_naming_its_line(
    tmp_path: Path, fields: object
) -> None:
    # They passed the constructor and ended `gossamer trace export` in a TypeError traceback.
    good = json.dumps({"name": "compute", "start_unix_s": 1.0, "duration_s": 0.5})
    path = tmp_path / "spans.jsonl"
    path.write_text(json.dumps(fields) + "\n" + good + "\n")
    with pytest.raises(ValueError, match=r"spans\.jsonl:1 is not a span"):
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


def test_nested_spans_count_their_time_once() -> None:
    recorder = SpanRecorder(peer="a")
    with recorder.span("communication", step=3, hook="on_step_end"):
        time.sleep(0.02)
        with nested_span("sync"):
            time.sleep(0.03)
        record_nested("waiting", start_unix_s=time.time(), duration_s=0.01, round="r")
    with nested_span("checkpoint"):  # no span open: nothing recorded
        pass
    record_nested("waiting", start_unix_s=0.0, duration_s=5.0)
    sync, waiting, hook = recorder.spans()
    assert (sync.name, sync.step, sync.within) == ("sync", 3, "communication")
    assert sync.own_s == pytest.approx(sync.duration_s)
    assert (waiting.name, waiting.step, waiting.within) == ("waiting", 3, "communication")
    assert waiting.duration_s == 0.01
    assert waiting.attrs == {"round": "r"}
    assert (hook.within, hook.step) == ("", 3)
    assert hook.duration_s >= 0.05
    assert hook.own_s == pytest.approx(hook.duration_s - sync.duration_s - 0.01)
    assert active_recorder() is None


def test_nested_spans_reach_metrics_under_their_own_phases() -> None:
    metrics = PeerMetrics()
    recorder = SpanRecorder(sinks=[metrics.record_span])
    with recorder.span("communication"):
        assert active_recorder() is recorder
        record_nested("waiting", start_unix_s=0.0, duration_s=0.2)
        time.sleep(0.25)  # the waiting above is timed elsewhere; this is the span's own time
    (_, hook) = recorder.spans()
    value = metrics.registry.get_sample_value
    assert value("gossamer_time_seconds_total", {"phase": "waiting"}) == pytest.approx(0.2)
    communication = value("gossamer_time_seconds_total", {"phase": "communication"})
    assert communication == pytest.approx(hook.duration_s - 0.2)
    total = sum(value("gossamer_time_seconds_total", {"phase": p}) or 0.0 for p in PHASES)
    assert total == pytest.approx(hook.duration_s)


def test_a_disabled_recorder_opens_no_span_for_nested_code() -> None:
    recorder = SpanRecorder(enabled=False)
    with recorder.span("communication"):
        assert active_recorder() is None
        record_nested("waiting", start_unix_s=0.0, duration_s=1.0)
    assert recorder.spans() == []


def test_chrome_trace_draws_nested_spans_under_the_outermost() -> None:
    spans = [
        Span(name="waiting", start_unix_s=10.0, duration_s=0.2, peer="a", within="communication"),
        Span(name="communication", start_unix_s=10.0, duration_s=0.5, peer="a"),
        Span(name="waiting", start_unix_s=11.0, duration_s=0.1, peer="a"),
    ]
    complete = [e for e in export_chrome_trace(spans)["traceEvents"] if e["ph"] == "X"]
    assert complete[0]["tid"] == complete[1]["tid"]  # the nested waiting is under its hook
    assert complete[2]["tid"] != complete[1]["tid"]  # a waiting of its own has its own row


def test_trace_export_to_a_folder_that_is_not_there_is_a_clear_error(tmp_path: Path) -> None:
    spans = tmp_path / "spans.jsonl"
    spans.write_text(json.dumps({"name": "compute", "start_unix_s": 1.0, "duration_s": 0.5}))
    output = tmp_path / "missing" / "trace.json"
    result = CliRunner().invoke(trace_cli.app, [str(spans), "--output", str(output)])
    assert result.exit_code == 2, result.output
    assert f"cannot write {output}" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_trace_export_refuses_to_write_over_its_own_spans_file(tmp_path: Path) -> None:
    # It wrote the trace over the spans and said so: the spans were gone.
    spans = tmp_path / "spans.jsonl"
    recorded = json.dumps({"name": "compute", "start_unix_s": 1.0, "duration_s": 0.5})
    spans.write_text(recorded)
    result = CliRunner().invoke(trace_cli.app, [str(spans), "--output", str(spans)])
    assert result.exit_code == 2, result.output
    assert "is the spans file itself" in result.output
    assert spans.read_text() == recorded


def test_a_trace_file_that_cannot_be_written_is_given_up_and_training_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A full disk: the OSError ended the run (and replaced the error already on its way out
    # of a span), and close() raised again at shutdown.
    recorder = SpanRecorder(peer="p1", path=Path("/dev/full"))

    def run() -> None:
        with recorder.span("compute"):
            for step in range(2000):  # past the file's buffer
                with recorder.span("compute", step=step):
                    pass
            raise RuntimeError("the run's own error")

    with pytest.raises(RuntimeError, match="the run's own error"):
        run()
    recorder.close()
    assert "cannot be written" in caplog.text
    assert caplog.text.count("cannot be written") == 1
    assert len(recorder.spans()) > 2000  # memory and sinks still get every span


def test_a_trace_file_past_its_size_is_moved_aside_and_a_new_one_begun(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    recorder = SpanRecorder(peer="p1", path=path, max_file_bytes=4096)
    for step in range(100):
        with recorder.span("compute", step=step):
            pass
    recorder.close()
    older, newer = read_spans(tmp_path / "spans.jsonl.1"), read_spans(path)
    assert path.stat().st_size <= 4096
    assert (tmp_path / "spans.jsonl.1").stat().st_size <= 4096
    assert older[-1].step + 1 == newer[0].step  # (files before those are gone)
    assert newer[-1].step == 99


def test_spans_reach_the_file_within_a_second_without_a_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A killed peer lost its last spans, held in the file's buffer: flushed only when another
    # span came a second after the last flush, they stayed there through a long wait.
    monkeypatch.setattr(trace_module, "_FLUSH_EVERY_S", 0.05)
    path = tmp_path / "spans.jsonl"
    recorder = SpanRecorder(peer="p1", path=path)
    try:
        with recorder.span("compute", step=7):
            pass
        deadline = time.monotonic() + 10
        while path.stat().st_size == 0:  # no other span comes, no close
            assert time.monotonic() < deadline, "the span never reached the file"
            time.sleep(0.01)  # polling the file under a deadline
        assert [s.step for s in read_spans(path)] == [7]
    finally:
        recorder.close()


def test_trace_export_draws_several_peers_files_on_one_timeline(tmp_path: Path) -> None:
    files = []
    for peer in ("aaaa", "bbbb"):
        recorder = SpanRecorder(peer=peer, path=tmp_path / f"{peer}.jsonl")
        with recorder.span("compute", step=0):
            pass
        recorder.close()
        files.append(str(tmp_path / f"{peer}.jsonl"))
    output = tmp_path / "trace.json"
    result = CliRunner().invoke(trace_cli.app, [*files, "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert "2 spans written" in result.output
    events = json.loads(output.read_text())["traceEvents"]
    names = {e["args"]["name"] for e in events if e.get("name") == "process_name"}
    assert names == {"aaaa", "bbbb"}
