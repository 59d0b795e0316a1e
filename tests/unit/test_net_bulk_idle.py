"""Incoming bulk transfers: streams that never start or go silent are dropped, and the streams
must cover the payload exactly once."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gossamer.core.clock import FakeClock
from gossamer.core.errors import ConfigError, ProtocolError
from gossamer.net.bulk import BulkReceiver, ReceivedChunk, _Transfer, decode_chunk
from gossamer.net.config import LimitsConfig
from gossamer.net.counters import NetCounters
from gossamer.net.handshake import Session
from gossamer.net.server import _session_var
from gossamer.proto import net_pb2


async def _push(
    receiver: BulkReceiver, chunks: list[net_pb2.BulkChunk], sender: str = "sender"
) -> net_pb2.BulkAck:
    async def stream() -> AsyncIterator[ReceivedChunk]:
        for chunk in chunks:
            yield decode_chunk(chunk.SerializeToString())

    _session_var.set(Session(sender, b"k" * 32, 0.0))
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


def test_streams_cover_the_payload_exactly_once() -> None:
    # Stream i of n carries bytes total*i//n up to total*(i+1)//n. Two streams both starting
    # at 0 were delivered as complete with zeros where nothing came; a stream that stops short
    # of its share left a gap the same way.
    got: list[bytes] = []

    async def handler(sender: str, topic: str, payload: bytearray) -> None:
        got.append(bytes(payload))

    def receiver() -> BulkReceiver:
        made = BulkReceiver(LimitsConfig(), NetCounters(), FakeClock())
        made.register("t", handler)
        return made

    head = {"transfer_id": "z", "topic": "t", "total_bytes": 10, "num_streams": 2}
    twice = receiver()
    asyncio.run(_push(twice, [net_pb2.BulkChunk(**head, offset=0, data=b"abcde")]))
    with pytest.raises(ProtocolError, match="not one of the transfer's 2 streams"):
        asyncio.run(_push(twice, [net_pb2.BulkChunk(**head, offset=0, data=b"fghij")]))
    with pytest.raises(ProtocolError, match="not one of"):
        asyncio.run(_push(receiver(), [net_pb2.BulkChunk(**head, offset=3, data=b"defgh")]))
    with pytest.raises(ProtocolError, match="past its stream's share"):
        asyncio.run(_push(receiver(), [net_pb2.BulkChunk(**head, offset=0, data=b"abcdef")]))
    with pytest.raises(ProtocolError, match="ended short"):
        asyncio.run(_push(receiver(), [net_pb2.BulkChunk(**head, offset=5, data=b"fg")]))
    with pytest.raises(ProtocolError, match="none of them empty"):
        asyncio.run(_push(receiver(), [net_pb2.BulkChunk(**head | {"num_streams": 11}, data=b"")]))
    whole = receiver()
    asyncio.run(_push(whole, [net_pb2.BulkChunk(**head, offset=5, data=b"fghij")]))
    asyncio.run(_push(whole, [net_pb2.BulkChunk(**head, offset=0, data=b"abcde")]))
    assert got == [b"abcdefghij"]


def test_a_stream_that_sends_nothing_is_dropped_after_the_idle_timeout() -> None:
    # A stream left open without chunks held its transfer, and its share of the in-flight
    # budget, for as long as its sender liked: idle expiry skips transfers with a stream open.
    receiver = BulkReceiver(LimitsConfig(bulk_idle_timeout_s=0.2), NetCounters(), FakeClock())

    async def handler(sender: str, topic: str, payload: bytearray) -> None:
        raise AssertionError("an incomplete transfer must never be delivered")

    receiver.register("t", handler)
    head = {"transfer_id": "s", "topic": "t", "total_bytes": 10, "num_streams": 1}

    async def silent() -> AsyncIterator[ReceivedChunk]:
        yield decode_chunk(net_pb2.BulkChunk(**head, offset=0, data=b"abc").SerializeToString())
        await asyncio.sleep(60)  # the sender keeps the stream open and sends nothing more

    async def main() -> None:
        _session_var.set(Session("sender", b"k" * 32, 0.0))
        await receiver.Push(silent(), None)  # type: ignore[arg-type]

    with pytest.raises(ProtocolError, match="sent nothing for"):
        asyncio.run(asyncio.wait_for(main(), 10))
    assert receiver.num_incomplete == 0
    assert receiver._inflight_bytes == 0


def test_a_peer_may_leave_only_so_many_transfers_unfinished() -> None:
    # Bytes are bounded by the in-flight budget, but half-started transfers of a byte each
    # grew the table without bound (and each new one scanned it all).
    receiver = BulkReceiver(LimitsConfig(), NetCounters(), FakeClock())

    async def handler(sender: str, topic: str, payload: bytearray) -> None:
        return None

    receiver.register("t", handler)

    def half(transfer_id: str) -> list[net_pb2.BulkChunk]:
        head = {"transfer_id": transfer_id, "topic": "t", "total_bytes": 2, "num_streams": 2}
        return [net_pb2.BulkChunk(**head, offset=0, data=b"a")]

    for i in range(256):
        asyncio.run(_push(receiver, half(f"h{i}")))
    with pytest.raises(ProtocolError, match="unfinished"):
        asyncio.run(_push(receiver, half("one-more")))
    assert receiver.num_incomplete == 256
    head = {"transfer_id": "h0", "topic": "t", "total_bytes": 2, "num_streams": 2}
    asyncio.run(_push(receiver, [net_pb2.BulkChunk(**head, offset=1, data=b"b")]))  # one ends
    asyncio.run(_push(receiver, half("one-more")))
    assert receiver.num_incomplete == 256


def test_memory_follows_the_bytes_that_came_not_the_size_announced() -> None:
    # A 1-byte first chunk announcing a 256 MiB transfer took (and zeroed) the whole 256 MiB.
    receiver = BulkReceiver(LimitsConfig(), NetCounters(), FakeClock())

    async def handler(sender: str, topic: str, payload: bytearray) -> None:
        raise AssertionError("an incomplete transfer must never be delivered")

    receiver.register("t", handler)
    head = {"transfer_id": "big", "topic": "t", "total_bytes": 256 << 20, "num_streams": 2}
    more = asyncio.Event()

    async def stream() -> AsyncIterator[ReceivedChunk]:
        yield decode_chunk(net_pb2.BulkChunk(**head, offset=0, data=b"x").SerializeToString())
        await more.wait()  # the stream stays open, the rest never comes

    async def main() -> int:
        _session_var.set(Session("sender", b"k" * 32, 0.0))
        push = asyncio.create_task(receiver.Push(stream(), None))  # type: ignore[arg-type]
        await asyncio.sleep(0.1)
        assert receiver.num_incomplete == 1
        _, peak = tracemalloc.get_traced_memory()
        more.set()
        with pytest.raises(ProtocolError, match="ended short"):
            await push
        return peak

    tracemalloc.start()
    try:
        peak = asyncio.run(main())
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_transfer_stays_counted_in_flight_while_its_handler_holds_it() -> None:
    # Released before the handler ran, a sender could have any number of complete transfers
    # held by handlers at once (comm's waiting for a decode thread), counted nowhere.
    clock = FakeClock()
    limits = LimitsConfig(
        max_bulk_transfer_bytes=600 << 10,
        max_bulk_sender_bytes=1 << 20,
        max_bulk_inflight_bytes=1 << 20,
    )
    receiver = BulkReceiver(limits, NetCounters(), clock)

    async def main() -> None:
        release = asyncio.Event()

        async def handler(sender: str, topic: str, payload: bytearray) -> None:
            await release.wait()

        receiver.register("t", handler)

        def whole(transfer_id: str) -> list[net_pb2.BulkChunk]:
            data = b"x" * (600 << 10)
            return [
                net_pb2.BulkChunk(
                    transfer_id=transfer_id, topic="t", total_bytes=len(data), num_streams=1,
                    offset=0, data=data,
                )
            ]  # fmt: skip

        held = asyncio.create_task(_push(receiver, whole("a")))
        await asyncio.sleep(0)
        assert receiver.num_incomplete == 0  # complete: only its handler holds it
        with pytest.raises(ProtocolError, match="in flight"):
            await _push(receiver, whole("b"))
        release.set()
        assert (await held).transfer_complete
        assert receiver._inflight_bytes == 0
        assert (await _push(receiver, whole("c"))).transfer_complete

    asyncio.run(main())


def test_one_sender_cannot_hold_the_budget_with_transfers_it_only_announced() -> None:
    # A transfer counts at its announced size from its first byte: 128 streams announcing 128
    # MiB each, a byte every 20 s, held the whole 16 GiB budget on 3 MiB of memory, and every
    # other peer's message was refused "too many bulk bytes in flight".
    limits = LimitsConfig(
        max_bulk_transfer_bytes=1 << 20,
        max_bulk_sender_bytes=2 << 20,
        max_bulk_inflight_bytes=8 << 20,
    )
    receiver = BulkReceiver(limits, NetCounters(), FakeClock())
    got: list[str] = []

    async def handler(sender: str, topic: str, payload: bytearray) -> None:
        got.append(sender)

    receiver.register("t", handler)

    async def trickle(transfer_id: str, stop: asyncio.Event) -> None:
        """The first byte of a 1 MiB transfer's first stream, then nothing, the stream open."""

        async def stream() -> AsyncIterator[ReceivedChunk]:
            yield decode_chunk(
                net_pb2.BulkChunk(
                    transfer_id=transfer_id, topic="t", total_bytes=1 << 20, num_streams=2,
                    offset=0, data=b"x",
                ).SerializeToString()
            )  # fmt: skip
            await stop.wait()

        _session_var.set(Session("hog", b"k" * 32, 0.0))
        await receiver.Push(stream(), None)  # type: ignore[arg-type]

    async def main() -> None:
        stop = asyncio.Event()
        hogs = [asyncio.create_task(trickle(f"hog{i}", stop)) for i in range(8)]
        async with asyncio.timeout(5):
            while sum(t.done() for t in hogs) < 6:  # the refused ones end, the others wait
                await asyncio.wait([t for t in hogs if not t.done()], return_when="FIRST_COMPLETED")
        refused = [t for t in hogs if t.done() and isinstance(t.exception(), ProtocolError)]
        assert len(refused) == 6  # two of its transfers fill its share
        assert "limits.max_bulk_sender_bytes" in str(refused[0].exception())
        data = b"y" * (1 << 20)
        whole = net_pb2.BulkChunk(
            transfer_id="m", topic="t", total_bytes=len(data), num_streams=1, offset=0, data=data
        )
        assert (await _push(receiver, [whole], sender="other")).transfer_complete
        assert got == ["other"]
        stop.set()
        await asyncio.gather(*hogs, return_exceptions=True)

    asyncio.run(main())


