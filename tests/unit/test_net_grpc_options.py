"""The gRPC options every channel and server of a node takes."""

from __future__ import annotations

from gossamer.net.config import NodeConfig
from gossamer.net.server import grpc_options


def test_no_ping_deadline_shorter_than_grpcs_own_closes_busy_connections() -> None:
    # grpc.http2.ping_timeout_ms set to keepalive_timeout_s (5 s) closed connections whose ack
    # waited behind data queued on a saturated thin uplink: `gossamer bench allreduce --peers 2
    # --size 2MB --rate 1mbit --backend p2p` then failed its round (126 s, peers dropped).
    options = dict(grpc_options(NodeConfig(keepalive_timeout_s=5.0)))
    assert options.get("grpc.http2.ping_timeout_ms", 60_000) >= 60_000
    assert options["grpc.keepalive_timeout_ms"] == 5_000
