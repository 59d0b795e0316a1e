"""A bulk stream sizes its chunks to the link: small at first, doubling while they go out fast,
back to small when one is slow, and capped by the rate the last one went at, so a chunk takes
seconds on any link (the receiver gives up on a stream that brings no whole chunk for
``limits.bulk_idle_timeout_s``)."""

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


def test_chunks_start_small_double_while_fast_and_drop_back_when_slow() -> None:
    sizes = _ChunkSizes(4 * MiB)
    seen = [sizes.next_bytes]
    for seconds in [0.1, 0.5, 1.0, 0.2, 0.2, 0.2]:  # fast: doubles up to the largest
        sizes.took(seconds)
        seen.append(sizes.next_bytes)
    assert seen == [256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB, 4 * MiB, 4 * MiB, 4 * MiB]
    sizes.took(2.5)  # neither fast nor slow: stays
    assert sizes.next_bytes == 4 * MiB
    sizes.took(30.0)  # slow: straight back to the first size (not one halving a chunk)
    assert sizes.next_bytes == 256 * KiB
    sizes.took(5.0)  # (256 KiB in 5 s: 7.5 s of it is more than the first size)
    assert sizes.next_bytes == 256 * KiB
    assert _ChunkSizes(100 * KiB).next_bytes == 100 * KiB  # never past the largest chunk
    # a transfer's streams share the link, and the first size among them (16 KiB at least)
    assert _ChunkSizes(4 * MiB, num_streams=4).next_bytes == 64 * KiB
    # and the largest (what is in flight when the link falls is as for one stream)
    assert _ChunkSizes(4 * MiB, num_streams=4).max_bytes == 1 * MiB
    assert _ChunkSizes(4 * MiB, num_streams=64).min_bytes == 16 * KiB
    with pytest.raises(ValueError, match="at least 1"):
        _ChunkSizes(0)
    with pytest.raises(ValueError, match="positive idle timeout"):
        _ChunkSizes(4 * MiB, idle_timeout_s=0.0)


def test_chunks_are_capped_to_a_quarter_of_the_idle_timeout_at_the_last_rate() -> None:
    sizes = _ChunkSizes(4 * MiB, idle_timeout_s=40.0)
    sizes.took(20.0)  # 256 KiB in 20 s: 10 s of it is 128 KiB
    assert sizes.next_bytes == 128 * KiB
    sizes.took(2.0, 64 * KiB)  # (of the bytes it sent): 10 s of it is 320 KiB, past its size
    assert sizes.next_bytes == 128 * KiB
    sizes.took(100.0, 64 * KiB)  # not below 16 KiB (nothing smaller would do better)
    assert sizes.next_bytes == 16 * KiB
    # streams share the budget: each of 4 takes 2.5 s of the 10 s at its rate
    sizes = _ChunkSizes(4 * MiB, num_streams=4, idle_timeout_s=40.0)
    sizes.took(1.0, 128 * KiB)
    assert sizes.next_bytes == 128 * KiB
    sizes.took(1.0, 128 * KiB)
    assert sizes.next_bytes == 256 * KiB  # (doubling within the cap)
    sizes.took(2.0, 256 * KiB)
    assert sizes.next_bytes == 256 * KiB
    sizes.took(3.0, 256 * KiB)
    assert sizes.next_bytes == 256 * KiB * 25 // 30
    # a chunk the buffers took at once tells nothing of the link: the slower of the last two
    sizes.took(0.0, 256 * KiB)
    assert sizes.next_bytes == 256 * KiB * 25 // 30


async def _send_over_link(
    payload: bytes, num_streams: int, seconds_for: Callable[[int, float], float]
) -> tuple[list[list[bytes]], list[list[float]]]:
    """The wire chunks of each stream of ``payload``, and the time from each to the stream's
    next (what the stream measures, and what the receiver waits) on a link where a chunk of
    ``n`` bytes sent at time ``t`` takes ``seconds_for(n, t)``; streams take turns on it,
    chunk by chunk (so a stream measures its share of the link)."""
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


