"""SwarmSource implementations: one contract, run against each; scrape failure detection."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable

import pytest
from prometheus_client import Counter, Info, generate_latest

from gossamer.core.clock import FakeClock
from gossamer.net.metrics import NetMetricsConfig
from gossamer.obs.dashboard import scrape as scrape_module
from gossamer.obs.dashboard.exposition import (
    MAX_ID_CHARS,
    MAX_LABELS_PER_METRIC,
    MAX_LINE_CHARS,
    MAX_LINES,
    MAX_SAMPLES_READ,
    ParsedMetrics,
    parse_metrics,
)
from gossamer.obs.dashboard.fake import FakeSwarmSource
from gossamer.obs.dashboard.scrape import ScrapeConfig, ScrapeSwarmSource, normalize_metrics_url
from gossamer.obs.dashboard.source import PeerSample, PeerView, SwarmSnapshot, SwarmSource
from gossamer.obs.metrics import PeerMetrics


def _peer_metrics_text(peer_id: str | None, loss: float = 2.5) -> str:
    metrics = PeerMetrics()
    metrics.loss.set(loss)
    metrics.step.set(7)
    metrics.tokens.inc(512)
    metrics.tokens_per_second.set(1234.5)
    if peer_id is not None:
        Info("gossamer_peer", "This peer.", registry=metrics.registry).info({"peer_id": peer_id})
    sent = Counter("gossamer_net_sent_bytes", "Sent.", ["peer"], registry=metrics.registry)
    sent.labels(peer="other").inc(4096)
    return generate_latest(metrics.registry).decode()


class _FakeEndpoints:
    """In-memory metrics endpoints: URL -> text; a missing URL refuses like a dead peer."""

    def __init__(self) -> None:
        self.pages: dict[str, str] = {}

    def __call__(self, url: str, timeout_s: float) -> str:
        if url not in self.pages:
            raise ConnectionRefusedError(f"{url}: connection refused")
        return self.pages[url]


def _fake_source() -> SwarmSource:
    source = FakeSwarmSource(FakeClock())
    source.set_peer("a", address="10.0.0.1:1", sample=PeerSample(loss=2.0))
    source.set_peer("b", address="10.0.0.2:1", alive=False)
    return source


def _scrape_source() -> SwarmSource:
    endpoints = _FakeEndpoints()
    endpoints.pages["http://10.0.0.1:9/metrics"] = _peer_metrics_text("a")
    config = ScrapeConfig(urls=("http://10.0.0.1:9/metrics", "http://10.0.0.2:9/metrics"))
    return ScrapeSwarmSource(config, fetch=endpoints, clock=FakeClock())


@pytest.mark.parametrize("make_source", [_fake_source, _scrape_source], ids=["fake", "scrape"])
def test_swarm_source_contract(make_source: Callable[[], SwarmSource]) -> None:
    """Every source: unique peers, valid statuses, samples only for listed peers, stable ids."""
    source = make_source()
    first = asyncio.run(source.snapshot())
    second = asyncio.run(source.snapshot())
    for snapshot in (first, second):
        assert isinstance(snapshot, SwarmSnapshot)
        assert all(isinstance(p, PeerView) for p in snapshot.peers)
        assert {p.status for p in snapshot.peers} == {"alive", "gone"}
        assert set(snapshot.samples) <= {p.peer_id for p in snapshot.peers}
        alive = [p for p in snapshot.peers if p.status == "alive"]
        assert all(p.last_seen_wall_s is not None for p in alive)
    assert [p.peer_id for p in first.peers] == [p.peer_id for p in second.peers]
    assert first.samples["a"].loss is not None


def test_scrape_marks_a_silent_peer_gone_after_the_deadline_and_back_when_it_answers() -> None:
    clock = FakeClock()
    endpoints = _FakeEndpoints()
    url = "http://10.0.0.1:9/metrics"
    endpoints.pages[url] = _peer_metrics_text("peer-1")
    source = ScrapeSwarmSource(
        ScrapeConfig(urls=(url,), gone_after_s=2.0), fetch=endpoints, clock=clock
    )
    assert asyncio.run(source.snapshot()).peers[0].status == "alive"
    del endpoints.pages[url]  # killed
    clock.advance(1.9)
    snapshot = asyncio.run(source.snapshot())
    assert snapshot.peers[0].status == "alive"
    clock.advance(0.1)
    snapshot = asyncio.run(source.snapshot())
    assert (snapshot.peers[0].peer_id, snapshot.peers[0].status) == ("peer-1", "gone")
    assert snapshot.samples["peer-1"].loss == 2.5  # last known values stay
    endpoints.pages[url] = _peer_metrics_text("peer-1", loss=1.5)
    snapshot = asyncio.run(source.snapshot())
    assert snapshot.peers[0].status == "alive"
    assert snapshot.samples["peer-1"].loss == 1.5


def test_a_live_peer_is_judged_when_it_answered_not_when_the_slowest_endpoint_gave_up() -> None:
    # A snapshot waits snapshot_wait_s for a silent endpoint; a live peer's answer taken at its
    # start was judged against gone_after_s at its end: below snapshot_wait_s, live peers
    # showed as gone at every snapshot.
    release = threading.Event()
    honest, silent = "http://10.0.0.1:9/metrics", "http://10.0.0.2:9/metrics"

    def fetch(url: str, timeout_s: float) -> str:
        if url == silent:
            release.wait(30)
            raise OSError("no answer")
        return _peer_metrics_text("honest")

    config = ScrapeConfig(urls=(honest, silent), snapshot_wait_s=1.0, gone_after_s=0.5)
    source = ScrapeSwarmSource(config, fetch=fetch)

    async def polls() -> list[SwarmSnapshot]:
        return [await source.snapshot() for _ in range(2)]

    try:
        snapshots = asyncio.run(polls())
    finally:
        release.set()
    for snapshot in snapshots:
        assert {p.peer_id: p.status for p in snapshot.peers} == {
            "honest": "alive",
            "10.0.0.2:9": "gone",
        }


def test_scrape_names_peers_by_address_without_peer_info_and_separates_duplicates() -> None:
    endpoints = _FakeEndpoints()
    urls = ("http://10.0.0.1:9/metrics", "http://10.0.0.2:9/metrics", "http://10.0.0.3:9/metrics")
    endpoints.pages[urls[0]] = _peer_metrics_text(None)
    endpoints.pages[urls[1]] = _peer_metrics_text("same")
    endpoints.pages[urls[2]] = _peer_metrics_text("same")
    source = ScrapeSwarmSource(ScrapeConfig(urls=urls), fetch=endpoints, clock=FakeClock())
    ids = [p.peer_id for p in asyncio.run(source.snapshot()).peers]
    assert ids == ["10.0.0.1:9", "same", "same@10.0.0.3:9"]


def test_scrape_renames_a_duplicate_until_no_other_peer_has_the_name() -> None:
    # A peer exporting the id 'A@<another endpoint's address>' while two endpoints claim A: the
    # second A was renamed onto it, every snapshot was refused as holding one id twice, and the
    # page showed an internal error and no peer at all.
    endpoints = _FakeEndpoints()
    urls = ("http://10.0.0.1:9/metrics", "http://10.0.0.3:9/metrics", "http://10.0.0.2:9/metrics")
    endpoints.pages[urls[0]] = _peer_metrics_text("A")
    endpoints.pages[urls[1]] = _peer_metrics_text("A@10.0.0.2:9")
    endpoints.pages[urls[2]] = _peer_metrics_text("A")
    source = ScrapeSwarmSource(ScrapeConfig(urls=urls), fetch=endpoints, clock=FakeClock())
    first = asyncio.run(source.snapshot())
    ids = [p.peer_id for p in first.peers]
    assert ids == ["A", "A@10.0.0.2:9", "A@10.0.0.2:9#2"]
    assert [p.address for p in first.peers] == ["10.0.0.1:9", "10.0.0.3:9", "10.0.0.2:9"]
    assert [p.peer_id for p in asyncio.run(source.snapshot()).peers] == ids  # stable


def test_scrape_treats_garbage_as_no_answer() -> None:
    endpoints = _FakeEndpoints()
    endpoints.pages["http://h:1/metrics"] = "<html>not metrics</html>"
    source = ScrapeSwarmSource(
        ScrapeConfig(urls=("http://h:1/metrics",)), fetch=endpoints, clock=FakeClock()
    )
    snapshot = asyncio.run(source.snapshot())
    assert snapshot.peers[0].status == "gone"
    assert snapshot.peers[0].last_seen_wall_s is None


def test_parse_metrics_reads_the_peer_metrics_names() -> None:
    parsed = parse_metrics(_peer_metrics_text("p"))
    assert parsed.peer_id == "p"
    sample = parsed.sample
    assert (sample.step, sample.loss, sample.tokens_total) == (7.0, 2.5, 512.0)
    assert sample.tokens_per_second == 1234.5
    assert sample.bytes_sent == {"other": 4096.0}
    assert "compute" in sample.phase_seconds
    assert sample.num_resyncs is None  # not exported by this peer
    # What the swarm's goodput is made of (kept tokens over wall time times compute rate).
    assert sample.goodput_kept_tokens == 0.0
    assert sample.goodput_wall_s is not None
    assert sample.compute_tokens_per_second == 0.0
    assert parsed.problem is None


def test_parse_metrics_reads_a_page_line_by_line_up_to_its_limits() -> None:
    # prometheus_client's parser took 24 s over a comment of 1.28 MB of spaces and 17 s and
    # 370 MiB over 8 MiB of "a 1": it is handed only the lines read here, within bounds.
    past_the_line_limit = (
        "gossamer_train_step 1\n" + "a 1\n" * MAX_LINES + "gossamer_train_loss 2\n"
    )
    parsed = parse_metrics(past_the_line_limit)
    assert (parsed.sample.step, parsed.sample.loss) == (1.0, None)
    assert parsed.problem is not None
    assert f"over {MAX_LINES:,} lines" in parsed.problem

    overlong = (
        "# " + " " * (4 * MAX_LINE_CHARS) + "x\n"  # a comment: left out and not said
        "gossamer_train_loss 0." + "0" * MAX_LINE_CHARS + "1\n"  # a sample: left out and said
        "gossamer_train_step 3\n"
    )
    parsed = parse_metrics(overlong)
    assert (parsed.sample.step, parsed.sample.loss) == (3.0, None)
    assert parsed.problem == f"1 line(s) over {MAX_LINE_CHARS:,} characters left out"

    many = "".join(f'gossamer_net_sent_bytes_total{{peer="r{i}"}} 1\n' for i in range(4096))
    parsed = parse_metrics(many + "gossamer_train_step 4\n")
    assert parsed.sample.step is None
    assert parsed.problem is not None
    assert f"over {MAX_SAMPLES_READ:,} lines" in parsed.problem


def test_an_overlong_line_is_said_only_where_it_is_a_metric_the_dashboard_reads() -> None:
    # Another exporter's long line was logged as a warning and shown as a problem with the
    # peer, though nothing the dashboard reads was lost.
    other = 'other_metric{v="' + "x" * MAX_LINE_CHARS + '"} 1\n'
    read = 'gossamer_net_sent_bytes_total{peer="' + "x" * MAX_LINE_CHARS + '"} 1\n'
    parsed = parse_metrics(other + "gossamer_train_step 3\n")
    assert (parsed.sample.step, parsed.problem) == (3.0, None)
    parsed = parse_metrics(other + read + "  " + read + "gossamer_train_step 3\n")
    assert parsed.sample.step == 3.0
    assert parsed.problem == f"2 line(s) over {MAX_LINE_CHARS:,} characters left out"


def test_parse_metrics_parses_only_the_metrics_it_reads() -> None:
    # Another exporter's line that prometheus_client refuses (a label named twice) is not
    # parsed, nor are comments other than the TYPE of a metric read.
    text = (
        '# HELP other_metric "' + '\\"' * 100 + '"\n'
        'other_metric{a="b",a="c"} 1\n'
        "# TYPE gossamer_train_tokens counter\n"
        "gossamer_train_tokens 7\n"  # (a counter without _total: read as _total, as before)
    )
    parsed = parse_metrics(text)
    assert parsed.sample.tokens_total == 7.0
    assert parsed.problem is None


@pytest.mark.parametrize(
    "line",
    [
        "gossamer_train_tokens_total " + "9" * 400,
        'gossamer_net_sent_bytes_total{peer="x"} ' + "9" * 400,
        "gossamer_train_step 1e400",
    ],
    ids=["scalar", "labelled", "float"],
)
def test_parse_metrics_leaves_out_values_out_of_a_float_s_range(line: str) -> None:
    # A 400-digit integer raised OverflowError from math.isfinite: the peer showed as gone and
    # each poll logged an ERROR with a traceback.
    sample = parse_metrics(f"gossamer_train_loss 2\n{line}\n").sample
    assert (sample.tokens_total, sample.step, sample.bytes_sent) == (None, None, {})
    assert sample.loss == 2.0


def test_parse_metrics_leaves_out_negative_counts() -> None:
    # (a peer that misreports showed -5 bytes on a link and a negative step)
    text = (
        "# TYPE gossamer_train_step gauge\ngossamer_train_step -3\n"
        "# TYPE gossamer_train_loss gauge\ngossamer_train_loss -0.5\n"
        "# TYPE gossamer_net_sent_bytes counter\n"
        'gossamer_net_sent_bytes_total{peer="a"} -5\ngossamer_net_sent_bytes_total{peer="b"} 7\n'
    )
    sample = parse_metrics(text).sample
    assert sample.step is None
    assert sample.loss == -0.5  # a loss may be anything a model reports; shown as it is
    assert sample.bytes_sent == {"b": 7.0}


def test_parse_metrics_bounds_what_a_peer_names() -> None:
    # A peer's endpoint names anything: a 2 MB peer id was taken, and 5,000 new remote peers at
    # each scrape became 5,000 more links each time (48 MB of /api/state within a minute).
    long_id = "x" * (MAX_ID_CHARS + 1)
    num_remotes = MAX_LABELS_PER_METRIC + 100
    lines = [
        f'gossamer_peer_info{{peer_id="{long_id}"}} 1',
        f'gossamer_net_sent_bytes_total{{peer="{long_id}"}} 1e12',
        *(f'gossamer_net_sent_bytes_total{{peer="r{i}"}} {i}' for i in range(num_remotes)),
        *(f'gossamer_net_received_bytes_total{{peer="r{i}"}} 1' for i in range(num_remotes)),
    ]
    parsed = parse_metrics("\n".join(lines) + "\n")
    assert parsed.peer_id is None  # named by its address instead
    sent = parsed.sample.bytes_sent
    assert len(sent) == MAX_LABELS_PER_METRIC
    assert long_id not in sent
    assert min(sent.values()) == num_remotes - MAX_LABELS_PER_METRIC  # the busiest kept
    received = parsed.sample.bytes_received
    assert sorted(received) == sorted(f"r{i}" for i in range(num_remotes))[:MAX_LABELS_PER_METRIC]
    assert parse_metrics('gossamer_peer_info{peer_id="p"} 1\n').peer_id == "p"


def test_parse_metrics_rejects_what_is_not_the_exposition_format() -> None:
    with pytest.raises(ValueError, match="not Prometheus text format"):
        parse_metrics("loss is low")


@pytest.mark.parametrize(
    ("target", "url"),
    [
        ("127.0.0.1:9100", "http://127.0.0.1:9100/metrics"),
        ("http://h:1", "http://h:1/metrics"),
        ("https://h:1/custom", "https://h:1/custom"),
    ],
)
def test_normalize_metrics_url(target: str, url: str) -> None:
    assert normalize_metrics_url(target) == url


@pytest.mark.parametrize("target", ["ftp://h:1", "http://:1", "h:notaport"])
def test_normalize_metrics_url_rejects_bad_targets(target: str) -> None:
    with pytest.raises(ValueError, match="--scrape"):
        normalize_metrics_url(target)


def test_scrape_config_is_checked() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ScrapeConfig(urls=())
    with pytest.raises(ValueError, match="twice"):
        ScrapeConfig(urls=("http://a:1/metrics", "http://a:1/metrics"))
    with pytest.raises(ValueError, match="gone_after_s"):
        ScrapeConfig(urls=("http://a:1/metrics",), gone_after_s=0)
    with pytest.raises(ValueError, match="gone_after_s"):
        ScrapeConfig(urls=("http://a:1/metrics",), gone_after_s=math.nan)


def test_an_endpoint_that_fails_oddly_leaves_the_others_shown() -> None:
    # An error other than OSError from one endpoint (http.client's BadStatusLine from a gRPC
    # port) failed the whole snapshot: no peer was shown.
    def fetch(url: str, timeout_s: float) -> str:
        if "10.0.0.2" in url:
            raise RuntimeError("something no fetch should raise")
        return _peer_metrics_text("a")

    config = ScrapeConfig(urls=("http://10.0.0.1:9/metrics", "http://10.0.0.2:9/metrics"))
    source = ScrapeSwarmSource(config, fetch=fetch, clock=FakeClock())
    snapshot = asyncio.run(source.snapshot())
    assert {p.peer_id: p.status for p in snapshot.peers} == {"a": "alive", "10.0.0.2:9": "gone"}


def test_a_slow_endpoint_holds_one_fetch_at_a_time() -> None:
    # Each snapshot gave a stuck endpoint another thread; once the pool was full every scrape
    # timed out and healthy peers showed as gone.
    release = threading.Event()
    started: list[str] = []

    def fetch(url: str, timeout_s: float) -> str:
        started.append(url)
        if "10.0.0.2" in url:
            release.wait(30)
            raise OSError("given up")
        return _peer_metrics_text("a")

    urls = ("http://10.0.0.1:9/metrics", "http://10.0.0.2:9/metrics")
    source = ScrapeSwarmSource(ScrapeConfig(urls=urls, timeout_s=0.05), fetch=fetch)

    async def polls() -> list[SwarmSnapshot]:
        return [await source.snapshot() for _ in range(5)]

    try:
        snapshots = asyncio.run(polls())
    finally:
        release.set()
    assert started.count(urls[1]) == 1
    assert started.count(urls[0]) == 5
    assert {p.peer_id: p.status for p in snapshots[-1].peers}["a"] == "alive"


def test_snapshot_rejects_inconsistent_peers() -> None:
    view = PeerView(peer_id="a", address="", status="alive")
    with pytest.raises(ValueError, match="unique"):
        SwarmSnapshot(taken_at_wall_s=0.0, peers=(view, view))
    with pytest.raises(ValueError, match="unlisted"):
        SwarmSnapshot(taken_at_wall_s=0.0, peers=(view,), samples={"b": PeerSample()})
    with pytest.raises(ValueError, match="status"):
        PeerView(peer_id="a", address="", status="dead")  # type: ignore[arg-type]


def test_scrape_parses_pages_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # Parsed on the dashboard's loop, one hostile page froze /api/state for everyone.
    threads: list[threading.Thread] = []

    def parse(text: str) -> ParsedMetrics:
        threads.append(threading.current_thread())
        return parse_metrics(text)

    monkeypatch.setattr(scrape_module, "parse_metrics", parse)
    endpoints = _FakeEndpoints()
    url = "http://10.0.0.1:9/metrics"
    endpoints.pages[url] = _peer_metrics_text("a")
    source = ScrapeSwarmSource(ScrapeConfig(urls=(url,)), fetch=endpoints, clock=FakeClock())
    snapshot = asyncio.run(source.snapshot())
    assert snapshot.peers[0].status == "alive"
    assert threads
    assert threading.main_thread() not in threads


def test_scrape_shows_why_a_page_was_not_read_and_logs_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A bad page logged an ERROR with a traceback at every poll, and the page said nothing.
    endpoints = _FakeEndpoints()
    urls = ("http://10.0.0.1:9/metrics", "http://10.0.0.2:9/metrics")
    endpoints.pages[urls[0]] = _peer_metrics_text("a") + "a 1\n" * MAX_LINES
    endpoints.pages[urls[1]] = "gossamer_train_tokens_total 1\n<html>not metrics</html>\n"
    source = ScrapeSwarmSource(ScrapeConfig(urls=urls), fetch=endpoints, clock=FakeClock())
    caplog.set_level(logging.DEBUG, logger="gossamer.obs.dashboard.scrape")
    for _ in range(3):
        snapshot = asyncio.run(source.snapshot())
    read_in_part, unreadable = snapshot.peers
    assert (read_in_part.peer_id, read_in_part.status) == ("a", "alive")
    assert read_in_part.problem is not None
    assert f"over {MAX_LINES:,} lines" in read_in_part.problem
    assert unreadable.status == "gone"
    assert unreadable.problem is not None
    assert unreadable.problem.startswith("page not read: not Prometheus text format: line 2")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2  # one per peer, not one per poll
    assert all(r.exc_info is None for r in warnings)
    endpoints.pages[urls[1]] = _peer_metrics_text("b")
    snapshot = asyncio.run(source.snapshot())
    assert (snapshot.peers[1].peer_id, snapshot.peers[1].status) == ("b", "alive")
    assert snapshot.peers[1].problem is None
    assert "read whole again" in caplog.text


@pytest.mark.parametrize(
    "answer",
    [
        'gossamer_train_step{a="b",\x1b[2J\x1b[31mFAKE: all peers healthy\r} 1\n',
        OSError("HTTP Error 500: \x1b[2J\x1b[31mFAKE: all peers healthy\r"),
    ],
    ids=["page", "no-answer"],
)
def test_what_a_page_says_is_logged_and_shown_with_its_control_characters_escaped(
    caplog: pytest.LogCaptureFixture, answer: str | OSError
) -> None:
    # prometheus_client's error quotes the page's line: ANSI escapes and a carriage return went
    # into a warning as they were (a terminal cleared, a line of the log forged).
    def fetch(url: str, timeout_s: float) -> str:
        if isinstance(answer, OSError):
            raise answer
        return answer

    url = "http://10.0.0.1:9/metrics"
    source = ScrapeSwarmSource(ScrapeConfig(urls=(url,)), fetch=fetch, clock=FakeClock())
    caplog.set_level(logging.DEBUG, logger="gossamer.obs.dashboard.scrape")
    (peer,) = asyncio.run(source.snapshot()).peers
    assert peer.problem is not None
    assert peer.problem.isprintable(), peer.problem
    assert "\\x1b[2J" in peer.problem
    messages = [r.getMessage() for r in caplog.records]
    assert any("FAKE" in message for message in messages)
    assert all(message.isprintable() for message in messages), messages


def test_the_scrape_deadline_outlasts_a_busy_peer_s_wait_for_its_node() -> None:
    # A busy peer's network metrics wait live_timeout_s for its node's loop, then serve their
    # last view; at a scrape deadline of as long, a busy but live peer was shown as gone.
    config = ScrapeConfig(urls=("http://10.0.0.1:9/metrics",))
    assert config.timeout_s >= 2 * NetMetricsConfig().live_timeout_s
    assert config.timeout_s <= config.gone_after_s


def test_an_answer_after_the_snapshot_stopped_waiting_counts_at_the_next() -> None:
    # A snapshot waits snapshot_wait_s, not the whole deadline: a peer that does not answer
    # would hold every snapshot, and every other peer's figures, for it.
    release = threading.Event()
    num_fetches = 0

    def fetch(url: str, timeout_s: float) -> str:
        nonlocal num_fetches
        num_fetches += 1
        if num_fetches > 1:
            raise ConnectionRefusedError("only the first fetch answers")
        release.wait(30)
        return _peer_metrics_text("slow")

    url = "http://10.0.0.1:9/metrics"
    source = ScrapeSwarmSource(
        ScrapeConfig(urls=(url,), snapshot_wait_s=0.05, timeout_s=30), fetch=fetch
    )

    async def polls() -> tuple[SwarmSnapshot, SwarmSnapshot]:
        first = await source.snapshot()  # gives up waiting; the fetch goes on
        release.set()
        deadline = time.monotonic() + 10
        while (later := await source.snapshot()).peers[0].status != "alive":
            assert time.monotonic() < deadline, "the late answer never counted"
        return first, later

    try:
        first, later = asyncio.run(polls())
    finally:
        release.set()
    assert first.peers[0].status == "gone"
    assert later.peers[0].peer_id == "slow"  # the first fetch's answer: the others fail
