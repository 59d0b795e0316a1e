"""How long gRPC waits for a ping's ack: apart from the sockets' TCP_USER_TIMEOUT."""

from __future__ import annotations

import pytest

from gossamer.core.errors import ConfigError
from gossamer.net.config import NodeConfig
from gossamer.net.server import grpc_options


def test_a_pings_ack_may_wait_longer_than_unacked_data() -> None:
    # At gRPC's own 60 s an upload whose link fell to 100 kbit/s failed ("ping timeout"): the
    # answer waited behind 1.1 MB in the sender's socket (tests/netlab/
    # test_net_ping_ack_behind_upload.py). The sockets' TCP_USER_TIMEOUT, which gRPC takes from
    # its keepalive timeout, stays as it was.
    options = dict(grpc_options(NodeConfig()))
    assert options["grpc.http2.ping_timeout_ms"] == 300_000
    assert options["grpc.keepalive_timeout_ms"] == 60_000
    options = dict(grpc_options(NodeConfig(ping_ack_timeout_s=120.0)))
    assert options["grpc.http2.ping_timeout_ms"] == 120_000


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_ping_ack_timeout_must_be_positive(value: float) -> None:
    with pytest.raises(ConfigError, match=r"net\.ping_ack_timeout_s"):
        NodeConfig(ping_ack_timeout_s=value)
