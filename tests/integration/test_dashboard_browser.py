"""The dashboard in headless Chromium, fed by real peers' /metrics endpoints (real processes).

Checks that the peers and a curve appear and update, keeps screenshots under ``test-artifacts/``,
and that a SIGKILLed peer shows as gone within the failure-detection time. The page's script is
also given states made by the test: values and sizes a swarm reaches only in hours or at
hundreds of peers.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gossamer.core.clock import SystemClock
from gossamer.obs.dashboard import (
    DashboardConfig,
    DashboardServer,
    DashboardService,
    FakeSwarmSource,
    ScrapeConfig,
    ScrapeSwarmSource,
    create_app,
)
from gossamer.obs.dashboard.source import PeerSample, PeerView, SwarmSnapshot

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
GONE_AFTER_S = 2.0
POLL_INTERVAL_S = 0.25
PAGE_REFRESH_S = 0.5

# A stand-in training peer: real PeerMetrics served over HTTP, values changing like training.
PEER_SCRIPT = """
import sys, time, math, random
from prometheus_client import Counter, Info
from gossamer.obs.metrics import PeerMetrics, serve_metrics
peer_id, other = sys.argv[1], sys.argv[2]
metrics = PeerMetrics()
Info("gossamer_peer", "This peer.", registry=metrics.registry).info({"peer_id": peer_id})
sent = Counter("gossamer_net_sent_bytes", "Bytes sent.", ["peer"], registry=metrics.registry)
server = serve_metrics(metrics.registry, port=0)
print(server.url, flush=True)
rate = 900.0 + 400.0 * random.random()
step = 0
while True:
    step += 1
    metrics.step.set(step)
    metrics.loss.set(4.0 * math.exp(-step / 40.0) + 1.0 + 0.05 * random.random())
    metrics.tokens.inc(256)
    metrics.tokens_per_second.set(rate + 100.0 * random.random())
    sent.labels(peer=other).inc(4096 + random.randrange(4096))
    time.sleep(0.1)  # the pace of this fake training, not synchronisation
