"""Bulk bytes between peers, streamed in chunks, optionally over several parallel streams.

This is what ``comm/`` moves tensors with. A sender splits a payload into ``num_streams``
contiguous ranges and streams each in chunks; the receiver checks the announced size against its
limits, keeps each stream's bytes as they arrive (memory follows what came, not what was
announced), and hands the complete payload to the handler registered for the transfer's topic.
The call returns to the sender once the handler has run, so "sent" means "received and handled".
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import grpc

from gossamer.core.clock import Clock, SystemClock
from gossamer.core.errors import ProtocolError
from gossamer.net.config import LimitsConfig
from gossamer.net.connections import ConnectionPool, ended_under_call
from gossamer.net.counters import NetCounters
from gossamer.net.identity import short_peer_id
from gossamer.net.server import current_session
from gossamer.proto import net_pb2, net_pb2_grpc

__all__ = [
    "PUSH_METHOD",
    "PUSH_ONE_METHOD",
    "BulkHandler",
    "BulkPayload",
    "BulkReceiver",
    "ReadOnlyBulkHandler",
    "ReceivedChunk",
    "add_bulk_receiver_to_server",
    "decode_chunk",
    "send_bulk",
]

_log = logging.getLogger(__name__)
PUSH_METHOD = "/gossamer.net.v1.Bulk/Push"
PUSH_ONE_METHOD = "/gossamer.net.v1.Bulk/PushOne"
_MAX_TOPIC_CHARS = 256
_MAX_TRANSFER_ID_CHARS = 64
_MAX_STREAMS = 64
_MAX_UNFINISHED_PER_SENDER = 256
"""Transfers one peer may have under way here at once: its bytes are bounded by the in-flight
budget, but a flood of tiny half-started transfers would grow the table without bound."""
_DATA_TAG = bytes([5 << 3 | 2])
"""``BulkChunk.data``: field 5, length-delimited."""
_TAIL_SLACK_BYTES = 1024
"""A stream's last few bytes join the chunk before them (limits keep 4 KiB of message room)."""

_DATA_FIELD = 5
_MAX_VARINT_BYTES = 10

_FIRST_CHUNK_BYTES = 256 * 1024
"""A stream's first chunk, shared among a transfer's streams: the receiver gives up on a
stream that brings no whole chunk for ``limits.bulk_idle_timeout_s`` (30 s), so a transfer
starts on a steady link down to about 80 kbit/s."""
_MIN_CHUNK_BYTES = 16 * 1024
"""No stream's chunks are smaller than this (a transfer over many streams shares the first
chunk size among them, and the rate cap of :class:`_ChunkSizes` stops here)."""
_CHUNK_TARGET_S = 1.0
"""A chunk that went out within this long is followed by one twice its size."""
_CHUNK_SLOW_S = 4.0
"""A chunk that took longer than this is followed by one of the stream's first size (or
smaller, by the rate cap)."""
_IDLE_SHARE = 0.25
"""A stream's next chunk is expected, at the rate its last one went, to take at most this
share of the idle timeout (itself shared among the transfer's streams)."""
_DEFAULT_IDLE_TIMEOUT_S = LimitsConfig().bulk_idle_timeout_s
"""The receiver's idle timeout a sender assumes when it is told none (the default limit)."""

BulkHandler = Callable[[str, str, bytearray], Awaitable[None]]
"""Called with (sender peer id, topic, payload) once a transfer is complete."""

ReadOnlyBulkHandler = Callable[[str, str, bytearray | memoryview], Awaitable[None]]
"""A handler that only reads its payload: a transfer that came in one chunk reaches it as a
read-only view of the received message, without a copy."""


@dataclass(frozen=True, slots=True)
class ReceivedChunk:
    """One ``BulkChunk`` as received: its small fields parsed by protobuf, its data a view of the
    received bytes."""

    fields: net_pb2.BulkChunk
    """Every field but ``data`` (which is left empty here)."""
    data: memoryview
    """The ``data`` field, where it lies in the received message (not a copy)."""


def _read_varint(view: memoryview, position: int) -> tuple[int, int]:
    value = 0
    for i in range(_MAX_VARINT_BYTES):
        if position + i >= len(view):
            raise ProtocolError("bulk chunk cut inside a varint")
        byte = view[position + i]
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return value, position + i + 1
    raise ProtocolError("bulk chunk with an overlong varint")


