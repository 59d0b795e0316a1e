"""Codecs and the tensor wire format: round trips, error bounds, limits, error feedback."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gossamer.comm.codecs import (
    CodecChoice,
    CodecPolicy,
    ErrorFeedback,
    codec_by_name,
    codec_names,
)
from gossamer.comm.plan import FlatLayout
from gossamer.comm.reduction import ChunkCodec
from gossamer.comm.transport import message_bytes
from gossamer.comm.wire import (
    WireLimits,
    decode_piece,
    decode_tensor,
    encode_piece,
    encode_tensor,
    pack_piece_header,
)
from gossamer.core.config_loader import load_run_config
from gossamer.core.errors import ProtocolError
from gossamer.models import GPT

LIMITS = WireLimits()
finite_floats = st.floats(-1e4, 1e4, allow_nan=False, width=32)
value_arrays = arrays(np.float32, st.integers(1, 3000), elements=finite_floats)


def _round_trip(values: np.ndarray, name: str, block_size: int = 256) -> np.ndarray:
    encoded, decoded_by_sender = encode_piece(values, CodecChoice(codec_by_name(name), block_size))
    piece, end = decode_piece(memoryview(encoded), 0, LIMITS)
    assert end == len(encoded)
    np.testing.assert_array_equal(piece.values, decoded_by_sender)
    return piece.values


@settings(max_examples=40, deadline=None)
@given(value_arrays)
def test_none_codec_is_exact(values: np.ndarray) -> None:
    np.testing.assert_array_equal(_round_trip(values, "none"), values)


@settings(max_examples=40, deadline=None)
@given(value_arrays, st.sampled_from(["fp16", "bf16"]))
def test_half_codecs_keep_relative_precision(values: np.ndarray, name: str) -> None:
    decoded = _round_trip(values, name)
    relative = 2.0**-11 if name == "fp16" else 2.0**-8
    bound = np.abs(values) * relative + (6e-8 if name == "fp16" else 1e-38)
    assert np.all(np.abs(decoded - values) <= bound + 1e-30)


@settings(max_examples=40, deadline=None)
@given(value_arrays, st.sampled_from([1, 7, 64, 4096]))
def test_int8_error_is_at_most_half_a_step_per_block(values: np.ndarray, block: int) -> None:
    decoded = _round_trip(values, "int8", block)
    for start in range(0, values.shape[0], block):
        chunk = values[start : start + block]
        step = float(np.abs(chunk).max()) / 127.0
        error = np.abs(decoded[start : start + block] - chunk)
        assert float(error.max()) <= step / 2 * 1.0001 + 1e-12


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0, 1e37])
def test_an_int8_piece_with_a_scale_no_encoder_makes_is_refused(scale: float) -> None:
    # (a NaN, infinite or huge scale turned a whole block of the average to NaN for everyone)
    values = np.ones(128, dtype=np.float32)
    encoded = bytearray(encode_piece(values, CodecChoice(codec_by_name("int8"), 64))[0])
    payload_at = len(encoded) - (2 * 4 + 128)
    struct.pack_into("<f", encoded, payload_at, scale)
    with pytest.raises(ProtocolError, match="scale"):
        decode_piece(memoryview(encoded), 0, LIMITS)


def test_int8_keeps_the_largest_floats_finite() -> None:
    top = float(np.finfo(np.float32).max)
    values = np.array([top, -top, 1.0, 0.0], dtype=np.float32)
    decoded = _round_trip(values, "int8", 4)
    assert np.isfinite(decoded).all()
    assert abs(decoded[0] - top) <= top / 254 * 1.0001


def test_int8_is_about_four_times_smaller() -> None:
    values = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    encoded, _ = encode_piece(values, CodecChoice(codec_by_name("int8"), 4096))
    assert 3.9 < values.nbytes / len(encoded) < 4.0


def test_fp16_clips_instead_of_overflowing() -> None:
    decoded = _round_trip(np.array([1e6, -1e6, 1.0], dtype=np.float32), "fp16")
    assert np.all(np.isfinite(decoded))


def test_bf16_clips_instead_of_overflowing() -> None:
    # 3.4e38 is finite in float32 and past bfloat16's largest value: it was rounded to inf.
    decoded = _round_trip(np.array([3.4e38, -3.4e38, 1.0], dtype=np.float32), "bf16")
    assert np.all(np.isfinite(decoded))
    assert decoded[0] == float(torch.finfo(torch.bfloat16).max)


@pytest.mark.parametrize("name", ["fp16", "bf16"])
@pytest.mark.parametrize("feedback", [False, True])
def test_half_precision_codecs_send_an_infinity_as_one(name: str, feedback: bool) -> None:
    # Clipped like a finite value past the range, an inf went out as the codec's largest
    # finite value (65504, 3.4e38) and was averaged in on every member; sent as inf, the owner
    # that receives it drops its sender, as with the other codecs. Finite values past the range
    # are still clipped, and NaN stays NaN.
    largest = float(codec_by_name(name).largest or 0.0)
    values = np.array([np.inf, -np.inf, 1e6 if name == "fp16" else 3.4e38, np.nan, 1.0], "f4")
    choice = CodecChoice(codec_by_name(name), 64)
    if feedback:
        payload, decoded = ErrorFeedback().encode(choice, "w", 5, 0, values.copy())
    else:
        payload = choice.codec.encode(values, 64)
        decoded = choice.codec.decode(memoryview(payload), 5, 64)
    assert decoded[0] == np.inf
    assert decoded[1] == -np.inf
    assert decoded[2] == np.float32(largest)
    assert np.isnan(decoded[3])
    assert decoded[4] == 1.0


@pytest.mark.parametrize("name", ["none", "fp16", "bf16", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_tensor_round_trip_keeps_shape_and_dtype(name: str, dtype: torch.dtype) -> None:
    tensor = torch.randn(3, 5, 7).to(dtype)
    decoded = decode_tensor(encode_tensor(tensor, CodecChoice(codec_by_name(name), 16)), LIMITS)
    assert decoded.shape == tensor.shape
    assert decoded.dtype == dtype
    assert torch.allclose(decoded.float(), tensor.float(), atol=0.05, rtol=0.02)


def test_small_tensors_go_uncompressed() -> None:
    policy = CodecPolicy(codec="int8", min_compressed_numel=1000)
    assert policy.choose(999).codec.name == "none"
    assert policy.choose(1000).codec.name == "int8"
    assert set(codec_names()) >= {"none", "fp16", "bf16", "int8"}
    with pytest.raises(ValueError, match="unknown codec"):
        CodecPolicy(codec="zstd")


def test_the_default_policy_compresses_the_matrices_of_a_small_model() -> None:
    """A 64-wide GPT's matrices (64 x 64 and up) are compressed, its biases and norms are not."""
    flags = [("model.num_layers", "2"), ("model.num_heads", "2"), ("model.width", "64")]
    model = GPT(load_run_config(None, flags).model)
    policy = CodecPolicy(codec="int8")
    compressed = 0
    total = 0
    for param in model.parameters():
        name = policy.choose(param.numel()).codec.name
        assert name == ("int8" if param.dim() >= 2 else "none"), tuple(param.shape)
        compressed += param.numel() if name == "int8" else 0
        total += param.numel()
    assert compressed / total > 0.95


