"""Bulk chunks serialized by hand parse back as protobuf's own; whole-chunk transfers arrive."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossamer.core.clock import FakeClock
from gossamer.core.errors import PeerUnavailableError, ProtocolError
from gossamer.net.bulk import (
    BulkReceiver,
    ReceivedChunk,
    _encode_chunk,
    _Pieces,
    decode_chunk,
)
from gossamer.net.config import LimitsConfig
from gossamer.net.connections import ended_under_call
from gossamer.net.counters import NetCounters
from gossamer.net.handshake import Session
from gossamer.net.server import _session_var
from gossamer.proto import net_pb2


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, (2 << 20) + 5])
def test_a_hand_serialized_chunk_parses_as_the_protobuf_message(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    head = {"transfer_id": "ab", "topic": "t", "total_bytes": 99, "num_streams": 3, "offset": 7}
    wire = _encode_chunk(net_pb2.BulkChunk(**head), [memoryview(data)])
    assert net_pb2.BulkChunk.FromString(wire) == net_pb2.BulkChunk(**head, data=data)
    split = [memoryview(data)[: size // 3], memoryview(data)[size // 3 :]]
    assert _encode_chunk(net_pb2.BulkChunk(**head), split) == wire
    plain = _encode_chunk(net_pb2.BulkChunk(offset=5), [memoryview(data)])
    assert net_pb2.BulkChunk.FromString(plain) == net_pb2.BulkChunk(offset=5, data=data)


async def _push(receiver: BulkReceiver, chunks: list[net_pb2.BulkChunk]) -> net_pb2.BulkAck:
    async def stream() -> AsyncIterator[ReceivedChunk]:
        for chunk in chunks:
            yield decode_chunk(chunk.SerializeToString())

    _session_var.set(Session("sender", b"k" * 32, 0.0))
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
    with pytest.raises(ProtocolError, match="past its stream"):
        asyncio.run(_push(receiver, chunks))
    assert receiver.num_incomplete == 0


_HEADS = st.fixed_dictionaries(
    {},
    optional={
        "transfer_id": st.text(max_size=40),
        "topic": st.text(max_size=40),
        "total_bytes": st.integers(0, (1 << 64) - 1),
        "offset": st.integers(0, (1 << 64) - 1),
        "num_streams": st.integers(0, (1 << 32) - 1),
    },
)


@settings(max_examples=300, deadline=None)
@given(_HEADS, st.binary(max_size=2000))
def test_a_chunk_decodes_without_copying_its_data(head: dict[str, Any], data: bytes) -> None:
    wire = net_pb2.BulkChunk(**head, data=data).SerializeToString()
    chunk = decode_chunk(wire)
    assert chunk.fields == net_pb2.BulkChunk(**head)
    assert chunk.data == data
    if data:
        assert chunk.data.obj is wire  # a view of the received bytes, not a copy


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_decode_chunk_agrees_with_protobuf_or_refuses(wire: bytes) -> None:
    try:
        expected: net_pb2.BulkChunk | None = net_pb2.BulkChunk.FromString(wire)
    except Exception:
        expected = None
    try:
        chunk = decode_chunk(wire)
    except ProtocolError:
        return  # refusing is always safe; protobuf may accept groups, which no sender writes
    assert expected is not None, "decode_chunk accepted bytes protobuf refuses"
    assert chunk.data == expected.data
    expected.ClearField("data")
    assert chunk.fields == expected


def test_decode_chunk_keeps_the_last_of_repeated_data_fields() -> None:
    wire = (
        net_pb2.BulkChunk(offset=3, data=b"first").SerializeToString()
        + net_pb2.BulkChunk(data=b"second").SerializeToString()
    )
    assert net_pb2.BulkChunk.FromString(wire).data == b"second"
    chunk = decode_chunk(wire)
    assert (chunk.fields.offset, bytes(chunk.data)) == (3, b"second")


@pytest.mark.parametrize(
    "wire",
    [
        bytes([5 << 3 | 2, 10]) + b"short",  # data runs past the end
        bytes([4 << 3 | 0, 0x80]),  # varint cut short
        bytes([4 << 3 | 0]) + b"\xff" * 11,  # varint too long
        bytes([5 << 3 | 3]),  # a group
        bytes([2 << 3 | 2, 2]) + b"\xff\xfe",  # topic not UTF-8
    ],
)
def test_decode_chunk_refuses_malformed_bytes(wire: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_chunk(wire)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=50), max_size=6), st.integers(0, 400), st.integers(0, 400))
def test_a_payload_of_several_buffers_cuts_like_their_concatenation(
    buffers: list[bytes], a: int, b: int
) -> None:
    joined = b"".join(buffers)
    pieces = _Pieces([bytearray(x) for x in buffers])
    start, stop = min(a, b, len(joined)), min(max(a, b), len(joined))
    assert pieces.total == len(joined)
    cut = pieces.cut(start, stop)
    assert b"".join(cut) == joined[start:stop]
    assert all(len(v) for v in cut)


def test_a_read_only_handler_gets_a_one_chunk_transfer_as_a_view_of_the_message() -> None:
    receiver = BulkReceiver(LimitsConfig(), NetCounters(), FakeClock())
    got: list[bytearray | memoryview] = []

    async def handler(sender: str, topic: str, payload: bytearray | memoryview) -> None:
        got.append(payload)

    receiver.register("t", handler, read_only=True)
    wire = net_pb2.BulkChunk(
        transfer_id="v", topic="t", total_bytes=6, num_streams=1, offset=0, data=b"abcdef"
    ).SerializeToString()

    async def stream() -> AsyncIterator[ReceivedChunk]:
        yield decode_chunk(wire)

    _session_var.set(Session("sender", b"k" * 32, 0.0))
    ack = asyncio.run(receiver.Push(stream(), None))  # type: ignore[arg-type]
    assert ack.transfer_complete
    assert isinstance(got[0], memoryview)
    assert got[0].obj is wire  # no copy
    assert got[0].readonly
    assert bytes(got[0]) == b"abcdef"
    receiver.register("t", handler)  # registered again without read_only: its own copy
    head = {"transfer_id": "u", "topic": "t", "total_bytes": 2, "num_streams": 1}
    asyncio.run(_push(receiver, [net_pb2.BulkChunk(**head, offset=0, data=b"xy")]))
    assert isinstance(got[1], bytearray)


def test_a_call_cancelled_under_a_task_is_an_unavailable_peer_and_a_task_cancel_stays_one() -> None:
    async def call_ended() -> PeerUnavailableError | None:
        return ended_under_call("peer")

    assert isinstance(asyncio.run(call_ended()), PeerUnavailableError)

    async def cancelled_task() -> None:
        started = asyncio.Event()
        seen: list[PeerUnavailableError | None] = []

        async def victim() -> None:
            started.set()
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                seen.append(ended_under_call("peer"))
                raise

        task = asyncio.create_task(victim())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == [None]

    asyncio.run(cancelled_task())
