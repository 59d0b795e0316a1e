"""The dashboard served on loopback: which ``Host`` names it answers, and the page's policy."""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import pytest
from starlette.middleware.trustedhost import TrustedHostMiddleware

from gossamer.core.clock import SystemClock
from gossamer.obs.dashboard import (
    DashboardConfig,
    DashboardServer,
    DashboardService,
    FakeSwarmSource,
    create_app,
)
from gossamer.obs.dashboard import server as server_module


def _get(port: int, path: str, host_header: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_host=True)
        connection.putheader("Host", host_header)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@pytest.fixture
def port() -> Iterator[int]:
    source = FakeSwarmSource(SystemClock())
    source.set_peer("peer-a", address="10.0.0.1:7000")
    app = create_app(DashboardService(source, DashboardConfig()), poll=False)
    with DashboardServer(app, host="127.0.0.1", port=0) as server:
        yield server.port


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost", "[::1]"])
def test_a_loopback_dashboard_answers_loopback_names(port: int, name: str) -> None:
    status, _, _ = _get(port, "/api/state", f"{name}:{port}")
    assert status == 200


@pytest.mark.parametrize("name", ["attacker.example", "127.0.0.1.attacker.example", "10.0.0.1"])
def test_a_loopback_dashboard_refuses_other_names(port: int, name: str) -> None:
    # A page on attacker.example whose name was rebound to 127.0.0.1 sends its own name.
    status, _, body = _get(port, "/api/state", f"{name}:{port}")
    assert status == 400
    assert b"peer-a" not in body
    assert b"10.0.0.1:7000" not in body


def test_the_page_allows_its_own_script_style_and_origin_only(port: int) -> None:
    status, headers, _ = _get(port, "/", f"127.0.0.1:{port}")
    assert status == 200
    policy = headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "connect-src 'self'"):
        assert directive in policy
    assert "unsafe-inline" not in policy
    assert "frame-ancestors 'none'" in policy
    assert headers["x-content-type-options"] == "nosniff"


def test_a_loopback_dashboard_answers_the_names_it_is_told_to(port: int) -> None:
    source = FakeSwarmSource(SystemClock())
    app = create_app(DashboardService(source, DashboardConfig()), poll=False)
    with DashboardServer(app, allowed_hosts=("dash.example",)) as server:
        assert _get(server.port, "/healthz", f"dash.example:{server.port}")[0] == 200
        assert _get(server.port, "/healthz", f"other.example:{server.port}")[0] == 400


def test_a_dashboard_bound_elsewhere_answers_only_the_names_it_is_told_to() -> None:
    # Bound to other than loopback, --allowed-host was accepted and ignored: every name answered.
    # (What it would serve is read, not bound: a test listens on loopback only.)
    app = create_app(DashboardService(FakeSwarmSource(SystemClock()), DashboardConfig()))
    told = server_module._uvicorn_server(app, "0.0.0.0", ("dash.example",)).config.app
    assert isinstance(told, TrustedHostMiddleware)
    assert {"dash.example", "127.0.0.1", "localhost"} <= set(told.allowed_hosts)
    assert "*" not in told.allowed_hosts
    untold = server_module._uvicorn_server(app, "0.0.0.0", ()).config.app
    assert untold is app  # none given: any name
