"""Compression codecs for averaging: fp32, fp16, bf16 and 8-bit blockwise, with error feedback.

A codec turns a 1-D float32 array into payload bytes and back. Codecs are stateless; the block
size travels in the wire header (see :mod:`gossamer.comm.wire`), so a receiver needs only the codec
id to decode. :class:`ErrorFeedback` keeps, per tensor, what compression lost last round and adds
it back before the next encoding, so the sum of what a sender's peers decode over many rounds
tracks the sum of what it meant to send. Every function here is numpy/torch work: call it from a
thread, never on the event loop.

New codecs subclass :class:`Codec` and are registered with :func:`register_codec`.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from gossamer.core.errors import ProtocolError

__all__ = [
    "BFloat16Codec",
    "Blockwise8BitCodec",
    "Codec",
    "CodecChoice",
    "CodecPolicy",
    "ErrorFeedback",
    "Float16Codec",
    "FloatArray",
    "NoCompressionCodec",
    "clip_keeping_infinities",
    "codec_by_id",
    "codec_by_name",
    "codec_names",
    "register_codec",
]

FloatArray = npt.NDArray[np.float32]
_FP16_MAX = float(np.finfo(np.float16).max)
_BF16_MAX = float(torch.finfo(torch.bfloat16).max)
MAX_BLOCK_SIZE = 1 << 24
"""Largest block size a decoder accepts."""


class Codec(ABC):
    """Encodes a 1-D float32 array into bytes and back."""

    codec_id: int
    """The id written on the wire (0..255, unique)."""
    name: str
    """The name users pick it by."""
    lossy: bool = True
    """Whether decoding may differ from the input (error feedback applies only to lossy codecs)."""
    largest: float | None = None
    """The largest finite magnitude it sends (finite values beyond are clipped, see
    :func:`clip_keeping_infinities`), if under float32's: error feedback keeps the rounding of
    a value, not what was clipped off it."""

    @abstractmethod
    def encoded_nbytes(self, num_elements: int, block_size: int) -> int:
        """Exact payload size for ``num_elements`` values; a decoder checks it before reading."""

    @abstractmethod
    def encode(self, values: FloatArray, block_size: int) -> bytes:
        """Payload bytes for ``values`` (1-D, float32, contiguous)."""

    @abstractmethod
    def decode(self, payload: memoryview, num_elements: int, block_size: int) -> FloatArray:
        """The float32 values of a payload whose size was already checked."""

    def check_block_size(self, block_size: int) -> None:
        """Raise ProtocolError if ``block_size`` is not usable with this codec."""
        if block_size <= 0:
            raise ProtocolError(f"{self.name}: block size must be positive, got {block_size}")

    def check_payload(self, payload: memoryview, num_elements: int, block_size: int) -> None:
        """Raise ProtocolError if a received payload (of the right size) holds what no
        encoder of this codec makes from finite values."""
        del payload, num_elements, block_size  # any bytes are some values


class NoCompressionCodec(Codec):
    """Raw little-endian float32."""

    codec_id = 0
    name = "none"
    lossy = False

    def encoded_nbytes(self, num_elements: int, block_size: int) -> int:
        return 4 * num_elements

    def encode(self, values: FloatArray, block_size: int) -> bytes:
        return np.ascontiguousarray(values, dtype="<f4").tobytes()

    def decode(self, payload: memoryview, num_elements: int, block_size: int) -> FloatArray:
        return np.frombuffer(payload, dtype="<f4", count=num_elements).astype(np.float32)


def clip_keeping_infinities(
    values: FloatArray, largest: float, out: FloatArray | None = None
) -> FloatArray:
    """``values`` clipped to ±``largest``, infinities (and NaN) kept as they are.

    A finite value beyond a codec's range is clipped rather than made infinite; an infinite
    one is sent as infinite, so the owner that receives it drops its sender as for any
    codec's non-finite values (see :func:`~gossamer.comm.reduction.values_finite`). Clipped to
    the largest finite value, an inf was averaged in as 65504 (fp16) or 3.4e38 (bf16) on every
    member. Costs one sum where every value is finite (the usual case).

    Args:
        values: 1-D float32.
        largest: the codec's largest finite magnitude.
        out: where to write (may be ``values``); a new array when None.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        finite = bool(np.isfinite(np.add.reduce(values, dtype=np.float32)))
    # (a sum overflows from finite values too: then it is looked at value by value)
    infinite = None if finite else np.isinf(values)
    clipped = np.clip(values, -largest, largest, out=out)
    if infinite is not None and infinite.any():
        clipped[infinite] = np.copysign(np.float32(np.inf), clipped[infinite])
    return clipped