def _valid_piece() -> bytes:
    encoded, _ = encode_piece(
        np.arange(8, dtype=np.float32), CodecChoice(codec_by_name("int8"), 4), shape=(2, 4)
    )
    return encoded


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:4] + b"\x63" + b[5:], "unknown codec"),
        (lambda b: b[:5] + b"\x09" + b[6:], "dtype"),
        (lambda b: b[:6] + b"\x20" + b[7:], "dims"),
        (lambda b: b[:12] + struct.pack("<Q", 1 << 40) + b[20:], "values"),
        (lambda b: b[:20] + struct.pack("<Q", 1 << 40) + b[28:], "payload"),
        (lambda b: b[:-1], "payload"),
        (lambda b: b[:10], "header"),
        (lambda b: b[:32] + struct.pack("<Q", 3) + b[40:], "does not hold"),
        (lambda b: b[:8] + struct.pack("<I", 0) + b[12:], "block size"),
    ],
)
def test_malformed_pieces_are_refused_before_allocating(mutate: object, message: str) -> None:
    assert callable(mutate)
    with pytest.raises(ProtocolError, match=message):
        decode_tensor(mutate(_valid_piece()), WireLimits(max_elements=1 << 20))


def test_an_empty_piece_with_a_dim_past_the_limit_is_refused() -> None:
    # Shape (0, 2**63) holds 0 values, as its count says: reshape then raised TypeError.
    data = bytearray(encode_tensor(torch.empty(0, 1), CodecChoice(codec_by_name("none"), 64)))
    struct.pack_into("<Q", data, 28 + 8, 2**63)  # (the second dim, after the 28-byte header)
    with pytest.raises(ProtocolError, match="does not hold"):
        decode_tensor(bytes(data), LIMITS)


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(ProtocolError, match="after the tensor"):
        decode_tensor(_valid_piece() + b"\0", LIMITS)


