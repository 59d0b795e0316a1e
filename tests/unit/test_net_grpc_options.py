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


def test_sockets_wait_for_acks_longer_than_a_thin_links_queues() -> None:
    # gRPC sets TCP_USER_TIMEOUT to its keepalive timeout. Taken from keepalive_timeout_s (5 s),
    # the kernel aborted connections on a 500 kbit/s link busy both ways (12-16 a run per
    # NATed peer behind a relay); the relay watches keep keepalive_timeout_s to themselves.
    # (20 s: the tunnelled connection's keepalive ping, queued behind its bulk data, went
    # unanswered that long and gRPC closed the connection; 60 s: both transfers went through.)
    options = dict(grpc_options(NodeConfig(keepalive_timeout_s=5.0)))
    assert options["grpc.keepalive_timeout_ms"] == 60_000
    options = dict(grpc_options(NodeConfig(unacked_data_timeout_s=30.0)))
    assert options["grpc.keepalive_timeout_ms"] == 30_000
