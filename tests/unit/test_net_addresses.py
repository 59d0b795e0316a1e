"""Addresses peers name to each other: what a dial may be given, and records that name others."""

from __future__ import annotations

import pytest

from gossamer.core.errors import ConfigError, ProtocolError
from gossamer.net.addresses import host_of, ip_of, join_host_port, port_of, split_host_port
from gossamer.net.config import NodeConfig
from gossamer.net.identity import Identity
from gossamer.net.node import Node
from gossamer.net.records import parse_peer_record, sign_peer_record
from gossamer.proto import net_pb2

NOW = 1.7e9


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:7000", ("127.0.0.1", 7000)),
        ("[::1]:65535", ("::1", 65535)),
        ("peer-3.example.org:1", ("peer-3.example.org", 1)),
        ("gpu_box:443", ("gpu_box", 443)),
    ],
)
def test_addresses_a_dial_can_take(address: str, expected: tuple[str, int]) -> None:
    assert split_host_port(address) == expected


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1:99999",  # socket.connect raised OverflowError
        "127.0.0.1:0",
        f"127.0.0.1:{'1' * 5000}",  # int() raised ValueError past 4,300 digits
        "127.0.0.1:\u00b2",  # a Unicode digit: isdigit() says yes, int() says no
        "127.0.0.1",
        ":7000",
        "a\x00b:1",
        "caf\u00e9.example:1",
        f"{'a' * 64}.example:1",  # a label over 63: the IDNA codec raised UnicodeError
        f"{'a.' * 130}b:1",
        "[not-v6]:1",
        "-lead.example:1",
        "a..b:1",
    ],
)
def test_addresses_that_are_not_host_port_are_refused(address: str) -> None:
    with pytest.raises(ProtocolError):
        split_host_port(address)


@pytest.mark.parametrize("where", ["addresses", "relays"])
def test_a_peer_record_naming_an_address_no_dial_takes_is_refused(where: str) -> None:
    """Such a record, signed and gossiped, made every peer that dialled it fail its lookups
    with errors outside Gossamer's, and ended the node's maintenance task."""
    identity = Identity.generate()
    value = net_pb2.PeerRecordValue(addresses=["127.0.0.1:7000"])
    if where == "addresses":
        value.addresses.append("127.0.0.1:99999")
    else:
        value.relays.add(relay_peer_id=Identity.generate().peer_id, relay_address="x:99999")
    signed = sign_peer_record(identity, value, now_s=NOW, ttl_s=60)
    with pytest.raises(ProtocolError, match=r"1\.\.65535"):
        parse_peer_record(signed, now_s=NOW, max_value_bytes=16384)
    good = sign_peer_record(
        identity, net_pb2.PeerRecordValue(addresses=["127.0.0.1:7000"]), now_s=NOW, ttl_s=60
    )
    assert parse_peer_record(good, now_s=NOW, max_value_bytes=16384).addresses == (
        "127.0.0.1:7000",
    )


@pytest.mark.parametrize("address", ["peer.example.com.:7000", "::1:7000", "caf\u00e9.example:1"])
def test_an_advertised_address_others_would_refuse_is_a_config_error(address: str) -> None:
    """The node started, and its record was refused by everyone: invisible, and never told."""
    with pytest.raises(ConfigError, match=r"net\.advertise_addresses"):
        NodeConfig(listen_address="127.0.0.1:0", advertise_addresses=(address,))


PEER = "a" * 52


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [
        ("127.0.0.1:7000", "127.0.0.1", 7000),
        ("0.0.0.0:0", "0.0.0.0", 0),  # (a listen address: port 0 picks one)
        ("[::1]:7000", "::1", 7000),
        ("[::]:0", "::", 0),
        ("[fe80::1%eth0]:7000", "fe80::1%eth0", 7000),  # (a dial needs the zone)
        ("peer-3.example.org:1", "peer-3.example.org", 1),
        (f"{PEER}@10.0.0.9:7000", "10.0.0.9", 7000),
        (f"{PEER}@[fd00::2]:7000", "fd00::2", 7000),
    ],
)
def test_the_host_and_port_of_an_address(address: str, host: str, port: int) -> None:
    assert host_of(address) == host
    assert port_of(address) == port
    assert host_of(join_host_port(host, port)) == host


