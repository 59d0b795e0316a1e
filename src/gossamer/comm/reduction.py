"""The numeric half of an all-reduce: chunk bodies and the weighted sums of one part.

Everything here is numpy work meant to run in a worker thread. :class:`ChunkCodec` turns a flat
range into message bodies (one wire piece per tensor segment, each with that tensor's codec) and
back, checking that a received body matches the layout exactly. :class:`PartReducer` keeps the
weighted sum of one part per chunk; each chunk is averaged over the contributions that arrived
for it, so a member whose stream broke half-way still counts for the chunks it delivered.
:func:`values_finite` checks a received chunk before it is added (a member that sends NaN or
infinite values is dropped from the round, see :class:`~gossamer.comm.round_state.RoundState`).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence

import numpy as np

from gossamer.comm.codecs import ErrorFeedback, FloatArray, NoCompressionCodec
from gossamer.comm.plan import FlatLayout
from gossamer.comm.transport import Message
from gossamer.comm.wire import WireLimits, decode_piece, encode_piece, pack_piece_header
from gossamer.core.errors import ProtocolError

__all__ = [
    "ChunkCodec",
    "PartReducer",
    "pack_contributors",
    "unpack_contributors",
    "values_finite",
]

_COUNT = struct.Struct("<H")


class ChunkCodec:
    """Encodes and decodes the bodies of chunk messages for one layout.

    Args:
        layout: the flat layout every member shares.
        limits: what a received piece may announce.
    """

    def __init__(self, layout: FlatLayout, limits: WireLimits) -> None:
        self.layout = layout
        self.limits = limits

    def encode(
        self,
        values: FloatArray,
        start: int,
        end: int,
        feedback: ErrorFeedback | None,
        *,
        base: int = 0,
        prefix: bytes = b"",
    ) -> tuple[Message, FloatArray]:
        """``prefix`` + body for flat elements ``start..end``, and what a receiver will decode.

        ``values[i - base]`` holds flat element ``i`` (``base`` 0: the whole flat buffer). The
        message is in pieces: uncompressed values are views of ``values`` (not copied, so
        ``values`` must not change until the message is sent); headers and compressed payloads
        (small) lie in byte strings between them.
        """
        message, decoded = self._encode(values, start, end, feedback, base, prefix, True)
        assert decoded is not None
        return message, decoded

    def encode_message(
        self,
        values: FloatArray,
        start: int,
        end: int,
        feedback: ErrorFeedback | None,
        *,
        prefix: bytes = b"",
    ) -> Message:
        """The message of :meth:`encode` alone: without error feedback, a lossy codec's
        payload is then not decoded back (a contribution's sender has no use for it)."""
        return self._encode(values, start, end, feedback, 0, prefix, False)[0]

    def _encode(
        self,
        values: FloatArray,
        start: int,
        end: int,
        feedback: ErrorFeedback | None,
        base: int,
        prefix: bytes,
        want_decoded: bool,
    ) -> tuple[Message, FloatArray | None]:
        parts: list[tuple[bytes, FloatArray | None]] = []
        decoded_parts: list[tuple[int, FloatArray]] = []
        for seg in self.layout.segments(start, end):
            index = seg.tensor_index
            choice = self.layout.choices[index]
            segment = values[seg.flat_start - base : seg.flat_end - base]
            if isinstance(choice.codec, NoCompressionCodec):
                n = segment.shape[0]
                parts.append((pack_piece_header(choice, (n,), n, 4 * n), segment))
                decoded_parts.append((seg.flat_start - start, segment))
                continue
            if feedback is None and not want_decoded:
                payload = choice.codec.encode(segment, choice.block_size)
                n = segment.shape[0]
                parts.append((pack_piece_header(choice, (n,), n, len(payload)) + payload, None))
                continue
            piece, piece_values = encode_piece(
                segment,
                choice,
                feedback=feedback,
                feedback_key=self.layout.names[index],
                feedback_numel=self.layout.numels[index],
                feedback_offset=seg.tensor_offset,
            )
            parts.append((piece, None))
            decoded_parts.append((seg.flat_start - start, piece_values))
        pieces: list[bytes | memoryview] = []
        small = bytearray(prefix)
        for head, raw in parts:
            small += head
            if raw is not None:
                pieces.append(bytes(small))
                small.clear()
                pieces.append(np.ascontiguousarray(raw, dtype="<f4").data.cast("B"))
        if small:
            pieces.append(bytes(small))
        message = tuple(pieces)
        if not want_decoded:
            return message, None
        if len(decoded_parts) == 1:
            return message, decoded_parts[0][1]
        decoded = np.empty(end - start, dtype=np.float32)
        for offset, part in decoded_parts:
            decoded[offset : offset + part.shape[0]] = part
        return message, decoded

    def decode(self, body: memoryview, start: int, end: int) -> FloatArray:
        """Values of flat elements ``start..end`` from a body.

        Raises:
            ProtocolError: the body does not match the layout (sizes, codecs, extra bytes).
        """
        segments = self.layout.segments(start, end)
        single = len(segments) == 1
        values = np.empty(0 if single else end - start, dtype=np.float32)
        position = 0
        for seg in segments:
            codec = self.layout.choices[seg.tensor_index].codec.name
            expect = (seg.flat_end - seg.flat_start, codec)
            piece, position = decode_piece(body, position, self.limits, expect=expect)
            if single:
                values = piece.values
            else:
                values[seg.flat_start - start : seg.flat_end - start] = piece.values
        if position != len(body):
            raise ProtocolError(f"{len(body) - position} bytes after the last chunk piece")
        return values


def values_finite(values: FloatArray) -> bool:
    """Whether every value of a received chunk is finite (in a thread).

    A sum is finite where every value is, and costs a fraction of ``np.isfinite(...).all()``
    (no boolean array); only a sum that overflowed from finite values needs the value by
    value check.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.add.reduce(values, dtype=np.float32)
    return bool(np.isfinite(total)) or bool(np.isfinite(values).all())


def pack_contributors(indices: Sequence[int]) -> bytes:
    """The contributor list that leads a result body."""
    return _COUNT.pack(len(indices)) + b"".join(_COUNT.pack(i) for i in indices)


def unpack_contributors(body: memoryview, num_members: int) -> tuple[list[int], memoryview]:
    """The contributor list of a result body and the rest of the body."""
    if len(body) < _COUNT.size:
        raise ProtocolError("result body without a contributor list")
    (count,) = _COUNT.unpack_from(body)
    end = _COUNT.size * (1 + count)
    if count > num_members or len(body) < end:
        raise ProtocolError(f"result names {count} contributors in a group of {num_members}")
    indices = [_COUNT.unpack_from(body, _COUNT.size * (1 + i))[0] for i in range(count)]
    if any(i >= num_members for i in indices):
        raise ProtocolError("result names a contributor outside the group")
    return indices, body[end:]


class PartReducer:
    """Weighted sums of one part, per chunk, until each chunk is finalised.

    Each contribution is summed times its weight over a chunk's reference weight, the largest
    weight it has seen (from ``reference_weight``, the reducer's own: members' weights are alike
    more often than not, and then the values are summed as they are, as fast as weight 1), and
    the sum is divided by the weights' total over it. A heavier contribution first scales the
    sum so far down to its own weight (one pass, where weights differ). So no value is scaled
    up: values times weights up to 1e12 no longer overflowed float32 where the average is finite
    (1e30 with weight 1e12 everywhere averaged to inf). Values that are themselves near
    float32's largest can still overflow their sum, as in any float32 all-reduce.

    Args:
        part: the part's index.
        chunks: flat ranges of its chunks.
        expected: member indices whose contributions are awaited.
        reference_weight: the first reference weight of every chunk (0: the first weight that
            arrives).
    """

    def __init__(
        self,
        part: int,
        chunks: list[tuple[int, int]],
        expected: set[int],
        reference_weight: float = 0.0,
    ) -> None:
        self.part = part
        self.chunks = chunks
        self.expected = set(expected)
        self.contributors: list[set[int]] = [set() for _ in chunks]
        """Members whose contribution arrived, per chunk (weight 0 included)."""
        self._weighted: list[set[int]] = [set() for _ in chunks]
        self.finalized = [False] * len(chunks)
        self._sums: list[FloatArray | None] = [None] * len(chunks)
        self._weights = [0.0] * len(chunks)
        self._references = [reference_weight] * len(chunks)
        """The weight whose contributions a chunk's sum holds as they are (its largest yet)."""
        self._locks = [threading.Lock() for _ in chunks]

    def add(self, chunk: int, member: int, weight: float, values: FloatArray) -> bool:
        """Add one contribution (in a thread); False if the chunk was already finalised."""
        with self._locks[chunk]:
            if self.finalized[chunk] or member in self.contributors[chunk]:
                return False
            if weight == 0.0:
                # Counted as arrived, left out of the sum: 0 x NaN (values a member withheld,
                # or an 8-bit block that decodes to inf) made the whole chunk NaN.
                self.contributors[chunk].add(member)
                return True
            total = self._sums[chunk]
            reference = self._references[chunk]
            # (a sum may overflow to inf, or NaN: every member then gets the same; not a
            # warning per chunk)
            with np.errstate(over="ignore", invalid="ignore", under="ignore"):
                if weight > reference:  # the sum so far, scaled to the heavier weight
                    if total is not None:
                        np.multiply(total, np.float32(reference / weight), out=total)
                    reference = self._references[chunk] = weight
                scale = weight / reference
                if total is None:  # the first contribution starts the sum (one pass, no zeros)
                    if scale != 1.0:
                        self._sums[chunk] = np.float32(scale) * values
                    else:
                        self._sums[chunk] = np.array(values, dtype=np.float32, copy=True)
                elif scale != 1.0:
                    total += np.float32(scale) * values
                else:
                    total += values
            self._weights[chunk] += weight
            self.contributors[chunk].add(member)
            self._weighted[chunk].add(member)
            return True

    def is_complete(self, chunk: int) -> bool:
        """Whether every awaited member contributed to ``chunk``."""
        return self.expected <= self.contributors[chunk]

    def pending_chunks(self) -> list[int]:
        """Chunks not finalised yet."""
        return [c for c, done in enumerate(self.finalized) if not done]

    def finalize(self, chunk: int) -> tuple[FloatArray | None, list[int]] | None:
        """The chunk's average and the members in it (in a thread); None if already finalised.

        Where the weights that arrived sum to zero there is no average: (None, []), and every
        member keeps its own values for the chunk (a member whose weighted values did not
        arrive in time must not take a weight-0 member's, zeros where that one withheld them).
        """
        with self._locks[chunk]:
            if self.finalized[chunk]:
                return None
            self.finalized[chunk] = True
            total, weight = self._sums[chunk], self._weights[chunk]
            self._sums[chunk] = None
            if total is None or weight <= 0:
                return None, []
            else:
                # in place: the sum is this chunk's alone, and a fresh array would cost the
                # kernel a zero-filled page for every 4 KiB of it
                scale = weight / self._references[chunk]
                average = np.divide(total, np.float32(scale), out=total) if scale != 1.0 else total
            return average, sorted(self._weighted[chunk])
