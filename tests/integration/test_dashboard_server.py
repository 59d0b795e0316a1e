"""The dashboard served on loopback: which ``Host`` names it answers, and the page's policy."""

from __future__ import annotations

import http.client
import re
from collections.abc import Iterator
from typing import Any

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
    told = server_module._uvicorn_server(
        app, "0.0.0.0", ("dash.example",), bound_address="0.0.0.0"
    ).config.app
    assert isinstance(told, TrustedHostMiddleware)
    assert {"dash.example", "127.0.0.1", "localhost"} <= set(told.allowed_hosts)
    assert "*" not in told.allowed_hosts
    untold = server_module._uvicorn_server(app, "0.0.0.0", (), bound_address="0.0.0.0").config.app
    assert untold is app  # none given: any name


def _app() -> Any:
    return create_app(DashboardService(FakeSwarmSource(SystemClock()), DashboardConfig()))


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("my*host", "a wildcard stands for a domain's names only"),  # (an AssertionError)
        ("*", "would answer every name"),  # (the check against DNS rebinding was off)
        ("myhost:8080", "without its port"),  # (taken, and never matched)
        ("[::1]:8080", "without its port"),
        ("http://myhost/", "not a host name"),
        ("", "not a host name"),
    ],
)
def test_an_allowed_host_no_request_could_name_is_refused(name: str, said: str) -> None:
    with pytest.raises(ValueError, match=re.escape(said)):
        DashboardServer(_app(), allowed_hosts=(name,))


@pytest.mark.parametrize(
    ("name", "compared"),
    [
        ("Dash.Example", "dash.example"),
        ("*.example.com", "*.example.com"),
        ("10.0.0.1", "10.0.0.1"),
        ("::1", "[::1]"),  # (a request names an IPv6 address in brackets)
        ("[2001:DB8::1]", "[2001:db8::1]"),
    ],
)
def test_an_allowed_host_is_compared_as_requests_name_it(name: str, compared: str) -> None:
    assert server_module.check_allowed_host(name) == compared


def test_a_loopback_address_spelled_otherwise_still_checks_the_host() -> None:
    # --host 127.1 bound 127.0.0.1, but ipaddress does not read '127.1': no Host check at all,
    # and a rebound name got the swarm's state.
    with DashboardServer(_app(), host="127.1", port=0) as server:
        assert _get(server.port, "/healthz", f"rebind.attacker.example:{server.port}")[0] == 400
        assert _get(server.port, "/healthz", f"127.0.0.1:{server.port}")[0] == 200


@pytest.mark.parametrize("host", ["", " "])
def test_an_empty_host_is_refused(host: str) -> None:
    # '' bound every interface, unchecked, and the page was printed as http://:PORT/.
    with pytest.raises(ValueError, match="--host is empty"):
        DashboardServer(_app(), host=host)