class Float16Codec(Codec):
    """IEEE half precision; finite values beyond its range are clipped to ±65504 rather than
    made inf (infinities stay infinite: see :func:`clip_keeping_infinities`)."""

    codec_id = 1
    name = "fp16"
    largest = _FP16_MAX

    def encoded_nbytes(self, num_elements: int, block_size: int) -> int:
        return 2 * num_elements

    def encode(self, values: FloatArray, block_size: int) -> bytes:
        return clip_keeping_infinities(values, _FP16_MAX).astype("<f2").tobytes()

    def decode(self, payload: memoryview, num_elements: int, block_size: int) -> FloatArray:
        return np.frombuffer(payload, dtype="<f2", count=num_elements).astype(np.float32)


class BFloat16Codec(Codec):
    """bfloat16 (float32's range, 8 bits of mantissa), rounded to nearest even by torch;
    finite values beyond its largest (3.39e38, a hair under float32's) are clipped to it rather
    than rounded to inf (infinities stay infinite: see :func:`clip_keeping_infinities`)."""

    codec_id = 2
    name = "bf16"
    largest = _BF16_MAX

    def encoded_nbytes(self, num_elements: int, block_size: int) -> int:
        return 2 * num_elements

    def encode(self, values: FloatArray, block_size: int) -> bytes:
        clipped = clip_keeping_infinities(np.ascontiguousarray(values), _BF16_MAX)
        halves = torch.from_numpy(clipped).to(torch.bfloat16)
        return bytes(halves.view(torch.int16).numpy().astype("<i2").tobytes())

    def decode(self, payload: memoryview, num_elements: int, block_size: int) -> FloatArray:
        raw = np.frombuffer(payload, dtype="<i2", count=num_elements).astype(np.int16)
        decoded = torch.from_numpy(raw).view(torch.bfloat16).to(torch.float32)
        return np.asarray(decoded.numpy(), dtype=np.float32)


def _largest_scale() -> np.float32:
    """The largest float32 scale whose 127 steps stay finite (FLT_MAX / 127 rounds up)."""
    scale = np.float32(np.finfo(np.float32).max) / np.float32(127.0)
    with np.errstate(over="ignore"):
        while not np.isfinite(scale * np.float32(127.0)):
            scale = np.nextafter(scale, np.float32(0.0))
    return np.float32(scale)


_MAX_SCALE = _largest_scale()