def test_a_broken_transfer_lets_its_bytes_go_while_its_exception_lives() -> None:
    # The exception of a broken stream holds the frame that held the stream's bytes, and what
    # aborts the call holds the exception: the bytes stayed until the cyclic collector ran
    # (repeated 64 MiB transfers ended short grew a peer to 781 MiB with none counted).
    receiver = BulkReceiver(LimitsConfig(), NetCounters(), FakeClock())

    async def handler(sender: str, topic: str, payload: bytearray) -> None:
        raise AssertionError("a broken transfer is never delivered")

    receiver.register("t", handler)
    piece = b"x" * (1 << 20)
    short = [  # 8 MiB of stream 0's 16, then it ends
        net_pb2.BulkChunk(
            transfer_id="s", topic="t", total_bytes=32 << 20, num_streams=2, offset=i << 20,
            data=piece,
        )
        for i in range(8)
    ]  # fmt: skip
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="ended short") as caught:
            asyncio.run(_push(receiver, short))
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.__traceback__ is not None  # the exception and its frames live on
    assert held < 2 << 20, f"{held >> 20} MiB still held"  # (the last chunk, as received)
    assert receiver.num_incomplete == 0


def test_a_multi_stream_payload_is_put_together_with_one_stream_s_share_to_spare() -> None:
    # The streams' bytes were joined into a new buffer: the payload twice at the peak (a
    # 128 MiB comm message over 4 streams took +314 MiB).
    tracemalloc.start()
    try:
        transfer = _Transfer("t", 32 << 20, 4, 0.0)
        for i in range(4):
            transfer.segments[i * (8 << 20)] = bytearray(bytes([i])) * (8 << 20)
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        payload = transfer.payload()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert bytes(payload[:: 8 << 20]) == bytes([0, 1, 2, 3])
    assert len(payload) == 32 << 20
    assert peak - before <= 9 << 20  # one stream's share (and change), not the whole again


