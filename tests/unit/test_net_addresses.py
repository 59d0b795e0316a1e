"""Addresses peers name to each other: what a dial may be given, and records that name others."""

from __future__ import annotations

import pytest

from gossamer.core.errors import ConfigError, ProtocolError
from gossamer.net.addresses import split_host_port
from gossamer.net.config import NodeConfig
from gossamer.net.identity import Identity
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