class Blockwise8BitCodec(Codec):
    """8 bits per value plus one float32 scale (absmax / 127) per block of ``block_size`` values.

    The payload is the scales (one per block, the last block may be short) followed by one signed
    byte per value. The error per value is at most half a step: ``absmax(block) / 254``.
    """

    codec_id = 3
    name = "int8"

    def check_block_size(self, block_size: int) -> None:
        if not 0 < block_size <= MAX_BLOCK_SIZE:
            raise ProtocolError(f"8-bit codec block size {block_size} outside 1..{MAX_BLOCK_SIZE}")

    def encoded_nbytes(self, num_elements: int, block_size: int) -> int:
        return 4 * (-(-num_elements // block_size)) + num_elements

    def check_payload(self, payload: memoryview, num_elements: int, block_size: int) -> None:
        num_blocks = -(-num_elements // block_size)
        scales = np.frombuffer(payload, dtype="<f4", count=num_blocks)
        if not ((scales >= 0) & (scales <= _MAX_SCALE)).all():  # (NaN fails both)
            raise ProtocolError(
                f"8-bit codec piece with a scale that is negative, not finite or over "
                f"{_MAX_SCALE:.4g}: its block would be NaN or infinite for every member"
            )
        quantized = np.frombuffer(payload, dtype=np.int8, count=num_elements, offset=4 * num_blocks)
        if num_elements and int(quantized.min()) < -127:
            # No encoder makes -128: at the largest scale it decodes to -inf, and an owner's
            # sum then NaN (inf - inf), which its receivers refuse in turn.
            raise ProtocolError("8-bit codec piece with the value -128 (values are -127..127)")

    def encode(self, values: FloatArray, block_size: int) -> bytes:
        self.check_block_size(block_size)
        quantized, scales = self._quantize(values, block_size)
        return scales.astype("<f4").tobytes() + quantized.tobytes()

    def decode(self, payload: memoryview, num_elements: int, block_size: int) -> FloatArray:
        num_blocks = -(-num_elements // block_size)
        scales = np.frombuffer(payload, dtype="<f4", count=num_blocks).astype(np.float32)
        quantized = np.frombuffer(payload, dtype=np.int8, count=num_elements, offset=4 * num_blocks)
        return self._dequantize(quantized, scales, block_size)

    @staticmethod
    def _quantize(values: FloatArray, block_size: int) -> tuple[npt.NDArray[np.int8], FloatArray]:
        # Full blocks as one 2-D view and the short last block apart: no padded copy, and the
        # scaled values are rounded and clipped in place (one temporary, not four).
        num = values.shape[0]
        scales = np.empty(-(-num // block_size), dtype=np.float32)
        quantized = np.empty(num, dtype=np.int8)
        for first_block, blocks in _block_views(values, block_size):
            count = blocks.shape[0]
            absmax = np.maximum(blocks.max(axis=1), -blocks.min(axis=1))
            block_scales = scales[first_block : first_block + count]
            np.divide(absmax, np.float32(127.0), out=block_scales)
            # 127 steps stay finite: a block holding FLT_MAX (or an inf, from a sum that
            # overflowed) is sent at the largest scale a receiver takes
            np.minimum(block_scales, _MAX_SCALE, out=block_scales)
            nan_blocks = np.isnan(block_scales)
            has_nan = bool(nan_blocks.any())
            if has_nan:
                # (a sum of +inf and -inf: the scale of its finite values, the NaN sent as 0.
                # A NaN scale made every receiver refuse the message and blame its sender)
                finite = np.where(np.isnan(blocks[nan_blocks]), np.float32(0.0), blocks[nan_blocks])
                block_scales[nan_blocks] = np.minimum(
                    np.abs(finite).max(axis=1) / np.float32(127.0), _MAX_SCALE
                )
            safe = np.where(block_scales > 0, block_scales, np.float32(1.0))
            scaled = blocks / safe[:, None]
            if has_nan:
                np.nan_to_num(scaled, copy=False, nan=0.0)
            np.rint(scaled, out=scaled)
            np.clip(scaled, -127, 127, out=scaled)
            start = first_block * block_size
            quantized[start : start + scaled.size] = scaled.reshape(-1)
        return quantized, scales

    @staticmethod
    def _dequantize(
        quantized: npt.NDArray[np.int8], scales: FloatArray, block_size: int
    ) -> FloatArray:
        values = quantized.astype(np.float32)
        for first_block, blocks in _block_views(values, block_size):
            blocks *= scales[first_block : first_block + blocks.shape[0], None]
        return values


def _block_views(values: FloatArray, block_size: int) -> list[tuple[int, FloatArray]]:
    """(index of the first block, 2-D view) for the full blocks and for the short last one."""
    num = values.shape[0]
    full = num // block_size
    views = []
    if full:
        views.append((0, values[: full * block_size].reshape(full, block_size)))
    if num > full * block_size:
        views.append((full, values[full * block_size :].reshape(1, -1)))
    return views


_BY_ID: dict[int, Codec] = {}
_BY_NAME: dict[str, Codec] = {}


def register_codec(codec: Codec) -> None:
    """Make ``codec`` available by id (on the wire) and by name (in configs)."""
    if not 0 <= codec.codec_id <= 255:
        raise ValueError(f"codec ids are 0..255, got {codec.codec_id}")
    existing = _BY_ID.get(codec.codec_id)
    if existing is not None and existing.name != codec.name:
        raise ValueError(f"codec id {codec.codec_id} is taken by {existing.name!r}")
    _BY_ID[codec.codec_id] = codec
    _BY_NAME[codec.name] = codec


for _codec in (NoCompressionCodec(), Float16Codec(), BFloat16Codec(), Blockwise8BitCodec()):
    register_codec(_codec)


def codec_by_id(codec_id: int) -> Codec:
    """The codec behind a wire id.

    Raises:
        ProtocolError: the id is unknown (a peer speaks a codec we lack).
    """
    try:
        return _BY_ID[codec_id]
    except KeyError:
        raise ProtocolError(f"unknown codec id {codec_id}") from None


def codec_by_name(name: str) -> Codec:
    """The codec called ``name`` (``none``, ``fp16``, ``bf16``, ``int8``, or a registered one)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose one of {codec_names()}") from None


def codec_names() -> list[str]:
    """Names of the registered codecs."""
    return sorted(_BY_NAME)


@dataclass(frozen=True, slots=True)
class CodecChoice:
    """A codec and the block size it encodes with."""

    codec: Codec
    """The codec."""
    block_size: int
    """Values per block (used by blockwise codecs; carried in the header for all)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CodecPolicy:
    """Which codec each tensor gets: small tensors travel uncompressed."""

    codec: str = "none"
    """Codec for tensors of at least ``min_compressed_numel`` elements."""
    block_size: int = 4096
    """Values per block of blockwise codecs."""
    min_compressed_numel: int = 4096
    """Tensors smaller than this go uncompressed: biases and norms of models up to 4096 wide
    (tiny, and sensitive). One block of the blockwise codecs; a 64-wide model's 64 x 64
    matrices are compressed. The earlier 65536 left every tensor of a 121k-parameter GPT, and
    38% of the values of the default 842k one, in fp32 under the 8-bit codec."""

    def __post_init__(self) -> None:
        codec_by_name(self.codec)
        if not 0 < self.block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be in 1..{MAX_BLOCK_SIZE}, got {self.block_size}")
        if self.min_compressed_numel < 0:
            raise ValueError("min_compressed_numel must be >= 0")

    def choose(self, numel: int) -> CodecChoice:
        """The codec for a tensor of ``numel`` elements."""
        name = self.codec if numel >= self.min_compressed_numel else "none"
        return CodecChoice(codec_by_name(name), self.block_size)


class ErrorFeedback:
    """Residuals of lossy encodings, one float32 array per tensor key, kept across rounds.

    Encoding a slice adds the slice's stored residual first and stores the new one after, so
    slices of one tensor may be encoded by different threads as long as they do not overlap.
    """

    def __init__(self) -> None:
        self._residuals: dict[str, FloatArray] = {}
        self._lock = threading.Lock()
        self._averages: ErrorFeedback | None = None
        self.layout: bytes | None = None
        """(of the averages' store) The signature of the layout its residuals are of."""

    def of_averages(self) -> ErrorFeedback:
        """The residuals of the averages this peer encodes as the owner of a part.

        The senders' feedback pays back the rounding of their contributions; the owner's
        average is rounded again on its way to every member, and without feedback of its own
        that rounding is new error in every round, which the runs' averages add up (error
        compensation on both sides, as in DoubleSqueeze: Tang et al. 2019, arXiv:1905.05957).
        """
        with self._lock:
            if self._averages is None:
                self._averages = ErrorFeedback()
            return self._averages

    def _residual(self, key: str, numel: int) -> FloatArray:
        with self._lock:
            residual = self._residuals.get(key)
            if residual is None or residual.shape[0] != numel:
                residual = np.zeros(numel, dtype=np.float32)
                self._residuals[key] = residual
            return residual

    def encode(
        self, choice: CodecChoice, key: str, numel: int, offset: int, values: FloatArray
    ) -> tuple[bytes, FloatArray]:
        """Encode ``values`` (elements ``offset..`` of tensor ``key``) with feedback.

        Returns:
            The payload and what the receiver will decode from it.
        """
        codec = choice.codec
        if not codec.lossy:
            return codec.encode(values, choice.block_size), values
        residual = self._residual(key, numel)[offset : offset + values.shape[0]]
        corrected = values + residual
        if codec.largest is not None:
            # What a clipping codec cuts off is not kept: fed back, a value held past its range
            # would pile up there, and the sender would send the largest value for rounds
            # after its values came back within range. (An inf stays one, as the codec sends
            # it: its owner drops it.)
            clip_keeping_infinities(corrected, codec.largest, out=corrected)
        payload = codec.encode(corrected, choice.block_size)
        decoded = codec.decode(memoryview(payload), values.shape[0], choice.block_size)
        with np.errstate(invalid="ignore"):  # (inf - inf: a NaN residual, zeroed below)
            np.subtract(corrected, decoded, out=residual)
        if not np.isfinite(residual.sum()):  # one reduction: the check costs little
            # A value that was not finite (an inf, a NaN) leaves no residual: kept, it would
            # make every later encoding of its block NaN, long after the values recovered.
            residual[~np.isfinite(residual)] = 0.0
        return payload, decoded

    def residual_norm(self, key: str) -> float:
        """L2 norm of the residual stored for ``key`` (0 when none)."""
        with self._lock:
            residual = self._residuals.get(key)
        return 0.0 if residual is None else float(np.linalg.norm(residual))

    def clear(self) -> None:
        """Forget every residual (e.g. when the model is reset)."""
        with self._lock:
            self._residuals.clear()
            self._averages = None
