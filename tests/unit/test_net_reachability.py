"""The dial-back servicer: which addresses it dials a caller back at."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from gossamer.net import reachability
from gossamer.net.connections import DialTarget
from gossamer.net.reachability import ReachabilityServicer
from gossamer.proto import net_pb2


class _RecordingPool:
    """Records the dials asked of it; each one succeeds."""

    def __init__(self) -> None:
        self.dialled: list[str] = []

    async def dial(self, target: DialTarget, **kwargs: Any) -> None:
        self.dialled.append(target.address)


class _Context:
    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer


def _dial_back(
    monkeypatch: pytest.MonkeyPatch, seen: str, addresses: list[str], *, loopback_ok: bool
) -> list[str]:
    monkeypatch.setattr(reachability, "current_session", lambda: SimpleNamespace(peer_id="p"))
    pool = _RecordingPool()
    servicer = ReachabilityServicer(pool, loopback_ok=lambda: loopback_ok)  # type: ignore[arg-type]
    request = net_pb2.DialBackRequest(addresses=addresses)
    response = asyncio.run(servicer.DialBack(request, _Context(seen)))  # type: ignore[arg-type]
    assert list(response.reachable_addresses) == pool.dialled
    return pool.dialled


def test_a_caller_is_dialled_back_on_the_ports_of_its_addresses_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A bare IPv6 address (no port) was read as port 2 ("fd00::2".rpartition(":")), and
    # "07000" dialled port 7000 a second time.
    addresses = ["fd00::2", "198.51.100.7:7000", "[2001:db8::1]:07000", "x.example:7001"]
    dialled = _dial_back(monkeypatch, "ipv4:198.51.100.7:5555", addresses, loopback_ok=False)
    assert dialled == ["198.51.100.7:7000", "198.51.100.7:7001"]
    dialled = _dial_back(monkeypatch, "ipv6:%5B2001:db8::9%5D:5555", addresses, loopback_ok=False)
    assert dialled == ["[2001:db8::9]:7000", "[2001:db8::9]:7001"]


@pytest.mark.parametrize("seen", ["ipv4:127.0.0.1:5555", "ipv6:[::ffff:127.0.0.1]:5555"])
def test_a_caller_from_loopback_is_dialled_back_only_where_this_node_is_on_loopback(
    monkeypatch: pytest.MonkeyPatch, seen: str
) -> None:
    assert _dial_back(monkeypatch, seen, ["127.0.0.1:7000"], loopback_ok=False) == []
    assert _dial_back(monkeypatch, seen, ["127.0.0.1:7000"], loopback_ok=True) != []


def test_a_caller_on_a_unix_socket_is_not_dialled_back(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _dial_back(monkeypatch, "unix:/tmp/s", ["127.0.0.1:7000"], loopback_ok=True) == []
