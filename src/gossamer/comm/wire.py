"""The tensor wire format: a small fixed header plus raw codec bytes; nothing is unpickled.

One encoded *piece* is::

    magic "GCW1" | codec id u8 | dtype u8 | ndim u8 | 0 u8 | block size u32
    | num elements u64 | payload bytes u64 | ndim x dim u64 | payload

all little-endian. A decoder checks magic, codec, dtype, ndim, that the dims multiply to the
element count, the element count against its limits and the payload size against the codec's
exact size before it allocates anything. Several pieces may follow each other in one message.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

from gossamer.comm.codecs import (
    CodecChoice,
    ErrorFeedback,
    FloatArray,
    NoCompressionCodec,
    codec_by_id,
)
from gossamer.core.errors import ProtocolError

__all__ = [
    "DecodedPiece",
    "WireLimits",
    "decode_piece",
    "decode_tensor",
    "encode_piece",
    "encode_tensor",
    "pack_piece_header",
    "piece_header_nbytes",
]

_MAGIC = b"GCW1"
_HEADER = struct.Struct("<4sBBBBIQQ")
_DIM = struct.Struct("<Q")
_DTYPES: dict[int, torch.dtype] = {
    0: torch.float32,
    1: torch.float16,
    2: torch.bfloat16,
    3: torch.float64,
}
_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}


@dataclass(frozen=True, kw_only=True, slots=True)
class WireLimits:
    """What a decoder accepts from a peer."""

    max_elements: int = 1 << 31
    """Most values in one piece."""
    max_ndim: int = 8
    """Most dimensions of a tensor."""

    def __post_init__(self) -> None:
        if self.max_elements < 1 or not 0 < self.max_ndim <= 32:
            raise ValueError("wire limits: max_elements >= 1 and max_ndim in 1..32")


@dataclass(frozen=True, slots=True)
class DecodedPiece:
    """A decoded piece: float32 values with the shape and dtype its sender announced."""

    values: FloatArray
    """The values, 1-D float32 (uncompressed: a view of the message's bytes, not a copy)."""
    shape: tuple[int, ...]
    """The shape announced by the sender."""
    dtype: torch.dtype
    """The dtype of the sender's tensor."""
    codec_name: str
    """The codec it travelled with."""
    nbytes: int
    """Bytes this piece took on the wire, header included."""


def piece_header_nbytes(ndim: int) -> int:
    """Header bytes of a piece with ``ndim`` dimensions."""
    return _HEADER.size + _DIM.size * ndim


def pack_piece_header(
    choice: CodecChoice,
    shape: tuple[int, ...],
    num_elements: int,
    payload_nbytes: int,
    dtype: torch.dtype = torch.float32,
) -> bytes:
    """The header (dims included) of a piece whose payload follows it."""
    if dtype not in _DTYPE_CODES:
        raise ValueError(f"dtype {dtype} is not a float dtype the wire format carries")
    header = _HEADER.pack(
        _MAGIC,
        choice.codec.codec_id,
        _DTYPE_CODES[dtype],
        len(shape),
        0,
        choice.block_size,
        num_elements,
        payload_nbytes,
    )
    return header + b"".join(_DIM.pack(d) for d in shape)


def encode_piece(
    values: FloatArray,
    choice: CodecChoice,
    *,
    shape: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float32,
    feedback: ErrorFeedback | None = None,
    feedback_key: str = "",
    feedback_numel: int = 0,
    feedback_offset: int = 0,
) -> tuple[bytes, FloatArray]:
    """Header and payload for ``values`` (1-D float32); with ``feedback``, error-compensated.

    Returns:
        The encoded bytes and the values the receiver will decode from them.
    """
    shape = (values.shape[0],) if shape is None else shape
    if math.prod(shape) != values.shape[0]:
        raise ValueError(f"shape {shape} does not hold {values.shape[0]} values")
    if dtype not in _DTYPE_CODES:
        raise ValueError(f"dtype {dtype} is not a float dtype the wire format carries")
    codec = choice.codec
    if feedback is not None:
        payload, decoded = feedback.encode(
            choice, feedback_key, feedback_numel or values.shape[0], feedback_offset, values
        )
    else:
        payload = codec.encode(values, choice.block_size)
        decoded = (
            codec.decode(memoryview(payload), values.shape[0], choice.block_size)
            if codec.lossy
            else values
        )
    return pack_piece_header(choice, shape, values.shape[0], len(payload), dtype) + payload, decoded


def decode_piece(
    data: memoryview, offset: int, limits: WireLimits, *, expect: tuple[int, str] | None = None
) -> tuple[DecodedPiece, int]:
    """Decode the piece starting at ``offset`` of ``data``.

    Args:
        expect: the number of values and the codec's name the piece must have (checked
            before anything is decoded: a codec's values take up to 4x their bytes).

    Returns:
        The piece and the offset just past it.

    Raises:
        ProtocolError: the bytes are not a well-formed piece within ``limits``.
    """
    if len(data) - offset < _HEADER.size:
        raise ProtocolError("tensor piece shorter than its header")
    magic, codec_id, dtype_code, ndim, _, block_size, num, payload_nbytes = _HEADER.unpack_from(
        data, offset
    )
    if magic != _MAGIC:
        raise ProtocolError("tensor piece without the GCW1 magic")
    codec = codec_by_id(codec_id)
    if dtype_code not in _DTYPES:
        raise ProtocolError(f"tensor piece with unknown dtype code {dtype_code}")
    if ndim > limits.max_ndim:
        raise ProtocolError(f"tensor piece with {ndim} dims (limit {limits.max_ndim})")
    if num > limits.max_elements:
        raise ProtocolError(f"tensor piece of {num} values (limit {limits.max_elements})")
    if expect is not None and (num, codec.name) != expect:
        raise ProtocolError(
            f"tensor piece of {num} {codec.name} values where {expect[0]} {expect[1]} values "
            "were expected"
        )
    codec.check_block_size(block_size)
    if block_size == 0:
        raise ProtocolError("tensor piece with block size 0")
    position = offset + _HEADER.size
    if len(data) - position < _DIM.size * ndim:
        raise ProtocolError("tensor piece cut inside its shape")
    shape = tuple(_DIM.unpack_from(data, position + _DIM.size * i)[0] for i in range(ndim))
    position += _DIM.size * ndim
    if math.prod(shape) != num or any(d > limits.max_elements for d in shape):
        # (a dim past the limit with another of 0 holds no values, but no tensor takes it)
        raise ProtocolError(f"tensor piece shape {shape} does not hold {num} values")
    expected = codec.encoded_nbytes(num, block_size)
    if payload_nbytes != expected or len(data) - position < expected:
        raise ProtocolError(
            f"tensor piece payload of {payload_nbytes} bytes, {codec.name} needs {expected} "
            f"and {len(data) - position} remain"
        )
    if isinstance(codec, NoCompressionCodec):
        # The received bytes already are the values: read them where they lie (no copy; the
        # array shares the message's memory, read-only if the message is).
        values: FloatArray = np.frombuffer(data, dtype="<f4", count=num, offset=position)
    else:
        payload = data[position : position + expected]
        codec.check_payload(payload, num, block_size)
        values = codec.decode(payload, num, block_size)
    end = position + expected
    piece = DecodedPiece(values, shape, _DTYPES[dtype_code], codec.name, end - offset)
    return piece, end


def encode_tensor(
    tensor: torch.Tensor,
    choice: CodecChoice,
    *,
    feedback: ErrorFeedback | None = None,
    feedback_key: str = "",
) -> bytes:
    """One tensor as a piece (computed in float32; decoded back to its dtype)."""
    values = np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).reshape(-1).numpy())
    encoded, _ = encode_piece(
        values,
        choice,
        shape=tuple(tensor.shape),
        dtype=tensor.dtype,
        feedback=feedback,
        feedback_key=feedback_key,
    )
    return encoded


def decode_tensor(data: bytes | bytearray | memoryview, limits: WireLimits) -> torch.Tensor:
    """The tensor of a message holding exactly one piece.

    Raises:
        ProtocolError: malformed, oversized, or bytes left over.
    """
    view = memoryview(data).cast("B")
    piece, end = decode_piece(view, 0, limits)
    if end != len(view):
        raise ProtocolError(f"{len(view) - end} bytes after the tensor piece")
    return torch.from_numpy(piece.values.copy()).reshape(piece.shape).to(piece.dtype)