def decode_chunk(wire: bytes) -> ReceivedChunk:
    """Parse a ``BulkChunk`` without copying its data.

    Reading a bytes field from a protobuf message copies it, and so does parsing: the data of
    every chunk was copied twice before it reached the transfer's buffer. Here the message's
    fields are walked by their tags (wire types and lengths only); the data field is kept as a
    view, and the other fields' bytes are handed to protobuf, which parses them as usual. As in
    protobuf, of a repeated data field the last one counts.

    Raises:
        ProtocolError: the bytes are not a well-formed message (a field cut short, a group or
            an unknown wire type, or fields protobuf refuses).
    """
    view = memoryview(wire).cast("B")
    data = view[0:0]
    others: list[memoryview] = []
    position = 0
    while position < len(view):
        start = position
        tag, position = _read_varint(view, position)
        wire_type = tag & 7
        if wire_type == 0:
            _, position = _read_varint(view, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == 2:
            length, position = _read_varint(view, position)
            if tag >> 3 == _DATA_FIELD and position + length <= len(view):
                data = view[position : position + length]
                position += length
                continue
            position += length
        else:
            raise ProtocolError(f"bulk chunk with a field of wire type {wire_type}")
        if position > len(view):
            raise ProtocolError("bulk chunk cut inside a field")
        others.append(view[start:position])
    try:
        fields = net_pb2.BulkChunk.FromString(b"".join(others))
    except Exception as exc:  # protobuf raises DecodeError, and others on odd input
        raise ProtocolError(f"bulk chunk does not decode: {exc}") from exc
    return ReceivedChunk(fields, data)


def add_bulk_receiver_to_server(receiver: BulkReceiver, server: Any) -> None:
    """Like the generated ``add_BulkServicer_to_server``, with :func:`decode_chunk` as the
    request decoder."""
    handlers = {
        "Push": grpc.stream_unary_rpc_method_handler(
            receiver.Push,
            request_deserializer=decode_chunk,
            response_serializer=net_pb2.BulkAck.SerializeToString,
        ),
        "PushOne": grpc.unary_unary_rpc_method_handler(
            receiver.PushOne,
            request_deserializer=decode_chunk,
            response_serializer=net_pb2.BulkAck.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("gossamer.net.v1.Bulk", handlers),)
    )
    server.add_registered_method_handlers("gossamer.net.v1.Bulk", handlers)


@dataclass(slots=True)
class _Transfer:
    topic: str
    total: int
    """The announced size (counted against the in-flight budget)."""
    num_streams: int
    last_activity_s: float
    received: int = 0
    num_finished_streams: int = 0
    num_active_streams: int = 0
    delivered: bool = False
    failed: bool = False
    """A stream of it broke: it is never delivered, and its bytes are let go at once."""
    segments: dict[int, bytearray | memoryview] = field(default_factory=dict)
    """What each stream brought so far, by its start offset. A stream's bytes are kept as they
    arrive, not in a buffer of the announced size made at the first chunk: that took (and
    zeroed) memory for bytes a sender announced and never sent."""

    def payload(self) -> bytearray | memoryview:
        """The whole payload, once every stream brought its share (taken: called once).

        The first stream's bytes grow into the whole, each other stream's let go once
        appended: the peak is the payload and one stream's share, where a join into a new
        buffer held the payload twice."""
        if len(self.segments) == 1:
            return next(iter(self.segments.values()))
        starts = sorted(self.segments)
        whole = self.segments.pop(starts[0])
        assert isinstance(whole, bytearray), "only one-chunk transfers are kept as views"
        for start in starts[1:]:
            whole += self.segments.pop(start)
        self.segments[starts[0]] = whole
        return whole

    def claim_stream(self, offset: int) -> tuple[int, bytearray]:
        """Where the stream that starts at ``offset`` must end, and where its bytes go (empty,
        growing as they arrive): stream i of n carries bytes
        ``total * i // n`` up to ``total * (i + 1) // n``, as :func:`send_bulk` cuts them, so
        the streams cover the payload exactly once (no gap left as zeros, no overlap).

        Raises:
            ProtocolError: ``offset`` is no stream's start, or that stream came already.
        """
        total, n = self.total, self.num_streams
        starts = [total * i // n for i in range(n)]  # n <= _MAX_STREAMS
        if offset not in starts or offset in self.segments:
            raise ProtocolError(
                f"a bulk stream starting at byte {offset} of {total} is not one of the "
                f"transfer's {n} streams, or came twice"
            )
        segment = self.segments[offset] = bytearray()
        return total * (starts.index(offset) + 1) // n, segment


class BulkReceiver(net_pb2_grpc.BulkServicer):
    """Receives bulk transfers and hands them to the handler of their topic.

    Args:
        limits: largest transfer, in-flight total, idle timeout.
        counters: bytes received, protocol errors and expired transfers are counted here.
        clock: time source of the idle timeout.
    """

    def __init__(
        self, limits: LimitsConfig, counters: NetCounters, clock: Clock | None = None
    ) -> None:
        self._clock = clock or SystemClock()
        self._limits = limits
        self._counters = counters
        self._handlers: dict[str, BulkHandler | ReadOnlyBulkHandler] = {}
        self._read_only: set[str] = set()
        self._max_bytes: dict[str, int] = {}
        """Topics registered with a largest transfer of their own."""
        self._transfers: dict[tuple[str, str], _Transfer] = {}
        self._inflight_bytes = 0
        self._num_unfinished: Counter[str] = Counter()
        """Transfers under way, by sender (each counted from its first chunk until it failed
        or its handler returned)."""
        self._sender_bytes: Counter[str] = Counter()
        """Bytes of those transfers, by sender: its share of the in-flight budget."""

    @overload
    def register(
        self, topic: str, handler: BulkHandler, *, max_bytes: int | None = None
    ) -> None: ...

    @overload
    def register(
        self,
        topic: str,
        handler: ReadOnlyBulkHandler,
        *,
        read_only: Literal[True],
        max_bytes: int | None = None,
    ) -> None: ...

    def register(
        self,
        topic: str,
        handler: BulkHandler | ReadOnlyBulkHandler,
        *,
        read_only: bool = False,
        max_bytes: int | None = None,
    ) -> None:
        """Deliver transfers on ``topic`` to ``handler`` (replacing any earlier one).

        A handler gets a payload of its own to change, unless it is registered ``read_only``:
        then a transfer that came in one chunk is handed over as a read-only view of the
        received message (one copy fewer). ``max_bytes``: the topic's largest transfer, where
        it is smaller than ``limits.max_bulk_transfer_bytes`` (a larger one is refused at its
        first chunk, before anything is kept).
        """
        if not 0 < len(topic) <= _MAX_TOPIC_CHARS:
            raise ValueError(f"a topic has 1..{_MAX_TOPIC_CHARS} characters, got {len(topic)}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"a topic's largest transfer is at least 1 byte, got {max_bytes}")
        self._handlers[topic] = handler
        if read_only:
            self._read_only.add(topic)
        else:
            self._read_only.discard(topic)
        if max_bytes is None:
            self._max_bytes.pop(topic, None)
        else:
            self._max_bytes[topic] = max_bytes

    def unregister(self, topic: str) -> None:
        """Stop accepting transfers on ``topic``."""
        self._handlers.pop(topic, None)
        self._read_only.discard(topic)
        self._max_bytes.pop(topic, None)

    def _open(
        self, sender: str, first: net_pb2.BulkChunk, data: memoryview
    ) -> tuple[tuple[str, str], _Transfer, bool]:
        """The transfer ``first`` opens or joins, and whether ``data`` is already in it (a
        transfer in one chunk, taken whole)."""
        if not 0 < len(first.transfer_id) <= _MAX_TRANSFER_ID_CHARS:
            raise ProtocolError("bulk stream without a valid transfer id")
        if first.topic not in self._handlers:
            raise ProtocolError(f"no handler for bulk topic {first.topic[:_MAX_TOPIC_CHARS]!r}")
        total = first.total_bytes
        if total > self._limits.max_bulk_transfer_bytes:
            raise ProtocolError(
                f"bulk transfer of {total} bytes exceeds limits.max_bulk_transfer_bytes "
                f"({self._limits.max_bulk_transfer_bytes})"
            )
        topic_max = self._max_bytes.get(first.topic)
        if topic_max is not None and total > topic_max:
            raise ProtocolError(
                f"bulk transfer of {total} bytes on topic {first.topic!r}, whose transfers are "
                f"at most {topic_max} bytes"
            )
        key = (sender, first.transfer_id)
        transfer = self._transfers.get(key)
        if transfer is None:
            if not self._fits(sender, total):
                self.expire_idle()  # (a scan of every transfer: only when the budget is short)
            if self._sender_bytes[sender] + total > self._limits.bulk_sender_bytes:
                raise ProtocolError(
                    f"this peer's bulk transfers in flight here hold {self._sender_bytes[sender]} "
                    f"bytes; with {total} more they pass its share "
                    f"(limits.max_bulk_sender_bytes, {self._limits.bulk_sender_bytes}): "
                    "finish some first"
                )
            if self._inflight_bytes + total > self._limits.max_bulk_inflight_bytes:
                raise ProtocolError("too many bulk bytes in flight; try again later")
            if self._num_unfinished[sender] >= _MAX_UNFINISHED_PER_SENDER:
                raise ProtocolError(
                    f"{_MAX_UNFINISHED_PER_SENDER} bulk transfers from this peer are unfinished; "
                    "finish some first"
                )
            if not 1 <= first.num_streams <= _MAX_STREAMS or (
                first.num_streams > 1 and first.num_streams > total
            ):
                raise ProtocolError(
                    f"a transfer runs over 1..{_MAX_STREAMS} streams, none of them empty"
                )
            # A transfer that is all in its first chunk is copied once, with no zeroing pass, or
            # not at all for a handler that only reads it.
            whole = first.num_streams == 1 and first.offset == 0 and len(data) == total
            transfer = _Transfer(first.topic, total, first.num_streams, self._clock.monotonic())
            if whole:
                transfer.segments[0] = data if first.topic in self._read_only else bytearray(data)
            self._transfers[key] = transfer
            self._inflight_bytes += total
            self._sender_bytes[sender] += total
            self._num_unfinished[sender] += 1
            return key, transfer, whole
        elif (transfer.total, transfer.topic, transfer.num_streams) != (
            total,
            first.topic,
            first.num_streams,
        ):
            raise ProtocolError("parallel streams of one transfer disagree on its size or topic")
        return key, transfer, False

    async def Push(
        self,
        request_iterator: AsyncIterator[ReceivedChunk],
        context: grpc.aio.ServicerContext,
    ) -> net_pb2.BulkAck:
        sender = current_session().peer_id
        key: tuple[str, str] | None = None
        transfer: _Transfer | None = None
        received = 0
        next_offset = stop = 0
        segment = bytearray()
        chunks = aiter(request_iterator)
        try:
            while True:
                try:
                    # A stream that stays open and sends nothing would hold its transfer (and
                    # its share of the in-flight budget) for good: idle expiry skips transfers
                    # with a stream open.
                    async with asyncio.timeout(self._limits.bulk_idle_timeout_s):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise ProtocolError(
                        f"bulk stream sent nothing for {self._limits.bulk_idle_timeout_s:g} s "
                        "(limits.bulk_idle_timeout_s)"
                    ) from None
                data = chunk.data
                filled = False
                if transfer is None:
                    key, transfer, filled = self._open(sender, chunk.fields, data)
                    transfer.num_active_streams += 1
                    next_offset = chunk.fields.offset
                    if filled:
                        stop = len(data)
                    else:
                        stop, segment = transfer.claim_stream(next_offset)
                if transfer.failed:  # its bytes are counted nowhere now: keep none of them
                    raise ProtocolError("another stream of this bulk transfer broke")
                if chunk.fields.offset != next_offset:
                    raise ProtocolError("bulk chunks of one stream must be contiguous")
                end = next_offset + len(data)
                if end > stop:
                    raise ProtocolError("bulk chunk runs past its stream's share of the payload")
                if not filled:
                    segment += data
                next_offset = end
                transfer.received += len(data)
                received += len(data)
            self._counters.received(sender, received)
            if transfer is None or key is None:
                return net_pb2.BulkAck(received_bytes=0, transfer_complete=False)
            if transfer.failed:
                raise ProtocolError("another stream of this bulk transfer broke")
            if next_offset != stop:
                raise ProtocolError("bulk stream ended short of its share of the payload")
            transfer.num_finished_streams += 1
            if transfer.received < transfer.total:
                if transfer.num_finished_streams >= transfer.num_streams:
                    self._close(key, transfer)  # every stream ended and bytes are missing
                    raise ProtocolError("bulk transfer ended short of its announced size")
                return net_pb2.BulkAck(received_bytes=received, transfer_complete=False)
            # Its bytes stay counted in flight while its handler holds them (a message waiting
            # in comm for a decode thread, say): released before, a sender could have any
            # number of them held at once, counted nowhere.
            held = self._close(key, transfer, release=False)
            try:
                if not transfer.delivered:  # the first stream to see it complete delivers it
                    transfer.delivered = True
                    handler = self._handlers[transfer.topic]
                    # a view only reaches handlers registered read-only, which take one
                    await handler(sender, transfer.topic, transfer.payload())  # type: ignore[arg-type]
            finally:
                if held:
                    self._release(sender, transfer.total)
            return net_pb2.BulkAck(received_bytes=received, transfer_complete=True)
        except BaseException:
            if transfer is not None and key is not None:
                self._close(key, transfer)  # a broken stream dooms the transfer
                if not transfer.delivered:
                    # Its bytes go now, not when the cyclic collector gets to this frame: the
                    # exception holds it, and what aborts the call holds the exception
                    # (repeated 64 MiB transfers ended short grew a peer by 500 MiB).
                    transfer.failed = True
                    for kept in transfer.segments.values():
                        if isinstance(kept, bytearray):
                            kept.clear()
            raise
        finally:
            if transfer is not None:
                transfer.num_active_streams -= 1
                transfer.last_activity_s = self._clock.monotonic()

    async def PushOne(
        self, request: ReceivedChunk, context: grpc.aio.ServicerContext
    ) -> net_pb2.BulkAck:
        """A transfer in one chunk, as one unary call (see :func:`send_bulk`)."""

        async def one() -> AsyncIterator[ReceivedChunk]:
            yield request

        return await self.Push(one(), context)

    def expire_idle(self) -> int:
        """Drop incomplete transfers with no stream open past ``limits.bulk_idle_timeout_s``.

        A multi-stream transfer whose other streams never start (the sender died, or a stream
        was refused) would otherwise hold its buffer until the node stops.

        Returns:
            How many transfers were dropped.
        """
        horizon = self._clock.monotonic() - self._limits.bulk_idle_timeout_s
        stale = [
            (key, t)
            for key, t in self._transfers.items()
            if t.num_active_streams == 0 and t.last_activity_s < horizon
        ]
        for key, transfer in stale:
            self._close(key, transfer)
            self._counters.bulk_transfers_expired += 1
            _log.info(
                "dropped an incomplete bulk transfer from %s on %r after %.0f s idle",
                short_peer_id(key[0]),
                transfer.topic,
                self._limits.bulk_idle_timeout_s,
            )
        return len(stale)

    @property
    def num_incomplete(self) -> int:
        """Incoming transfers waiting for more streams."""
        return len(self._transfers)

    def _fits(self, sender: str, total: int) -> bool:
        """Whether a new transfer of ``total`` bytes from ``sender`` fits its share and the
        budget."""
        return (
            self._sender_bytes[sender] + total <= self._limits.bulk_sender_bytes
            and self._inflight_bytes + total <= self._limits.max_bulk_inflight_bytes
        )

    def _close(self, key: tuple[str, str], transfer: _Transfer, *, release: bool = True) -> bool:
        """Forget an open transfer and, with ``release``, what it counts in flight (else the
        caller releases it later); whether it was open."""
        if self._transfers.get(key) is not transfer:
            # Closed already, and its id perhaps taken by a new transfer of the sender's: that
            # one is not this one's to close (it released the failed one's bytes twice, and
            # the sender's counts went below zero, past its share).
            return False
        del self._transfers[key]
        if release:
            self._release(key[0], transfer.total)
        return True

    def _release(self, sender: str, total: int) -> None:
        """A transfer of ``sender``'s ended: its bytes and its place leave the counts."""
        assert self._sender_bytes[sender] >= total, "a transfer released twice"
        self._inflight_bytes -= total
        self._sender_bytes[sender] -= total
        if not self._sender_bytes[sender]:
            del self._sender_bytes[sender]
        self._num_unfinished[sender] -= 1
        if not self._num_unfinished[sender]:
            del self._num_unfinished[sender]


def _pre_serialized(message: bytes) -> bytes:
    return message


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode_chunk(fields: net_pb2.BulkChunk, data: Sequence[memoryview]) -> bytes:
    """The wire bytes of ``fields`` with ``data`` (joined) as its ``data`` field, copying the
    data once.

    The small fields are serialized by protobuf and the ``data`` field is written out after
    them: a message's encoding is the concatenation of its fields' encodings, so this parses
    back exactly as ``BulkChunk(..., data=b"".join(data))`` would.
    """
    size = sum(len(piece) for piece in data)
    return b"".join((fields.SerializeToString(), _DATA_TAG, _varint(size), *data))


BulkPayload = bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]
"""What :func:`send_bulk` sends: one buffer, or several sent back to back as one payload (so a
caller need not copy its pieces into one buffer before they are copied into chunks)."""


class _Pieces:
    """A payload's buffers as one run of bytes that can be cut anywhere without copying."""

    def __init__(self, payload: BulkPayload) -> None:
        if isinstance(payload, bytes | bytearray | memoryview):
            payload = [payload]
        self.views = [memoryview(p).cast("B") for p in payload]
        self.starts = [0]
        for view in self.views:
            self.starts.append(self.starts[-1] + len(view))

    @property
    def total(self) -> int:
        return self.starts[-1]

    def cut(self, start: int, stop: int) -> list[memoryview]:
        """Views of bytes ``start..stop``."""
        first = max(0, bisect.bisect_right(self.starts, start) - 1)
        out = []
        for i in range(first, len(self.views)):
            begin = self.starts[i]
            if begin >= stop:
                break
            view = self.views[i]
            piece = view[max(0, start - begin) : min(len(view), stop - begin)]
            if len(piece):
                out.append(piece)
        return out


class _ChunkSizes:
    """The sizes of one stream's chunks, fitted to the link as TCP's slow start fits its
    window.

    A stream of chunks of ``limits.bulk_chunk_bytes`` (4 MiB) took 35 s a chunk on a 1 Mbit/s
    link, past the receiver's idle timeout (``limits.bulk_idle_timeout_s``, 30 s, for a
    stream that brings no whole chunk): such a transfer never finished, and a peer behind a
    thin uplink never served a newcomer its state. Now a stream starts small and doubles its
    chunks while each goes out within :data:`_CHUNK_TARGET_S`, up to its share of
    ``max_bytes``; after
    one that took over :data:`_CHUNK_SLOW_S` it drops straight back to its first size (by
    halving, a stream grown to 4 MiB chunks on a fast link took one slow chunk per halving
    after the link fell to 0.5 Mbit/s, and its 2 MiB chunk took 33 s). And every chunk is
    capped by the rate the slower of the last two went at (a chunk the buffers took at once
    tells nothing of the link): it is expected to take at most :data:`_IDLE_SHARE` of
    ``idle_timeout_s`` divided by ``num_streams`` (the streams share the link; a stream that
    measured the whole link while the others waited their turn still leaves them room), down
    to :data:`_MIN_CHUNK_BYTES`.

    What holds: on a steady link a transfer starts down to about 80 kbit/s (its first chunks,
    :data:`_FIRST_CHUNK_BYTES` among its streams, in 26 s) and goes on after its first slow
    chunk in chunks of seconds; on a fast link a stream reaches its share of ``max_bytes``
    after a few chunks. After the link's rate falls, every chunk sized after a slow one is
    expected to take at most the cap; the chunks already sent when it fell (in flight and in
    buffers, up to ``max_bytes`` among the streams) must still arrive within the timeout at
    the new rate, which 4 MiB do only at about 1.1 Mbit/s or more: a transfer whose link
    falls below that while it sends whole chunks can still fail.

    Args:
        max_bytes: the largest chunk (``chunk_bytes`` of :func:`send_bulk`).
        num_streams: the transfer's streams, which share the link: each starts at its share
            of :data:`_FIRST_CHUNK_BYTES`, grows to its share of ``max_bytes`` (what a
            transfer has in flight when its link falls is as for one stream: with 4 streams
            of 4 MiB chunks a fall from 100 to 2 Mbit/s left 16 MiB to go, 67 s) and its cap
            is its share of the idle budget.
        idle_timeout_s: the receiver's idle timeout, as far as the sender knows it (its own
            ``limits.bulk_idle_timeout_s``).
    """

    def __init__(
        self,
        max_bytes: int,
        num_streams: int = 1,
        idle_timeout_s: float = _DEFAULT_IDLE_TIMEOUT_S,
    ) -> None:
        if max_bytes < 1 or num_streams < 1 or not idle_timeout_s > 0:
            raise ValueError(
                f"chunks of at least 1 byte over at least 1 stream within a positive idle "
                f"timeout, got {max_bytes} bytes over {num_streams} in {idle_timeout_s} s"
            )
        self.max_bytes = max(min(max_bytes, _MIN_CHUNK_BYTES), max_bytes // num_streams)
        """The stream's largest chunk: its share of ``max_bytes``."""
        self.min_bytes = min(
            self.max_bytes, max(_MIN_CHUNK_BYTES, _FIRST_CHUNK_BYTES // num_streams)
        )
        self.floor_bytes = min(self.max_bytes, _MIN_CHUNK_BYTES)
        """The rate cap stops here."""
        self.budget_s = idle_timeout_s * _IDLE_SHARE / num_streams
        """A chunk is expected to go out within this long at the last one's rate."""
        self.next_bytes = self.min_bytes
        """The size of the stream's next chunk."""
        self._last_rate = math.inf
        """Bytes a second of the last chunk (one the buffers took at once: no rate)."""

    def took(self, seconds: float, num_bytes: int | None = None) -> None:
        """The last chunk, of ``num_bytes`` (:attr:`next_bytes` if None), took ``seconds`` to
        go out: size the next."""
        if num_bytes is None:
            num_bytes = self.next_bytes
        if seconds <= _CHUNK_TARGET_S:
            size = min(self.max_bytes, 2 * self.next_bytes)
        elif seconds > _CHUNK_SLOW_S:
            size = self.min_bytes
        else:
            size = self.next_bytes
        rate = num_bytes / seconds if seconds > 0 else math.inf
        slower, self._last_rate = min(rate, self._last_rate), rate
        if slower < math.inf:
            size = min(size, max(self.floor_bytes, int(slower * self.budget_s)))
        self.next_bytes = size


async def _stream_chunks(
    pieces: _Pieces,
    first: net_pb2.BulkChunk,
    stop: int,
    sizes: _ChunkSizes,
    clock: Clock,
) -> AsyncIterator[bytes]:
    """The wire chunks of one stream, bytes ``first.offset..stop`` of ``pieces``, sized by
    ``sizes``; the first carries ``first``'s fields, the others their offset only.

    A chunk's time is from its yield to the next request for one: gRPC asks for the next
    message once it wrote the last (into flow control's window and the socket's buffer, which
    fill on a slow link, so the time then follows the link's rate).
    """
    fields = first
    offset = first.offset
    while True:  # at least one chunk, even for an empty payload
        end = min(offset + sizes.next_bytes, stop)
        if stop - end <= _TAIL_SLACK_BYTES:
            end = stop  # a few bytes past a whole chunk ride along instead of a tiny chunk
        chunk = _encode_chunk(fields, pieces.cut(offset, end))
        started = clock.monotonic()
        yield chunk
        sent, offset = end - offset, end
        if offset >= stop:
            return
        sizes.took(clock.monotonic() - started, sent)
        fields = net_pb2.BulkChunk(offset=offset)


async def send_bulk(
    pool: ConnectionPool,
    peer_id: str,
    topic: str,
    payload: BulkPayload,
    *,
    chunk_bytes: int,
    num_streams: int = 1,
    timeout_s: float,
    counters: NetCounters,
    idle_timeout_s: float = _DEFAULT_IDLE_TIMEOUT_S,
) -> None:
    """Send ``payload`` to ``peer_id``'s handler for ``topic``; returns once it was handled.

    Args:
        pool: the node's connections.
        peer_id: the receiver.
        topic: the handler to deliver to.
        payload: the bytes: one buffer or several, sent back to back.
        chunk_bytes: the largest chunk (within the message size limit). A stream's chunks
            start smaller and grow as the link takes them (see :class:`_ChunkSizes`); a
            transfer of one chunk goes whole.
        num_streams: parallel streams (more can fill a long fat link).
        timeout_s: deadline of the whole transfer.
        counters: bytes sent are counted here.
        idle_timeout_s: the receiver's ``limits.bulk_idle_timeout_s`` as far as the sender
            knows it (its own): a chunk is expected to take a share of it (see
            :class:`_ChunkSizes`).

    Raises:
        GossamerError: the mapped error if any stream failed.
    """
    if num_streams < 1:
        raise ValueError(f"num_streams must be at least 1, got {num_streams}")
    pieces = _Pieces(payload)
    total = pieces.total
    transfer_id = secrets.token_hex(16)
    num_streams = max(1, min(num_streams, total // chunk_bytes or 1))
    bounds = [total * i // num_streams for i in range(num_streams + 1)]
    # One chunk: a unary call sends it, closes and waits for the ack in one batch of
    # operations, where a stream takes a round of the event loop for each.
    one_chunk = num_streams == 1 and total <= chunk_bytes + _TAIL_SLACK_BYTES
    method = PUSH_ONE_METHOD if one_chunk else PUSH_METHOD
    deadline = time.monotonic() + timeout_s  # of the whole transfer, dialling included
    connection = await pool.connection(peer_id, timeout_s=timeout_s)

    def time_left() -> float:
        return max(0.001, deadline - time.monotonic())

    def header(start: int) -> net_pb2.BulkChunk:
        """The fields the first chunk of each stream carries."""
        return net_pb2.BulkChunk(
            transfer_id=transfer_id,
            topic=topic,
            total_bytes=total,
            num_streams=num_streams,
            offset=start,
        )

    async def one_stream(start: int, stop: int) -> None:
        # Chunks go out pre-serialized (see _encode_chunk): the payload is copied once into
        # the message instead of three times (slice to bytes, into the message, serialized).
        channel, ack = connection.channel, net_pb2.BulkAck.FromString
        try:
            if one_chunk:
                push_one = channel.unary_unary(
                    method, request_serializer=_pre_serialized, response_deserializer=ack
                )
                request = _encode_chunk(header(start), pieces.cut(start, stop))
                await push_one(request, timeout=time_left(), metadata=connection.metadata)
            else:
                push = channel.stream_unary(
                    method, request_serializer=_pre_serialized, response_deserializer=ack
                )
                sizes = _ChunkSizes(chunk_bytes, num_streams, idle_timeout_s)
                chunks = _stream_chunks(pieces, header(start), stop, sizes, SystemClock())
                await push(chunks, timeout=time_left(), metadata=connection.metadata)
            connection.last_life_s = pool.clock.monotonic()
        except grpc.aio.AioRpcError as exc:
            raise await pool.failed(connection, exc, method) from exc
        except asyncio.CancelledError:
            if (error := ended_under_call(peer_id)) is None:
                raise
            raise error from None

    started = time.perf_counter()
    # (a chunk shows no life on the connection until it is through: heartbeats timing out
    # behind it must not close the connection under it, see ConnectionPool.drop_if_silent)
    connection.num_uploads += 1
    try:
        if num_streams == 1:
            await one_stream(0, total)  # no task for the one stream
        else:
            async with asyncio.TaskGroup() as group:
                for i in range(num_streams):
                    group.create_task(one_stream(bounds[i], bounds[i + 1]))
    except* Exception as group_error:
        first_error = group_error.exceptions[0]
        counters.call_made(peer_id, method, time.perf_counter() - started, ok=False)
        raise first_error from None
    finally:
        connection.num_uploads -= 1
    counters.call_made(peer_id, method, time.perf_counter() - started, ok=True)
    counters.sent(peer_id, total)
    _log.debug(
        "sent %d bytes on %r to %s over %d streams",
        total,
        topic,
        short_peer_id(peer_id),
        num_streams,
    )
