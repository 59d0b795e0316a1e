"""A newcomer's tensors, built straight from the verified chunks: bit-identical to safetensors'
own loader, each header field checked before anything is allocated, chunks let go of early."""

from __future__ import annotations

import hashlib
import json
import struct
import weakref
from typing import Any

import pytest
import safetensors.torch
import torch

from gossamer.core.errors import ProtocolError
from gossamer.train import state_sync_wire
from gossamer.train.state_sync_wire import (
    Manifest,
    StateSnapshot,
    StateSyncLimits,
    decode_manifest,
    deserialize_snapshot,
    encode_manifest,
    serialize_snapshot,
)


class _Chunk(bytearray):
    """A reply's bytes (a bytearray that can be watched with a weak reference)."""


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(3000, generator=gen)
    weights[3] = float("nan")
    weights[4] = -0.0
    return {
        "model.w": weights.reshape(60, 50),
        "model.b16": torch.randn(33, 5, generator=gen).to(torch.bfloat16),
        "model.h16": torch.randn(17, generator=gen).to(torch.float16),
        "outer.momentum": torch.randn(1000, generator=gen, dtype=torch.float64),
        "step": torch.tensor(12345, dtype=torch.int64),
        "scale": torch.tensor(0.5),
        "mask": torch.rand(9, generator=gen) > 0.5,
        "ids": torch.randint(-100, 100, (3, 4), generator=gen, dtype=torch.int8),
        "bytes": torch.randint(0, 255, (7,), generator=gen, dtype=torch.uint8),
        "empty": torch.zeros(0, 3, dtype=torch.int32),
        "also.empty": torch.zeros(5, 0),
        "z": torch.randn(4, generator=gen, dtype=torch.complex64),
        "f8": torch.randn(6, generator=gen).to(torch.float8_e4m3fn),
    }


def _cut(blob: bytes, chunk_bytes: int) -> list[bytes | bytearray | memoryview]:
    """``blob`` as a download holds it: a view of each chunk's own reply buffer."""
    return [
        memoryview(_Chunk(blob[start : start + chunk_bytes]))
        for start in range(0, len(blob), chunk_bytes)
    ]


def _manifest(blob: bytes, chunk_bytes: int) -> Manifest:
    digests = [
        hashlib.sha256(blob[start : start + chunk_bytes]).digest()
        for start in range(0, len(blob), chunk_bytes)
    ]
    return decode_manifest(
        encode_manifest(
            version=3, total_bytes=len(blob), chunk_bytes=chunk_bytes, meta={}, digests=digests
        ),
        StateSyncLimits(),
    )


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    return got.reshape(-1).view(torch.uint8).tolist() == want.reshape(-1).view(torch.uint8).tolist()


@pytest.mark.parametrize("chunk_bytes", [4096, 4097, 10_000, 1 << 20])
def test_tensors_built_from_the_chunks_are_bit_identical_to_safetensors_own(
    chunk_bytes: int,
) -> None:
    snapshot = StateSnapshot(version=3, tensors=_tensors(), meta={"step": 3})
    serialized = serialize_snapshot(snapshot, chunk_bytes=chunk_bytes)
    want = safetensors.torch.load(serialized.blob)
    chunks = _cut(serialized.blob, chunk_bytes)
    got = deserialize_snapshot(serialized.manifest, chunks)
    assert chunks == []  # consumed
    assert got.tensors.keys() == want.keys()
    for name, tensor in want.items():
        assert _same_bits(got.tensors[name], tensor), name
        assert _same_bits(got.tensors[name], snapshot.tensors[name]), name
        assert got.tensors[name].is_contiguous()


def test_a_header_cut_by_chunk_boundaries_is_read_whole() -> None:
    # Many tensors: the header spans chunks, so do tensors, and one chunk holds several.
    tensors = {f"t{i}": torch.full((i % 7 + 1,), float(i)) for i in range(400)}
    serialized = serialize_snapshot(
        StateSnapshot(version=3, tensors=tensors, meta={}), chunk_bytes=4096
    )
    header_bytes = struct.unpack("<Q", serialized.blob[:8])[0]
    assert header_bytes > 2 * 4096
    got = deserialize_snapshot(serialized.manifest, _cut(serialized.blob, 4096))
    for name, tensor in tensors.items():
        assert _same_bits(got.tensors[name], tensor), name