"""


def _wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def _playwright() -> Any:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing: pip install 'playwright==1.65.2'")
    return sync_playwright


@pytest.fixture
def peers() -> Iterator[list[tuple[str, subprocess.Popen[str]]]]:
    names = ["peer-a", "peer-b"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PEER_SCRIPT, name, names[1 - i]],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i, name in enumerate(names)
    ]
    try:
        urls = []
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()  # the peer prints its URL once serving
            assert line.startswith("http://127.0.0.1:"), f"peer did not start: {line!r}"
            urls.append(line)
        yield list(zip(urls, procs, strict=True))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.mark.slow
def _assert_the_page_keeps_its_content_policy(browser: Any, url: str) -> None:
    """The page, its policy enforced, draws what it draws with nothing refused."""
    page = browser.new_page()
    errors: list[str] = []
    page.on(
        "console", lambda message: errors.append(message.text) if message.type == "error" else None
    )
    page.goto(url)
    swatch = page.locator('tr[data-peer-id="peer-a"] .swatch')
    swatch.wait_for(timeout=15_000)
    page.locator("#loss-chart path.series").first.wait_for(timeout=15_000)
    color = swatch.evaluate("s => getComputedStyle(s).backgroundColor")
    assert color not in ("", "rgba(0, 0, 0, 0)"), color  # (set as an attribute it was refused)
    assert not errors, errors
    page.close()


def test_dashboard_shows_peers_curves_and_a_killed_peer(
    peers: list[tuple[str, subprocess.Popen[str]]],
) -> None:
    sync_playwright = _playwright()
    source = ScrapeSwarmSource(
        ScrapeConfig(urls=tuple(url for url, _ in peers), gone_after_s=GONE_AFTER_S, timeout_s=0.5)
    )
    service = DashboardService(
        source, DashboardConfig(poll_interval_s=POLL_INTERVAL_S, page_refresh_s=PAGE_REFRESH_S)
    )
    ARTIFACTS.mkdir(exist_ok=True)
    with DashboardServer(create_app(service)) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            # Under its content policy the page refuses the test's own string predicates
            # (playwright evaluates them): checked on a page of its own below.
            page = browser.new_page(viewport={"width": 1280, "height": 1000}, bypass_csp=True)
            page.goto(server.url)
            rows = 'tr[data-peer-id][data-status="alive"]'
            page.wait_for_function(
                f"document.querySelectorAll('{rows}').length === 2", timeout=15_000
            )
            assert set(page.eval_on_selector_all(rows, "rs => rs.map(r => r.dataset.peerId)")) == {
                "peer-a",
                "peer-b",
            }

            # A curve appears, then grows: the page updates live.
            curve = '#loss-chart path.series[data-peer-id="peer-a"]'
            page.wait_for_function(
                f"(document.querySelector('{curve}')?.dataset.points ?? 0) >= 3", timeout=15_000
            )
            points = int(page.get_attribute(curve, "data-points") or 0)
            step = page.text_content('tr[data-peer-id="peer-a"] td:nth-child(5)')
            page.wait_for_function(
                f"document.querySelector('{curve}').dataset.points > {points}", timeout=10_000
            )
            _wait_for(
                lambda: page.text_content('tr[data-peer-id="peer-a"] td:nth-child(5)') != step,
                10,
                "the step column to change",
            )
            assert page.locator("#throughput-chart path.series").count() == 2
            _assert_the_page_keeps_its_content_policy(browser, server.url)
            assert page.locator("#links-body tr").count() == 2
            page.wait_for_function(
                "document.querySelectorAll('#events li[data-kind=\"joined\"]').length === 2",
                timeout=5_000,
            )
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            # SIGKILL one peer: it shows as gone within the failure-detection time.
            _, victim = peers[1]
            killed_at = time.monotonic()
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait(timeout=10)
            budget_s = GONE_AFTER_S + POLL_INTERVAL_S + PAGE_REFRESH_S + 1.0
            page.wait_for_function(
                "document.querySelector('tr[data-peer-id=\"peer-b\"]')?.dataset.status === 'gone'",
                timeout=budget_s * 1000,
            )
            shown_gone_s = time.monotonic() - killed_at
            assert shown_gone_s <= budget_s
            assert page.locator('#events li[data-kind="gone"][data-peer-id="peer-b"]').count() == 1
            assert page.get_attribute('tr[data-peer-id="peer-a"]', "data-status") == "alive"
            assert page.text_content("#num-gone") == "1"
            page.screenshot(path=str(ARTIFACTS / "dashboard-peer-gone.png"), full_page=True)
            (ARTIFACTS / "dashboard-peer-gone.txt").write_text(
                f"peer killed -> shown gone on the page after {shown_gone_s:.2f} s "
                f"(gone_after_s={GONE_AFTER_S}, budget {budget_s:.2f} s)\n"
            )
        finally:
            browser.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    sync_playwright = _playwright()
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


class _GivenStateService(DashboardService):
    """Serves the state a test gives it as ``/api/state``, as it is."""

    def __init__(self, state: dict[str, Any]) -> None:
        super().__init__(
            FakeSwarmSource(SystemClock()), DashboardConfig(page_refresh_s=PAGE_REFRESH_S)
        )
        self.given_state = state

    def state(self) -> dict[str, Any]:
        return self.given_state


def _state_of(*samples: PeerSample) -> dict[str, Any]:
    """What /api/state says of peer-a after it reported ``samples``, one a second until now."""
    service = DashboardService(FakeSwarmSource(SystemClock()), DashboardConfig())
    view = PeerView(peer_id="peer-a", address="10.0.0.1:7000", status="alive")
    now = time.time()
    for i, sample in enumerate(samples):
        wall_s = now - len(samples) + 1 + i
        service.history.record(
            SwarmSnapshot(taken_at_wall_s=wall_s, peers=(view,), samples={"peer-a": sample})
        )
    return service.state()


@contextlib.contextmanager
def _first_drawing(browser: Any, state: dict[str, Any]) -> Iterator[Any]:
    """A page over a dashboard serving ``state``, once it has drawn it or shown an error."""
    with DashboardServer(create_app(_GivenStateService(state), poll=False)) as server:
        # (the test's string predicates run in the page: its content policy would refuse them)
        page = browser.new_page(bypass_csp=True)
        try:
            page.goto(server.url)
            page.wait_for_function(
                "Number(document.body.dataset.updates) >= 1"
                " || !document.getElementById('error').hidden",
                timeout=15_000,
            )
            yield page
        finally:
            page.close()


def test_the_page_draws_values_closer_together_than_doubles_can_step(browser: Any) -> None:
    # Two throughput figures one double apart at 1e11: the axis's ticks were added up by a step
    # below half that spacing, `v += step` never moved, and the tab hung filling an array.
    rates = (1e11, 1e11 + math.ulp(1e11))
    state = _state_of(*(PeerSample(loss=2.0, tokens_per_second=rate) for rate in rates))
    with _first_drawing(browser, state) as page:
        assert page.is_hidden("#error"), page.text_content("#error")
        curve = '#throughput-chart path.series[data-peer-id="peer-a"]'
        assert page.get_attribute(curve, "data-points") == "2"
        assert page.locator("#throughput-chart .axis text").count() >= 2  # ticks were drawn
        # The ticks themselves: a few round values, each once, however narrow or wide the range.
        ranges = [
            (1e11 - 1.2e-6, 1e11 + 1.65e-5),
            (-1e15 - 0.125, -1e15),
            (5e-324, 1e-323),
            (-1.7e308, 1.7e308),
            (0.0, 30.0),
        ]
        ticks = page.evaluate("ranges => ranges.map(([lo, hi]) => niceTicks(lo, hi, 4))", ranges)
        for (lo, hi), got in zip(ranges, ticks, strict=True):
            assert len(got) <= 6, (lo, hi, got)
            assert got == sorted(set(got)), (lo, hi, got)
        assert ticks[-1] == [0, 10, 20, 30]


def test_the_page_draws_a_curve_of_more_points_than_a_call_takes_arguments(
    browser: Any,
) -> None:
    # Ten minutes of 350 peers: the points were spread into Math.min(...points), past some
    # 125,000 V8 threw a RangeError, and the page said the server did not answer.
    num_points = 210_000
    state = _state_of(PeerSample(loss=2.0, tokens_per_second=1000.0))
    now = state["now_wall_s"]
    state["curves"]["peer-a"] = {
        "t": [now - 600 + 600 * i / num_points for i in range(num_points)],
        "loss": [4.0 - i / num_points for i in range(num_points)],
        "tokens_per_second": [1000.0 + i % 100 for i in range(num_points)],
    }
    with _first_drawing(browser, state) as page:
        assert page.is_hidden("#error"), page.text_content("#error")
        for chart in ("#loss-chart", "#throughput-chart"):
            curve = f'{chart} path.series[data-peer-id="peer-a"]'
            assert page.get_attribute(curve, "data-points") == str(num_points)


def test_a_state_the_page_fails_to_draw_is_not_blamed_on_the_server(browser: Any) -> None:
    # Any error while drawing read "The dashboard server does not answer": whoever looked went
    # after a server that had answered.
    state = _state_of(PeerSample(loss=2.0))
    state["curves"]["peer-a"]["loss"] = None  # (no server sends this: a page that cannot draw)
    with _first_drawing(browser, state) as page:
        message = page.text_content("#error") or ""
        assert "could not draw the swarm's state" in message, message
        assert "does not answer" not in message
        assert page.locator('tr[data-peer-id="peer-a"]').count() == 1  # drawn before it failed
