"""Which address a peer listening on every interface advertises, with the machine's routes and
interfaces given (no sockets)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from gossamer.core.errors import ConfigError
from gossamer.net.node import _routable_host


def _routes(table: dict[str, str]) -> Callable[[str, str], str | None]:
    """A route lookup answering from ``table`` (destination host -> source address)."""
    return lambda host, port: table.get(host)


def _no_route(host: str, port: str) -> str | None:
    return None


def _interfaces(*addresses: str) -> Callable[[], list[str]]:
    return lambda: list(addresses)


def test_a_lab_namespace_with_no_default_route_advertises_its_one_interface_address() -> None:
    # A lab namespace has no default route: the peer advertised 127.0.0.1, and peers that
    # learned its record dialled their own loopback.
    host = _routable_host(
        "0.0.0.0",
        (),
        route_source=_no_route,
        interface_addresses=_interfaces("127.0.0.1", "10.213.0.10", "169.254.3.1"),
    )
    assert host == "10.213.0.10"


def test_a_machine_with_only_loopback_advertises_loopback_for_a_local_swarm() -> None:
    for wildcard in ("0.0.0.0", "::", "[::]"):
        host = _routable_host(
            wildcard, (), route_source=_no_route, interface_addresses=_interfaces("127.0.0.1")
        )
        assert host == "127.0.0.1"


def test_several_addresses_and_no_route_is_an_error_naming_advertise() -> None:
    interfaces = _interfaces("127.0.0.1", "10.0.0.2", "192.168.7.2")
    with pytest.raises(ConfigError, match=r"--advertise HOST:PORT") as refused:
        _routable_host("0.0.0.0", (), route_source=_no_route, interface_addresses=interfaces)
    assert "10.0.0.2, 192.168.7.2" in str(refused.value)
    # A node that does not announce (`gossamer peers`) is dialled by nobody: loopback will do.
    host = _routable_host(
        "0.0.0.0", (), strict=False, route_source=_no_route, interface_addresses=interfaces
    )
    assert host == "127.0.0.1"


def test_the_route_to_the_bootstrap_peers_comes_first_then_the_default_route() -> None:
    interfaces = _interfaces("127.0.0.1", "10.0.0.2", "192.168.7.2")
    routes = _routes({"10.0.0.9": "10.0.0.2", "192.0.2.1": "192.168.7.2"})
    towards = ("abc@10.0.0.9:7000",)
    assert _routable_host(
        "0.0.0.0", towards, route_source=routes, interface_addresses=interfaces
    ) == ("10.0.0.2")
    assert _routable_host("0.0.0.0", (), route_source=routes, interface_addresses=interfaces) == (
        "192.168.7.2"
    )
    v6 = _routes({"2001:db8::1": "fd00::2"})
    assert _routable_host("::", (), route_source=v6, interface_addresses=interfaces) == "[fd00::2]"


def test_a_host_that_is_not_a_wildcard_is_advertised_as_given() -> None:
    def unused() -> list[str]:
        raise AssertionError("a named host needs no interface list")

    assert _routable_host("10.1.2.3", (), interface_addresses=unused) == "10.1.2.3"