@pytest.mark.parametrize("name", ["int8", "fp16", "bf16"])
def test_error_feedback_makes_the_cumulative_error_vanish(name: str) -> None:
    rng = np.random.default_rng(1)
    feedback = ErrorFeedback()
    choice = CodecChoice(codec_by_name(name), 64)
    sent_sum = np.zeros(4096, dtype=np.float64)
    decoded_sum = np.zeros(4096, dtype=np.float64)
    plain_sum = np.zeros(4096, dtype=np.float64)
    errors = []
    for _ in range(200):
        values = (rng.standard_normal(4096) * 0.01 + 0.003).astype(np.float32)
        encoded, _ = encode_piece(values, choice, feedback=feedback, feedback_key="w")
        decoded = decode_piece(memoryview(encoded), 0, LIMITS)[0].values
        plain, _ = encode_piece(values, choice)
        sent_sum += values
        decoded_sum += decoded
        plain_sum += decode_piece(memoryview(plain), 0, LIMITS)[0].values
        errors.append(float(np.abs(decoded_sum - sent_sum).max()))
    # With feedback the cumulative error stays bounded by one round's residual ...
    assert errors[-1] <= feedback.residual_norm("w") + 1e-6
    assert errors[-1] < 2 * max(errors[:10])
    # ... while without it, it grows with the rounds.
    assert float(np.abs(plain_sum - sent_sum).max()) > 5 * errors[-1]


def test_error_feedback_keeps_no_clipped_excess() -> None:
    # Five rounds of values past fp16's range, then zeros: the sender sends zeros at once.
    # Before, the residual kept what clipping cut off (172,480 per value after five rounds) and
    # the zeros went out as 65504, 65504, 41472 before they reached 0.
    feedback = ErrorFeedback()
    choice = CodecChoice(codec_by_name("fp16"), 64)
    for _ in range(5):
        encode_piece(
            np.full(64, 1e5, dtype=np.float32), choice, feedback=feedback, feedback_key="w"
        )
    encoded, _ = encode_piece(np.zeros(64, np.float32), choice, feedback=feedback, feedback_key="w")
    decoded = decode_piece(memoryview(encoded), 0, LIMITS)[0].values
    assert float(np.abs(decoded).max()) == 0.0
    assert feedback.residual_norm("w") == 0.0


def test_error_feedback_on_slices_matches_the_whole() -> None:
    values = np.random.default_rng(2).standard_normal(1000).astype(np.float32)
    choice = CodecChoice(codec_by_name("int8"), 100)
    whole, sliced = ErrorFeedback(), ErrorFeedback()
    for _ in range(3):
        _, a = whole.encode(choice, "t", 1000, 0, values)
        _, b1 = sliced.encode(choice, "t", 1000, 0, values[:500])
        _, b2 = sliced.encode(choice, "t", 1000, 500, values[500:])
        np.testing.assert_array_equal(a, np.concatenate([b1, b2]))


