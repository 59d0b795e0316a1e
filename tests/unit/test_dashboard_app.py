"""The web app over a fake source, driven in memory through ASGI (no sockets)."""

from __future__ import annotations

import asyncio
import json
import math
import re
from importlib.resources import files
from typing import Any

import pytest

from gossamer.core.clock import FakeClock
from gossamer.core.errors import PeerUnavailableError
from gossamer.obs.dashboard import (
    DashboardConfig,
    DashboardService,
    FakeSwarmSource,
    ScrapeConfig,
    ScrapeSwarmSource,
    create_app,
)
from gossamer.obs.dashboard.source import PeerSample, PeerView, SwarmSnapshot


async def _get(app: Any, path: str) -> tuple[int, dict[str, str], bytes]:
    """One GET through the ASGI interface."""
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    await app(scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, body


def _service() -> tuple[FakeSwarmSource, DashboardService]:
    clock = FakeClock()
    source = FakeSwarmSource(clock)
    source.set_peer("peer-a", address="10.0.0.1:7000", sample=PeerSample(loss=3.0, step=1))
    source.set_peer("peer-b", address="10.0.0.2:7000", reachability="relayed")
    return source, DashboardService(source, DashboardConfig(page_refresh_s=0.5), clock=clock)


def test_state_endpoint_serves_what_the_source_shows() -> None:
    source, service = _service()
    app = create_app(service, poll=False)

    async def scenario() -> dict[str, Any]:
        await service.poll_once()
        source.update_sample("peer-a", loss=2.0, step=2)
        source.set_peer("peer-b", alive=False)
        await service.poll_once()
        status, headers, body = await _get(app, "/api/state")
        assert status == 200
        assert headers["content-type"] == "application/json"
        assert headers["cache-control"] == "no-store"
        return dict(json.loads(body))

    state = asyncio.run(scenario())
    peers = {p["peer_id"]: p for p in state["peers"]}
    assert peers["peer-a"]["status"] == "alive"
    assert peers["peer-a"]["loss"] == 2.0
    assert peers["peer-b"]["status"] == "gone"
    assert peers["peer-b"]["reachability"] == "relayed"
    assert state["curves"]["peer-a"]["loss"] == [3.0, 2.0]
    assert [e["kind"] for e in state["events"]][:1] == ["gone"]
    assert state["page_refresh_s"] == 0.5
    assert state["error"] is None


def test_a_failing_source_shows_as_an_error_and_recovers() -> None:
    source, service = _service()
    source.fail_with = PeerUnavailableError("bootstrap peer 10.0.0.9:1 refused")
    asyncio.run(service.poll_once())
    assert service.state()["error"] == "bootstrap peer 10.0.0.9:1 refused"
    source.fail_with = None
    asyncio.run(service.poll_once())
    assert service.state()["error"] is None


def test_a_peer_naming_new_remotes_at_every_scrape_grows_nothing_without_bound() -> None:
    # 5,000 new `peer` labels at each scrape: /api/state reached 48 MB within a minute and the
    # dashboard's memory grew as long as it ran.
    num_scrapes = 0

    def fetch(url: str, timeout_s: float) -> str:
        nonlocal num_scrapes
        num_scrapes += 1
        remotes = (f"r{num_scrapes}.{i}" for i in range(5000))
        sent = "".join(f'gossamer_net_sent_bytes_total{{peer="{r}"}} 1\n' for r in remotes)
        return 'gossamer_peer_info{peer_id="A"} 1\n' + sent

    source = ScrapeSwarmSource(ScrapeConfig(urls=("http://10.0.0.1:9/metrics",)), fetch=fetch)
    service = DashboardService(source, clock=FakeClock())

    async def polls(num_polls: int) -> dict[str, Any]:
        for _ in range(num_polls):
            await service.poll_once()
        return service.state()

    num_links = len(asyncio.run(polls(8))["links"])
    state = asyncio.run(polls(8))
    assert num_scrapes == 16
    assert state["error"] is None
    assert len(state["links"]) == num_links  # as many as 8 scrapes before: no more
    assert len(json.dumps(state)) < 1_000_000


def test_what_a_snapshot_could_not_see_shows_as_the_error() -> None:
    class HalfBlindSource:
        async def snapshot(self) -> SwarmSnapshot:
            peer = PeerView(peer_id="a", address="10.0.0.1:1", status="alive")
            return SwarmSnapshot(
                taken_at_wall_s=1.0, peers=(peer,), problem="no bootstrap peer answered"
            )

    service = DashboardService(HalfBlindSource())
    asyncio.run(service.poll_once())
    assert service.state()["error"] == "no bootstrap peer answered"
    assert [p["peer_id"] for p in service.state()["peers"]] == ["a"]  # what it saw is shown


def test_a_snapshot_that_fails_to_record_shows_as_an_error_and_polling_goes_on() -> None:
    _, service = _service()

    def broken(snapshot: SwarmSnapshot) -> None:
        raise OverflowError("cannot convert float infinity to integer")

    recorded = service.history.record
    service.history.record = broken  # type: ignore[method-assign]
    asyncio.run(service.poll_once())  # before, this raised and ended the polling task
    assert "OverflowError" in (service.state()["error"] or "")
    service.history.record = recorded  # type: ignore[method-assign]
    asyncio.run(service.poll_once())
    assert service.state()["error"] is None


def test_a_source_past_its_deadline_shows_as_an_error() -> None:
    class SlowSource:
        async def snapshot(self) -> SwarmSnapshot:
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

    service = DashboardService(SlowSource(), DashboardConfig(snapshot_timeout_s=0.01))
    asyncio.run(service.poll_once())
    assert "did not answer within 0.01 s" in (service.state()["error"] or "")


def test_the_polling_loop_records_snapshots_until_cancelled() -> None:
    class CountingSource(FakeSwarmSource):
        def __init__(self) -> None:
            super().__init__(FakeClock())
            self.third = asyncio.Event()

        async def snapshot(self) -> SwarmSnapshot:
            snapshot = await super().snapshot()
            if self.num_snapshots >= 3:
                self.third.set()
            return snapshot

    source = CountingSource()
    service = DashboardService(source, clock=FakeClock())

    async def scenario() -> None:
        task = asyncio.get_running_loop().create_task(service.run())
        async with asyncio.timeout(5):
            await source.third.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert service.history.num_snapshots >= 3


def test_page_script_and_style_are_served() -> None:
    _, service = _service()
    app = create_app(service, poll=False)

    async def scenario() -> list[tuple[int, dict[str, str], bytes]]:
        return [
            await _get(app, path)
            for path in ("/", "/static/dashboard.js", "/static/dashboard.css", "/static/x.py")
        ]

    (page, script, style, missing) = asyncio.run(scenario())
    assert page[0] == 200
    assert page[1]["content-type"].startswith("text/html")
    assert b'<script src="/static/dashboard.js">' in page[2]
    assert b'id="loss-chart"' in page[2]
    assert script[0] == 200
    assert script[1]["content-type"].startswith("text/javascript")
    assert b"/api/state" in script[2]
    assert style[0] == 200
    assert missing[0] == 404


def test_no_api_schema_is_served() -> None:
    # /docs was off, but /openapi.json still described the API.
    _, service = _service()
    app = create_app(service, poll=False)
    status, _, _ = asyncio.run(_get(app, "/openapi.json"))
    assert status == 404


def test_the_page_loads_nothing_from_elsewhere_and_inserts_data_as_text() -> None:
    static = files("gossamer.obs.dashboard") / "static"
    for name in ("index.html", "dashboard.js", "dashboard.css"):
        text = (static / name).read_text()
        external = [
            u for u in re.findall(r"https?://[^\s\"')]+", text) if "www.w3.org/2000/svg" not in u
        ]
        assert external == [], f"{name} refers to {external}"
    script = (static / "dashboard.js").read_text()
    assert "innerHTML" not in script  # peer ids and details come from the network


def test_dashboard_config_is_checked() -> None:
    with pytest.raises(ValueError, match="poll_interval_s"):
        DashboardConfig(poll_interval_s=0)
    with pytest.raises(ValueError, match="poll_interval_s"):
        DashboardConfig(poll_interval_s=math.nan)  # (it made the polling loop spin a core)
