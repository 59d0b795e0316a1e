"""Half-started multi-stream bulk transfers are dropped after an idle timeout (fake clock)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from gossamer.core.clock import FakeClock
from gossamer.net.bulk import BulkReceiver, ReceivedChunk, decode_chunk
from gossamer.net.config import LimitsConfig
from gossamer.net.counters import NetCounters
from gossamer.net.handshake import Session
from gossamer.net.server import _session_var
from gossamer.proto import net_pb2


async def _push(receiver: BulkReceiver, chunks: list[net_pb2.BulkChunk]) -> net_pb2.BulkAck:
    async def stream() -> AsyncIterator[ReceivedChunk]:
        for chunk in chunks:
            yield decode_chunk(chunk.SerializeToString())

    _session_var.set(Session("sender", b"k" * 32, 0.0, None))
    return await receiver.Push(stream(), None)  # type: ignore[arg-type]


def test_transfer_whose_other_stream_never_starts_is_dropped_after_the_idle_timeout() -> None:
    clock = FakeClock()
    counters = NetCounters()
    receiver = BulkReceiver(LimitsConfig(bulk_idle_timeout_s=30.0), counters, clock)

    async def handler(sender: str, topic: str, payload: bytearray) -> None:
        raise AssertionError("an incomplete transfer must never be delivered")

    receiver.register("t", handler)
    first_half = net_pb2.BulkChunk(
        transfer_id="x", topic="t", total_bytes=10, num_streams=2, offset=0, data=b"01234"
    )
    ack = asyncio.run(_push(receiver, [first_half]))
    assert not ack.transfer_complete
    assert receiver.num_incomplete == 1
    clock.advance(29.0)
    assert receiver.expire_idle() == 0  # not idle long enough yet
    clock.advance(2.0)
    assert receiver.expire_idle() == 1
    assert receiver.num_incomplete == 0
    assert receiver._inflight_bytes == 0
    assert counters.bulk_transfers_expired == 1


def test_a_completed_transfer_is_not_counted_as_expired() -> None:
    clock = FakeClock()
    counters = NetCounters()
    receiver = BulkReceiver(LimitsConfig(bulk_idle_timeout_s=1.0), counters, clock)
    got: list[bytes] = []

    async def handler(sender: str, topic: str, payload: bytearray) -> None:
        got.append(bytes(payload))

    receiver.register("t", handler)
    head = {"transfer_id": "y", "topic": "t", "total_bytes": 4, "num_streams": 2}
    asyncio.run(_push(receiver, [net_pb2.BulkChunk(**head, offset=0, data=b"ab")]))
    asyncio.run(_push(receiver, [net_pb2.BulkChunk(**head, offset=2, data=b"cd")]))
    clock.advance(5.0)
    assert receiver.expire_idle() == 0
    assert got == [b"abcd"]
    assert counters.bulk_transfers_expired == 0