@pytest.mark.parametrize("name", ["int8", "fp16", "bf16"])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on the inf itself
def test_a_value_that_is_not_finite_leaves_no_residual(name: str) -> None:
    # One inf in one round: its block decodes to nothing useful that round, and the residual
    # it leaves is zero, not NaN, so the rounds after (all finite) decode as usual. (In 8
    # bits the block goes at the largest scale, its other values as 0: what they lost is
    # carried to the next round, as any rounding error is.)
    choice = CodecChoice(codec_by_name(name), 64)
    feedback = ErrorFeedback()
    values = np.ones(128, dtype=np.float32)
    values[3] = np.inf
    feedback.encode(choice, "w", 128, 0, values)
    assert np.isfinite(feedback.residual_norm("w"))
    ones = np.ones(128, dtype=np.float32)
    _, decoded = feedback.encode(choice, "w", 128, 0, ones)
    assert np.isfinite(decoded).all()
    if name == "int8":
        carried = np.delete(decoded[:64], 3)
        np.testing.assert_allclose(carried, 2.0, rtol=1e-2)
        np.testing.assert_allclose(decoded[64:], 1.0, rtol=1e-2)
    for _ in range(2 if name == "int8" else 3):
        _, decoded = feedback.encode(choice, "w", 128, 0, ones)
        np.testing.assert_allclose(decoded, 1.0, rtol=2e-2)


def test_uncompressed_values_are_read_where_they_lie_and_tensors_are_copied() -> None:
    values = np.arange(10, dtype=np.float32)
    encoded, _ = encode_piece(values, CodecChoice(codec_by_name("none"), 256))
    message = bytearray(encoded)
    piece, _ = decode_piece(memoryview(message), 0, LIMITS)
    assert np.shares_memory(piece.values, np.frombuffer(message, dtype=np.uint8))
    np.testing.assert_array_equal(piece.values, values)
    tensor = decode_tensor(message, LIMITS)
    message[-4:] = struct.pack("<f", -1.0)
    assert tensor[-1].item() == 9.0  # a decoded tensor owns its memory


@pytest.mark.parametrize(("name", "block_size"), [("int8", 1 << 20), ("fp16", 1)])
def test_a_chunk_piece_of_other_size_or_codec_is_refused_before_it_is_decoded(
    name: str, block_size: int
) -> None:
    # The layout says the chunk holds 1,000 int8 values; the piece announces 5M values (its
    # payload present): decoding them first would allocate 20 MB of float32 from a 5-10 MB body.
    layout = FlatLayout([torch.zeros(1000)], CodecPolicy(codec="int8", min_compressed_numel=0))
    codec = codec_by_name(name)
    num = 5_000_000
    nbytes = codec.encoded_nbytes(num, block_size)
    header = pack_piece_header(CodecChoice(codec, block_size), (num,), num, nbytes)
    body = memoryview(bytes(header) + bytes(nbytes))
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="1000 int8 values"):
            ChunkCodec(layout, LIMITS).decode(body, 0, 1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_a_chunk_message_sends_uncompressed_values_from_where_they_lie(codec: str) -> None:
    tensors = [torch.zeros(100), torch.zeros(70_000), torch.zeros(30)]
    layout = FlatLayout(tensors, CodecPolicy(codec=codec, min_compressed_numel=1000))
    chunk_codec = ChunkCodec(layout, LIMITS)
    values = np.arange(layout.total, dtype=np.float32)
    start, end = 50, layout.total - 10  # spans all three tensors
    message = chunk_codec.encode_message(values, start, end, None, prefix=b"head")
    assert isinstance(message, tuple)
    joined = message_bytes(message)
    assert joined[:4] == b"head"
    decoded = chunk_codec.decode(memoryview(joined)[4:], start, end)
    np.testing.assert_allclose(decoded, values[start:end], atol=float(values.max()) / 254 + 1e-3)
    # the uncompressed tensors' values are views of ``values``: not copied into the message
    shared = [p for p in message if isinstance(p, memoryview)]
    assert len(shared) == (3 if codec == "none" else 2)
    assert all(np.shares_memory(np.frombuffer(p, dtype=np.uint8), values) for p in shared)
