"""State sync's wire format: encode/decode round trips and refusal of malformed input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct

import pytest
import safetensors.torch
import torch

from gossamer.core.errors import CorruptedDataError, ProtocolError
from gossamer.train.state_sync_wire import (
    MAX_REQUEST_BYTES,
    REPLY_HEADER_BYTES,
    ReplyHeader,
    ReplyStatus,
    Request,
    RequestKind,
    StateSnapshot,
    StateSyncLimits,
    decode_manifest,
    decode_reply,
    decode_request,
    deserialize_snapshot,
    encode_manifest,
    encode_reply,
    encode_request,
    serialize_snapshot,
)


def test_request_round_trip() -> None:
    request = Request(
        kind=RequestKind.CHUNK, request_id=b"\x07" * 16, version=3, index=9, timeout_ms=1500
    )
    assert decode_request(encode_request(request)) == request
    manifest = Request(kind=RequestKind.MANIFEST, request_id=b"\x01" * 16)
    assert decode_request(encode_request(manifest)) == manifest
    assert len(encode_request(request)) < MAX_REQUEST_BYTES
    # Chunk requests name the manifest they began on; requests without it still decode.
    named = dataclasses.replace(request, version=2**62, index=2**62, manifest_sha256="ab" * 32)
    assert decode_request(encode_request(named)) == named
    assert len(encode_request(named)) < MAX_REQUEST_BYTES
    assert "manifest" not in json.loads(encode_request(request))


_CHUNK = {"kind": "chunk", "request_id": "0" * 32, "timeout_ms": 10, "version": 1, "index": 2}


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "all", "request_id": "0" * 32, "timeout_ms": 10},
        {"kind": "manifest", "request_id": "0" * 31, "timeout_ms": 10},
        {"kind": "manifest", "request_id": "G" * 32, "timeout_ms": 10},
        {"kind": "manifest", "request_id": "0" * 32, "timeout_ms": 0},
        {"kind": "manifest", "request_id": "0" * 32, "timeout_ms": True},
        {"kind": "chunk", "request_id": "0" * 32, "timeout_ms": 10, "version": 1},
        {"kind": "chunk", "request_id": "0" * 32, "timeout_ms": 10, "version": 1, "index": 2**70},
        {"kind": ["chunk"], "request_id": "0" * 32, "timeout_ms": 10},
        {**_CHUNK, "manifest": "AB" * 32},
        {**_CHUNK, "manifest": "ab" * 31},
        {**_CHUNK, "manifest": 5},
    ],
)
def test_malformed_requests_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        decode_request(json.dumps(fields).encode())


def test_reply_round_trip_and_refusals() -> None:
    header = ReplyHeader(
        kind=RequestKind.CHUNK,
        status=ReplyStatus.OK,
        request_id=b"\x02" * 16,
        version=4,
        index=5,
        body_bytes=3,
    )
    payload = bytearray(encode_reply(header, b"xyz"))
    got, body = decode_reply(payload)
    assert got == header
    assert bytes(body) == b"xyz"
    for bad in (payload[:-1], payload + b"!", payload[: REPLY_HEADER_BYTES - 1], b"x" * 100):
        with pytest.raises(ProtocolError):
            decode_reply(bytearray(bad))
    wrong_kind = bytearray(payload)
    wrong_kind[4] = 99
    with pytest.raises(ProtocolError, match="unknown kind"):
        decode_reply(wrong_kind)


def test_serialized_snapshot_manifest_is_deterministic_and_checked() -> None:
    tensors = {"a": torch.arange(5000, dtype=torch.float32), "b": torch.tensor(3)}
    one = serialize_snapshot(
        StateSnapshot(version=2, tensors=tensors, meta={"z": 1, "a": 2}), chunk_bytes=4096
    )
    two = serialize_snapshot(
        StateSnapshot(version=2, tensors=dict(reversed(tensors.items())), meta={"a": 2, "z": 1}),
        chunk_bytes=4096,
    )
    assert one.manifest_bytes == two.manifest_bytes
    assert one.manifest.num_chunks == -(-len(one.blob) // 4096)
    assert one.manifest.chunk_range(one.manifest.num_chunks - 1)[1] == len(one.blob)
    limits = StateSyncLimits()
    assert decode_manifest(one.manifest_bytes, limits).sha256 == one.manifest.sha256
    with pytest.raises(ProtocolError, match="total bytes"):
        decode_manifest(one.manifest_bytes, StateSyncLimits(max_state_bytes=100))
    with pytest.raises(ProtocolError, match="does not match"):
        decode_manifest(one.manifest_bytes[:-1], limits)
    with pytest.raises(ProtocolError, match="format"):
        decode_manifest(b"XXXX" + one.manifest_bytes[4:], limits)
    with pytest.raises(ProtocolError, match="bytes"):
        decode_manifest(b"short", limits)
    not_json = encode_manifest(
        version=1, total_bytes=10, chunk_bytes=10, meta={}, digests=[b"\0" * 32]
    ).replace(b"{}", b"{]")
    with pytest.raises(ProtocolError, match="JSON"):
        decode_manifest(not_json, limits)


def test_tied_weights_are_serialized() -> None:
    base = torch.arange(10.0)
    snap = StateSnapshot(version=0, tensors={"a": base, "b": base, "c": base[2:5]}, meta={})
    assert serialize_snapshot(snap, chunk_bytes=4096).manifest.total_bytes > 0


@pytest.mark.parametrize("field", ["max_state_bytes", "max_chunk_bytes", "max_num_chunks"])
def test_limits_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        StateSyncLimits(**{field: 0})  # type: ignore[arg-type]


def test_a_manifest_whose_meta_nests_too_deep_is_refused() -> None:
    """json raises RecursionError (not ValueError) for it: that escaped as no Gossamer error."""
    meta_bytes = b"[" * 200_000 + b"]" * 200_000
    manifest = encode_manifest(
        version=1, total_bytes=10, chunk_bytes=10, meta={}, digests=[b"\0" * 32]
    )
    header_bytes = 48  # ends with the meta's length (8 bytes); the meta and digests follow
    data = bytearray(manifest[:header_bytes]) + meta_bytes + manifest[-32:]
    struct.pack_into("<Q", data, header_bytes - 8, len(meta_bytes))
    with pytest.raises(ProtocolError, match="nested too deep"):
        decode_manifest(bytes(data), StateSyncLimits())


def test_valid_safetensors_that_hold_no_snapshot_are_refused_as_corrupted() -> None:
    blob = safetensors.torch.save({"": torch.zeros(4)})  # a tensor name a snapshot refuses
    manifest = decode_manifest(
        encode_manifest(
            version=3,
            total_bytes=len(blob),
            chunk_bytes=len(blob),
            meta={},
            digests=[hashlib.sha256(blob).digest()],
        ),
        StateSyncLimits(),
    )
    with pytest.raises(CorruptedDataError, match="bad tensor name"):
        deserialize_snapshot(manifest, [blob])


def test_a_manifest_whose_meta_nests_deeper_than_readers_recurse_is_refused() -> None:
    """600 levels pass json, then the optimizer state's reader recursed past Python's limit."""
    meta: dict[str, object] = {"optimizer": {}}
    inner = meta["optimizer"]
    for _ in range(40):
        assert isinstance(inner, dict)
        inner["x"] = {}
        inner = inner["x"]
    with pytest.raises(ProtocolError, match="deeper than 32"):
        decode_manifest(
            encode_manifest(
                version=1, total_bytes=10, chunk_bytes=10, meta=meta, digests=[b"\0" * 32]
            ),
            StateSyncLimits(),
        )


def test_a_manifest_cut_into_chunks_smaller_than_donors_cut_is_refused() -> None:
    """A million one-byte chunks: 74 MiB of Python objects and 0.3 s to decode one manifest,
    for a state a donor would have cut into 256 chunks."""
    limits = StateSyncLimits()
    tiny = encode_manifest(
        version=1, total_bytes=3, chunk_bytes=1, meta={}, digests=[b"\0" * 32] * 3
    )
    with pytest.raises(ProtocolError, match="at least 4096"):
        decode_manifest(tiny, limits)
    one_chunk = encode_manifest(
        version=1, total_bytes=3, chunk_bytes=3, meta={}, digests=[b"\0" * 32]
    )
    assert decode_manifest(one_chunk, limits).num_chunks == 1  # a small state is one chunk


def test_a_meta_larger_than_its_receivers_accept_is_refused_when_serializing() -> None:
    """A donor serialized any meta; every newcomer then refused the manifest."""
    snap = StateSnapshot(version=1, tensors={"a": torch.zeros(3)}, meta={"tree": "x" * 100})
    meta_bytes = len(b'{"tree":"' + b"x" * 100 + b'"}')
    serialize_snapshot(snap, chunk_bytes=4096, max_meta_bytes=meta_bytes)  # at the limit: fine
    with pytest.raises(ValueError, match=f"meta of {meta_bytes} bytes is larger than its rec"):
        serialize_snapshot(snap, chunk_bytes=4096, max_meta_bytes=meta_bytes - 1)