def test_streams_whose_link_slows_down_keep_their_chunks_short_and_arrive_intact() -> None:
    # 100 Mbit/s for a second, then 10 Mbit/s: each of two streams grows its chunks to its
    # share of the largest (the receiver takes chunks of any size, each within its stream's
    # share), and a round of them stays within a quarter of the idle timeout.
    def seconds_for(num_bytes: int, now_s: float) -> float:
        return num_bytes * 8 / (100e6 if now_s < 1.0 else 10e6)

    payload = os.urandom(40 * MiB)
    wires, times = asyncio.run(_send_over_link(payload, 2, seconds_for))
    sizes = [[len(decode_chunk(wire).data) for wire in stream] for stream in wires]
    for stream_sizes, stream_times in zip(sizes, times, strict=True):
        assert max(stream_sizes) == 2 * MiB  # grew while fast, to its share
        assert max(stream_times) <= IDLE_TIMEOUT_S / 4, stream_times
    assert _deliver(wires) == [payload]


def _falling_link(
    before_bps: float, after_bps: float, at_s: float
) -> Callable[[int, float], float]:
    """A link of ``before_bps`` that falls to ``after_bps`` at ``at_s``: the time of ``n``
    bytes sent at ``t`` (a chunk under way at the fall finishes at the new rate)."""

    def seconds_for(num_bytes: int, now_s: float) -> float:
        bytes_before = max(0.0, at_s - now_s) * before_bps / 8
        if num_bytes <= bytes_before:
            return num_bytes * 8 / before_bps
        return max(0.0, at_s - now_s) + (num_bytes - bytes_before) * 8 / after_bps

    return seconds_for


def _after_first_slow(times: list[float]) -> list[float]:
    """A stream's chunk times after its first that took over 4 s (once it saw the fall)."""
    first_slow = next(i for i, seconds in enumerate(times) if seconds > 4.0)
    return times[first_slow + 1 :]


def test_a_stream_grown_on_a_fast_link_follows_a_fall_to_half_a_megabit() -> None:
    # 100 Mbit/s, then 0.5 Mbit/s from 2 s: chunks of 4 MiB went down by halving, one slow
    # chunk each, and the one of 2 MiB after the first slow one took 33 s (the receiver gave
    # up at 30 s). Now every chunk after the first slow one is expected to take a quarter of
    # the idle timeout at most (the chunk under way at the fall cannot be helped).
    payload = os.urandom(34 * MiB)
    wires, times = asyncio.run(_send_over_link(payload, 1, _falling_link(100e6, 0.5e6, 2.0)))
    sizes = [len(decode_chunk(wire).data) for wire in wires[0]]
    assert max(sizes) == 4 * MiB  # grew while fast
    after = _after_first_slow(times[0])
    assert len(after) > 10
    assert max(after) <= IDLE_TIMEOUT_S / 4, times[0]
    assert _deliver(wires) == [payload]


def test_four_streams_follow_a_fall_from_100_to_2_megabit() -> None:
    # 4 streams (taking turns, each waiting for the others' chunks): after the fall to
    # 2 Mbit/s a round of 4 chunks of 4 MiB takes 67 s, and halving kept rounds past 30 s.
    payload = os.urandom(56 * MiB)
    wires, times = asyncio.run(_send_over_link(payload, 4, _falling_link(100e6, 2e6, 2.0)))
    for stream, stream_times in zip(wires, times, strict=True):
        after = _after_first_slow(stream_times)
        assert len(after) > 10
        assert max(after) <= IDLE_TIMEOUT_S / 4, stream_times
        # (each grew to its share of the largest: 4 MiB among the 4)
        assert max(len(decode_chunk(wire).data) for wire in stream) == 1 * MiB
    assert _deliver(wires) == [payload]
