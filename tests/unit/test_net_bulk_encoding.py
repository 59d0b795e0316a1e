"""Bulk chunks serialized by hand parse back as protobuf's own; whole-chunk transfers arrive."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gossamer.core.clock import FakeClock
from gossamer.core.errors import ProtocolError
from gossamer.net.bulk import BulkReceiver, _encode_chunk
from gossamer.net.config import LimitsConfig
from gossamer.net.counters import NetCounters
from gossamer.net.handshake import Session
from gossamer.net.server import _session_var
from gossamer.proto import net_pb2


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, (2 << 20) + 5])
def test_a_hand_serialized_chunk_parses_as_the_protobuf_message(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    head = {"transfer_id": "ab", "topic": "t", "total_bytes": 99, "num_streams": 3, "offset": 7}
    wire = _encode_chunk(net_pb2.BulkChunk(**head), memoryview(data))
    assert net_pb2.BulkChunk.FromString(wire) == net_pb2.BulkChunk(**head, data=data)
    plain = _encode_chunk(net_pb2.BulkChunk(offset=5), memoryview(data))
    assert net_pb2.BulkChunk.FromString(plain) == net_pb2.BulkChunk(offset=5, data=data)


async def _push(receiver: BulkReceiver, chunks: list[net_pb2.BulkChunk]) -> net_pb2.BulkAck:
    async def stream() -> AsyncIterator[net_pb2.BulkChunk]:
        for chunk in chunks:
            yield chunk

    _session_var.set(Session("sender", b"k" * 32, 0.0, None))
    return await receiver.Push(stream(), None)  # type: ignore[arg-type]


def test_a_transfer_in_one_chunk_is_delivered_as_a_mutable_buffer() -> None:
    receiver = BulkReceiver(LimitsConfig(), NetCounters(), FakeClock())
    got: list[bytearray] = []

    async def handler(sender: str, topic: str, payload: bytearray) -> None:
        got.append(payload)

    receiver.register("t", handler)
    head = {"transfer_id": "z", "topic": "t", "total_bytes": 6, "num_streams": 1}
    ack = asyncio.run(_push(receiver, [net_pb2.BulkChunk(**head, offset=0, data=b"abcdef")]))
    assert ack.transfer_complete
    assert ack.received_bytes == 6
    assert got == [bytearray(b"abcdef")]
    assert isinstance(got[0], bytearray)
    assert receiver.num_incomplete == 0
    assert receiver._inflight_bytes == 0


def test_a_chunk_past_a_whole_first_chunk_is_refused() -> None:
    receiver = BulkReceiver(LimitsConfig(), NetCounters(), FakeClock())

    async def handler(sender: str, topic: str, payload: bytearray) -> None:
        raise AssertionError("an overlong transfer must never be delivered")

    receiver.register("t", handler)
    head = {"transfer_id": "w", "topic": "t", "total_bytes": 2, "num_streams": 1}
    chunks = [
        net_pb2.BulkChunk(**head, offset=0, data=b"ab"),
        net_pb2.BulkChunk(offset=2, data=b"c"),
    ]
    with pytest.raises(ProtocolError, match="past the announced size"):
        asyncio.run(_push(receiver, chunks))
    assert receiver.num_incomplete == 0