@pytest.mark.parametrize(
    "address",
    [
        "",
        "127.0.0.1",  # no port
        "fd00::2",  # a bare IPv6 address: rpartition(":") read host "fd00:" at port 2
        "::1:7000",  # an IPv6 host without brackets: which colon starts the port?
        "[::1]",
        ":7000",
        "[]:7000",
        f"{PEER}@",
        "host:port",
        "host:99999",
        "host:\u00b2",
        "[::1]x:7000",
    ],
)
def test_an_address_with_no_clear_host_and_port_is_a_value_error(address: str) -> None:
    with pytest.raises(ValueError, match=r"HOST:PORT|brackets|no host"):
        host_of(address)
    with pytest.raises(ValueError, match=r"HOST:PORT|brackets|no host"):
        port_of(address)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("10.0.0.1", "10.0.0.1"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("[fd00::2]", "fd00::2"),
        ("fe80::1%eth0", "fe80::1"),  # (a zone names an interface of one machine only)
        ("[fe80::1%eth0]", "fe80::1"),
        ("::ffff:192.0.2.4", "192.0.2.4"),  # (a dual-stack socket's view of an IPv4 peer)
        ("example.org", None),
        ("localhost", None),  # (names are not looked up)
        ("", None),
        ("[::1", None),
        ("10.0.0.1:7000", None),  # (an address, not a host)
    ],
)
def test_the_ip_address_of_a_host(host: str, expected: str | None) -> None:
    ip = ip_of(host)
    assert (None if ip is None else str(ip)) == expected


def test_an_ipv6_host_is_bracketed_once_joined_with_its_port() -> None:
    assert join_host_port("::1", 7000) == "[::1]:7000"
    assert join_host_port("[::1]", 7000) == "[::1]:7000"
    assert join_host_port("10.0.0.1", 1) == "10.0.0.1:1"
    assert join_host_port("peer.example.org", 443) == "peer.example.org:443"


class _Config:
    def __init__(self, listen_address: str) -> None:
        self.listen_address = listen_address


class _Node:
    """What :class:`Node`'s address methods read of it."""

    _local_address = Node._local_address
    _reached_on_loopback = Node._reached_on_loopback

    def __init__(self, listen_address: str = "0.0.0.0:0", *addresses: str) -> None:
        self.config = _Config(listen_address)
        self.port = 7000
        self.addresses = addresses


@pytest.mark.parametrize(
    ("listening", "local"),
    [
        ("0.0.0.0:0", "127.0.0.1:7000"),
        ("192.0.2.4:7000", "192.0.2.4:7000"),
        ("[::]:0", "[::1]:7000"),  # was "::1:7000", no HOST:PORT
        ("[fd00::2]:7000", "[fd00::2]:7000"),  # was "fd00::2:7000"
    ],
)
def test_where_tunnels_reach_a_nodes_own_server_is_host_port(listening: str, local: str) -> None:
    address = _Node(listening)._local_address()
    assert address == local
    assert split_host_port(address) == (host_of(local), 7000)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:7000", True),
        ("127.3.4.5:7000", True),
        ("[::1]:7000", True),
        ("localhost:7000", True),
        ("[0:0:0:0:0:0:0:1]:7000", True),  # was not loopback: not written "::1"
        ("[::ffff:127.0.0.1]:7000", True),  # nor this
        ("127.example.org:7000", False),  # a name that starts "127." was loopback
        ("192.0.2.4:7000", False),
        ("[fd00::2]:7000", False),
    ],
)
def test_a_node_is_reached_on_loopback_where_its_address_is_a_loopback_one(
    address: str, loopback: bool
) -> None:
    assert _Node("0.0.0.0:0", address)._reached_on_loopback() is loopback
