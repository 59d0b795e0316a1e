"""Transport benchmark: bulk stream throughput and RPC round trips between two peers on loopback.

Every throughput figure is a ratio against a plain TCP transfer of the same bytes over the same
link (loopback), measured in the same run; round trips are DHT pings on an open connection.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from gossamer.net.config import NodeConfig
from gossamer.net.connections import DialTarget
from gossamer.net.node import Node
from gossamer.proto import net_pb2

__all__ = ["TransportResult", "plain_tcp_bytes_per_s", "run_transport_bench"]

_PING = "/gossamer.net.v1.Dht/Ping"


@dataclass(slots=True)
class TransportResult:
    """What one run measured."""

    payload_bytes: int
    """Bytes per transfer."""
    stream_bytes_per_s: dict[int, float] = field(default_factory=dict)
    """Best Gossamer stream throughput by number of parallel streams."""
    tcp_bytes_per_s: float = 0.0
    """Best plain TCP throughput for the same bytes on loopback."""
    rpc_p50_s: float = 0.0
    """Median round trip of a small RPC."""
    rpc_p99_s: float = 0.0
    """99th percentile round trip."""

    def to_json(self) -> dict[str, Any]:
        """JSON-ready fields, ratios included."""
        fields = asdict(self)
        fields["stream_bytes_per_s"] = {str(k): v for k, v in self.stream_bytes_per_s.items()}
        fields["ratio_to_tcp"] = {
            str(k): v / self.tcp_bytes_per_s for k, v in self.stream_bytes_per_s.items()
        }
        return fields


def plain_tcp_bytes_per_s(payload: bytes) -> float:
    """Send ``payload`` over one loopback TCP connection (a thread receives); bytes per second."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received = 0

    def receive() -> None:
        nonlocal received
        connection, _ = listener.accept()
        with connection:
            buffer = bytearray(1 << 20)
            while count := connection.recv_into(buffer):
                received += count

    thread = threading.Thread(target=receive)
    thread.start()
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sender:
        sender.sendall(payload)
    thread.join(60)
    elapsed = time.perf_counter() - started
    listener.close()
    assert received == len(payload)
    return len(payload) / elapsed


async def _measure(
    payload: bytes, streams: tuple[int, ...], repeats: int, num_pings: int
) -> TransportResult:
    config = NodeConfig(listen_address="127.0.0.1:0")
    result = TransportResult(payload_bytes=len(payload))
    async with Node(config) as a, Node(config) as b:
        done = asyncio.Event()

        async def handler(sender: str, topic: str, data: bytearray) -> None:
            done.set()

        b.on_bulk("bench", handler)
        await a.pool.dial(DialTarget(b.addresses[0]), expected_peer_id=b.peer_id)
        for num_streams in streams:
            best = 0.0
            for _ in range(repeats):
                done.clear()
                started = time.perf_counter()
                await a.send_bulk(b.peer_id, "bench", payload, num_streams=num_streams)
                best = max(best, len(payload) / (time.perf_counter() - started))
            result.stream_bytes_per_s[num_streams] = best
        latencies = []
        for sequence in range(num_pings):
            started = time.perf_counter()
            await a.call(
                b.peer_id, _PING, net_pb2.PingRequest(sequence=sequence), net_pb2.PingResponse
            )
            latencies.append(time.perf_counter() - started)
        latencies.sort()
        result.rpc_p50_s = statistics.median(latencies)
        result.rpc_p99_s = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return result


def run_transport_bench(
    *,
    payload_bytes: int = 64 << 20,
    streams: tuple[int, ...] = (1, 4),
    repeats: int = 3,
    num_pings: int = 300,
) -> TransportResult:
    """Measure stream throughput, plain TCP for the same bytes, and RPC round trips."""
    payload = os.urandom(payload_bytes)
    result = asyncio.run(_measure(payload, streams, repeats, num_pings))
    result.tcp_bytes_per_s = max(plain_tcp_bytes_per_s(payload) for _ in range(repeats))
    return result
