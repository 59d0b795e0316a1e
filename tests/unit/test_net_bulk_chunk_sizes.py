"""A bulk stream sizes its chunks to the link: small at first, doubling while they go out fast,
halving when one is slow, so a chunk takes seconds on any link (the receiver gives up on a
stream that brings no whole chunk for ``limits.bulk_idle_timeout_s``)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable

import pytest

from gossamer.core.clock import FakeClock
from gossamer.net.bulk import (
    BulkReceiver,
    ReceivedChunk,
    _ChunkSizes,
    _Pieces,
    _stream_chunks,
    decode_chunk,
)
from gossamer.net.config import LimitsConfig
from gossamer.net.counters import NetCounters
from gossamer.net.handshake import Session
from gossamer.net.server import _session_var
from gossamer.proto import net_pb2

KiB, MiB = 1024, 1024 * 1024
IDLE_TIMEOUT_S = LimitsConfig().bulk_idle_timeout_s


def test_chunks_start_small_double_while_fast_and_halve_when_slow() -> None:
    sizes = _ChunkSizes(4 * MiB)
    seen = [sizes.next_bytes]
    for seconds in [0.1, 0.5, 1.0, 0.2, 0.2, 0.2]:  # fast: doubles up to the largest
        sizes.took(seconds)
        seen.append(sizes.next_bytes)
    assert seen == [256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB, 4 * MiB, 4 * MiB, 4 * MiB]
    sizes.took(2.5)  # neither fast nor slow: stays
    assert sizes.next_bytes == 4 * MiB
    for expected in [2 * MiB, 1 * MiB, 512 * KiB, 256 * KiB, 256 * KiB]:
        sizes.took(30.0)  # slow: halves, not below the first size
        assert sizes.next_bytes == expected
    assert _ChunkSizes(100 * KiB).next_bytes == 100 * KiB  # never past the largest chunk
    # a transfer's streams share the link, and the first size among them (16 KiB at least)
    assert _ChunkSizes(4 * MiB, num_streams=4).next_bytes == 64 * KiB
    assert _ChunkSizes(4 * MiB, num_streams=64).min_bytes == 16 * KiB
    with pytest.raises(ValueError, match="at least 1"):
        _ChunkSizes(0)


async def _send_over_link(
    payload: bytes, num_streams: int, seconds_for: Callable[[int, float], float]
) -> tuple[list[list[bytes]], list[list[float]]]:
    """The wire chunks of each stream of ``payload``, and the time from each to the stream's
    next (what the stream measures, and what the receiver waits) on a link where a chunk of
    ``n`` bytes sent at time ``t`` takes ``seconds_for(n, t)``; streams take turns on it,
    chunk by chunk."""
    clock = FakeClock()
    total = len(payload)
    bounds = [total * i // num_streams for i in range(num_streams + 1)]
    pieces = _Pieces(payload)
    streams = [
        aiter(
            _stream_chunks(
                pieces,
                net_pb2.BulkChunk(
                    transfer_id="x",
                    topic="t",
                    total_bytes=total,
                    num_streams=num_streams,
                    offset=bounds[i],
                ),
                bounds[i + 1],
                _ChunkSizes(4 * MiB, num_streams),
                clock,
            )
        )
        for i in range(num_streams)
    ]
    wires: list[list[bytes]] = [[] for _ in streams]
    times: list[list[float]] = [[] for _ in streams]
    open_streams = set(range(num_streams))
    yielded_at = [0.0] * num_streams
    while open_streams:
        for i in sorted(open_streams):
            if wires[i]:
                times[i].append(clock.monotonic() - yielded_at[i])
            try:
                wire = await anext(streams[i])
            except StopAsyncIteration:
                open_streams.discard(i)
                continue
            yielded_at[i] = clock.monotonic()
            clock.advance(seconds_for(len(wire), clock.monotonic()))
            wires[i].append(wire)
    return wires, times


def _deliver(wires: list[list[bytes]]) -> list[bytes]:
    """Push each stream's chunks into a receiver: the payloads its handler got."""
    got: list[bytes] = []

    async def handler(sender: str, topic: str, payload: bytearray) -> None:
        got.append(bytes(payload))

    receiver = BulkReceiver(LimitsConfig(), NetCounters(), FakeClock())
    receiver.register("t", handler)

    async def push(stream: list[bytes]) -> None:
        async def chunks() -> AsyncIterator[ReceivedChunk]:
            for wire in stream:
                yield decode_chunk(wire)

        _session_var.set(Session("sender", b"k" * 32, 0.0))
        await receiver.Push(chunks(), None)  # type: ignore[arg-type]

    for stream in wires:
        asyncio.run(push(stream))
    assert receiver._inflight_bytes == 0
    return got


def test_chunks_on_a_1_mbit_link_take_seconds_and_arrive_intact() -> None:
    # Chunks of 4 MiB took 35 s each at 1 Mbit/s: the receiver gave up after 30 s.
    payload = os.urandom(6 * MiB)
    wires, times = asyncio.run(_send_over_link(payload, 1, lambda n, t: n * 8 / 1e6))
    assert max(times[0]) < 5.0, times
    assert sum(times[0]) < 1.01 * len(payload) * 8 / 1e6  # (the link is kept busy)
    assert _deliver(wires) == [payload]


def test_chunks_on_a_fast_link_grow_to_the_largest_in_a_few() -> None:
    payload = bytes(40 * MiB)
    wires, _ = asyncio.run(_send_over_link(payload, 1, lambda n, t: n * 8 / 1e9))
    sizes = [len(decode_chunk(wire).data) for wire in wires[0]]
    assert sizes == [256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB] + [4 * MiB] * 9 + [256 * KiB]
    assert hashlib.sha256(b"".join(_deliver(wires))).digest() == hashlib.sha256(payload).digest()


def test_streams_whose_link_slows_down_shrink_their_chunks_and_arrive_intact() -> None:
    # 100 Mbit/s for a second, then 10 Mbit/s: each of two streams grows its chunks, then
    # halves them (the receiver takes chunks of any size, each within its stream's share).
    def seconds_for(num_bytes: int, now_s: float) -> float:
        return num_bytes * 8 / (100e6 if now_s < 1.0 else 10e6)

    payload = os.urandom(40 * MiB)
    wires, times = asyncio.run(_send_over_link(payload, 2, seconds_for))
    sizes = [[len(decode_chunk(wire).data) for wire in stream] for stream in wires]
    for stream_sizes, stream_times in zip(sizes, times, strict=True):
        assert max(stream_sizes) == 4 * MiB  # grew while fast
        assert stream_sizes[-2] == 2 * MiB  # shrank once slow
        assert max(stream_times) < 10.0, stream_times
    assert _deliver(wires) == [payload]