def test_a_broken_transfer_s_sibling_neither_keeps_bytes_nor_closes_a_new_transfer_of_its_id() -> (
    None
):
    # When one stream of a transfer broke, a sibling stream went on keeping its bytes (counted
    # nowhere), and at its end closed whatever transfer the sender had opened under the same
    # id since, releasing the broken one's size again: the sender's counts went below zero,
    # and it could hold several times its share.
    limits = LimitsConfig(
        max_bulk_transfer_bytes=64 << 20,
        max_bulk_sender_bytes=64 << 20,
        max_bulk_inflight_bytes=128 << 20,
    )
    receiver = BulkReceiver(limits, NetCounters(), FakeClock())
    got: list[int] = []

    async def handler(sender: str, topic: str, payload: bytearray) -> None:
        got.append(len(payload))

    receiver.register("t", handler)

    def chunk(**fields: Any) -> ReceivedChunk:
        return decode_chunk(net_pb2.BulkChunk(**fields).SerializeToString())

    def push(chunks: list[ReceivedChunk]) -> tuple[asyncio.Task[Any], asyncio.Event, asyncio.Event]:
        """A stream that sends its first chunk, then the rest once let go."""
        taken, go = asyncio.Event(), asyncio.Event()

        async def stream() -> AsyncIterator[ReceivedChunk]:
            yield chunks[0]
            taken.set()  # (asked for the next one: the first is in)
            await go.wait()
            for rest in chunks[1:]:
                yield rest

        async def call() -> Any:
            _session_var.set(Session("sender", b"k" * 32, 0.0))
            return await receiver.Push(stream(), None)  # type: ignore[arg-type]

        return asyncio.create_task(call()), taken, go

    async def main() -> None:
        big = {"transfer_id": "x", "topic": "t", "total_bytes": 64 << 20, "num_streams": 2}
        b, b_in, go_b = push(
            [chunk(**big, offset=32 << 20, data=b"x"), chunk(offset=(32 << 20) + 1, data=b"y")]
        )
        a, a_in, go_a = push([chunk(**big, offset=0, data=b"x"), chunk(offset=5, data=b"x")])
        await asyncio.wait_for(asyncio.gather(a_in.wait(), b_in.wait()), 5)
        go_a.set()  # stream A breaks (a gap): the transfer is released
        with pytest.raises(ProtocolError, match="contiguous"):
            await a
        tiny = {"transfer_id": "x", "topic": "t", "total_bytes": 2, "num_streams": 1}
        c, c_in, go_c = push([chunk(**tiny, offset=0, data=b"a"), chunk(offset=1, data=b"b")])
        await asyncio.wait_for(c_in.wait(), 5)
        go_b.set()  # B's next chunk: refused, nothing more kept, C's transfer left alone
        with pytest.raises(ProtocolError, match="another stream"):
            await b
        assert receiver._sender_bytes == {"sender": 2}
        go_c.set()
        assert (await c).transfer_complete
        assert got == [2]
        assert receiver._inflight_bytes == 0
        assert receiver._sender_bytes == {}

    asyncio.run(main())


def test_limits_set_before_the_sender_share_still_load() -> None:
    # The share came with a fixed default of 1 GiB, and limits that loaded before were refused
    # over a key their users never set.
    small = LimitsConfig(max_bulk_transfer_bytes=256 << 20, max_bulk_inflight_bytes=512 << 20)
    assert small.bulk_sender_bytes == 512 << 20
    large = LimitsConfig(max_bulk_transfer_bytes=2 << 30)
    assert large.bulk_sender_bytes == 2 << 30  # one transfer of the largest always fits
    assert LimitsConfig().bulk_sender_bytes == 1 << 30
    with pytest.raises(ConfigError, match=r"limits\.max_bulk_sender_bytes"):
        LimitsConfig(max_bulk_sender_bytes=1 << 20)  # below the largest transfer
