"""Which address a peer listening on every interface advertises, with the machine's routes and
interfaces given (no sockets)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from gossamer.net.advertised_host import routable_host


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
    host = routable_host(
        "0.0.0.0",
        (),
        route_source=_no_route,
        interface_addresses=_interfaces("127.0.0.1", "10.213.0.10", "169.254.3.1"),
    )
    assert host == "10.213.0.10"


def test_a_machine_with_only_loopback_advertises_loopback_for_a_local_swarm() -> None:
    for wildcard in ("0.0.0.0", "::", "[::]"):
        host = routable_host(
            wildcard, (), route_source=_no_route, interface_addresses=_interfaces("127.0.0.1")
        )
        assert host == "127.0.0.1"


def test_several_addresses_and_no_route_advertise_loopback_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An offline machine with docker0 and virbr0 up: `gossamer peer start` refused to start
    # ("pass --advertise"), and `gossamer train`, which has no --advertise, got the same advice;
    # a swarm on this machine alone worked before on 127.0.0.1.
    interfaces = _interfaces("127.0.0.1", "172.17.0.1", "192.168.122.1")
    with caplog.at_level(logging.WARNING, logger="gossamer.net.advertised_host"):
        host = routable_host(
            "0.0.0.0",
            (),
            warn_as="abcdefghijklmnopqrstuvwxyz",
            route_source=_no_route,
            interface_addresses=interfaces,
        )
    assert host == "127.0.0.1"
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = warning.getMessage()
    assert "abcdefghijkl" in message  # (the peer's short id)
    assert "172.17.0.1, 192.168.122.1" in message
    assert "--advertise HOST:PORT" in message
    assert "--swarm.listen HOST:PORT" in message
    # A node that does not announce (`gossamer peers`) is dialled by nobody: nothing to say.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gossamer.net.advertised_host"):
        host = routable_host("0.0.0.0", (), route_source=_no_route, interface_addresses=interfaces)
    assert host == "127.0.0.1"
    assert not caplog.records


def test_the_route_to_the_bootstrap_peers_comes_first_then_the_default_route() -> None:
    interfaces = _interfaces("127.0.0.1", "10.0.0.2", "192.168.7.2")
    routes = _routes({"10.0.0.9": "10.0.0.2", "192.0.2.1": "192.168.7.2"})
    towards = ("abc@10.0.0.9:7000",)
    assert routable_host(
        "0.0.0.0", towards, route_source=routes, interface_addresses=interfaces
    ) == ("10.0.0.2")
    assert routable_host("0.0.0.0", (), route_source=routes, interface_addresses=interfaces) == (
        "192.168.7.2"
    )
    v6 = _routes({"2001:db8::1": "fd00::2"})
    assert routable_host("::", (), route_source=v6, interface_addresses=interfaces) == "[fd00::2]"


def test_a_host_that_is_not_a_wildcard_is_advertised_as_given() -> None:
    def unused() -> list[str]:
        raise AssertionError("a named host needs no interface list")

    assert routable_host("10.1.2.3", (), interface_addresses=unused) == "10.1.2.3"