def test_chunks_are_let_go_of_as_the_tensors_fill(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunks were joined into one more copy, then loaded into a third: about three times
    the state at the peak. Now a chunk is let go of once the tensors before its end are in."""
    tensors = {f"t{i:03}": torch.full((4096,), float(i)) for i in range(64)}  # 16 KiB each
    serialized = serialize_snapshot(
        StateSnapshot(version=3, tensors=tensors, meta={}), chunk_bytes=16 << 10
    )
    chunks = _cut(serialized.blob, 16 << 10)
    buffers = [weakref.ref(chunk.obj) for chunk in chunks if isinstance(chunk, memoryview)]

    live_at_copy: list[int] = []
    copy = state_sync_wire._copy

    def watched(*args: Any) -> None:
        live_at_copy.append(sum(ref() is not None for ref in buffers))
        copy(*args)

    monkeypatch.setattr(state_sync_wire, "_copy", watched)
    got = deserialize_snapshot(serialized.manifest, chunks)
    assert len(buffers) == 65
    assert live_at_copy[0] == 65  # (the header)
    assert max(live_at_copy[-10:]) <= 11  # near the end, only the last chunks are held
    assert all(ref() is None for ref in buffers)  # the tensors hold copies, not the replies
    assert _same_bits(got.tensors["t063"], tensors["t063"])


def _blob(header: dict[str, Any] | bytes, data: bytes, *, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


_F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("blob", "says"),
    [
        (b"\x01\x00", "fewer than its header's length"),
        (_blob({"a": _F32x2}, bytes(8), length=10**6), "a header of 1000000 bytes"),
        (_blob({"a": _F32x2}, bytes(8), length=2**63), "a header of"),
        (_blob(b"{not json", bytes(8)), "not JSON"),
        (_blob(b"\xff\xfe", b""), "not JSON"),
        (_blob(b"[1, 2]", b""), "not a JSON object"),
        (_blob(b'{"a": 1, "a": 2}', b""), "names a tensor twice"),
        (_blob({"__metadata__": {"k": 1}}, b""), "__metadata__"),
        (_blob({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), "no dtype, shape and offsets"),
        (_blob({"a": [1, 2]}, bytes(8)), "no dtype, shape and offsets"),
        (_blob({"a": {**_F32x2, "extra": 1}}, bytes(8)), "no dtype, shape and offsets"),
        (_blob({"a": {**_F32x2, "dtype": "F128"}}, bytes(8)), "bad dtype, shape or offsets"),
        (_blob({"a": {**_F32x2, "dtype": 1}}, bytes(8)), "bad dtype, shape or offsets"),
        (_blob({"a": {**_F32x2, "shape": [-2]}}, bytes(8)), "bad dtype, shape or offsets"),
        (_blob({"a": {**_F32x2, "shape": [True, 2]}}, bytes(8)), "bad dtype, shape or offsets"),
        (_blob({"a": {**_F32x2, "shape": 2}}, bytes(8)), "bad dtype, shape or offsets"),
        (_blob({"a": {**_F32x2, "shape": [2.0]}}, bytes(8)), "bad dtype, shape or offsets"),
        (_blob({"a": {**_F32x2, "data_offsets": [0]}}, bytes(8)), "bad dtype, shape or offs"),
        (_blob({"a": {**_F32x2, "data_offsets": [8, 0]}}, bytes(8)), "bad dtype, shape or o"),
        (_blob({"a": {**_F32x2, "data_offsets": [0, 16]}}, bytes(8)), "bad dtype, shape or o"),
        (_blob({"a": {**_F32x2, "data_offsets": [-8, 0]}}, bytes(8)), "bad dtype, shape or o"),
        (_blob({"a": {**_F32x2, "shape": [3]}}, bytes(8)), "of 12 bytes has 8 in the data"),
        (_blob({"a": {**_F32x2, "shape": [2**40, 2**40]}}, bytes(8)), "bytes has 8 in the data"),
        (
            _blob({"a": _F32x2, "b": {**_F32x2, "data_offsets": [4, 12]}}, bytes(12)),
            "overlap or leave gaps",
        ),
        (
            _blob({"a": _F32x2, "b": {**_F32x2, "data_offsets": [12, 20]}}, bytes(20)),
            "overlap or leave gaps",
        ),
        (_blob({"a": _F32x2}, bytes(12)), "take 8 of the 12 data bytes"),
        # safetensors reads UTF-8 only (json.loads would guess UTF-16 from the bytes)
        (_blob(json.dumps({"a": _F32x2}).encode("utf-16"), bytes(8)), "not JSON"),
        (
            _blob({"a": {**_F32x2, "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}, b""),
            "strides past 64 bits",
        ),
    ],
)
def test_a_malformed_safetensors_header_is_a_protocol_error(blob: bytes, says: str) -> None:
    chunk_bytes = max(len(blob), 1)
    with pytest.raises(ProtocolError, match=says):
        deserialize_snapshot(_manifest(blob, chunk_bytes), _cut(blob, chunk_bytes))


def test_a_malformed_header_allocates_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor is checked before the first one is allocated."""
    allocated: list[object] = []
    empty = torch.empty

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        allocated.append(args)
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", counting)
    blob = _blob({"a": _F32x2, "b": {**_F32x2, "data_offsets": [8, 20]}}, bytes(20))
    with pytest.raises(ProtocolError):
        deserialize_snapshot(_manifest(blob, len(blob)), _cut(blob, len(blob)))
    assert allocated == []
