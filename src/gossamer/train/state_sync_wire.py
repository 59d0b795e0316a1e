"""The wire format of state sync: requests, replies and the manifest, every size bounded.

A newcomer pulls state by pushing small requests to a donor's :data:`REQUEST_TOPIC`; the donor
answers each one with a bulk transfer to the newcomer's :data:`REPLY_TOPIC`. Nothing here is ever
unpickled: a request is a short JSON object, a reply is a fixed binary header plus raw bytes, and a
manifest is a fixed binary header, JSON meta and one raw sha256 digest per chunk. Decoders check
every size and count against :class:`StateSyncLimits` before trusting it and raise
:class:`ProtocolError` on anything malformed.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import json
import math
import re
import struct
import sys
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch

from gossamer.core.errors import CorruptedDataError, ProtocolError

__all__ = [
    "DONOR_BUSY",
    "MAX_REQUEST_BYTES",
    "MIN_CHUNK_BYTES",
    "REPLY_HEADER_BYTES",
    "REPLY_TOPIC",
    "REQUEST_TOPIC",
    "Manifest",
    "ReplyHeader",
    "ReplyStatus",
    "Request",
    "RequestKind",
    "SerializedSnapshot",
    "StateSnapshot",
    "StateSyncLimits",
    "decode_manifest",
    "decode_reply",
    "decode_request",
    "deserialize_snapshot",
    "encode_manifest",
    "encode_reply",
    "encode_request",
    "serialize_snapshot",
]

REQUEST_TOPIC = "gossamer.state.v1.req"
"""Bulk topic a donor receives requests on."""
REPLY_TOPIC = "gossamer.state.v1.resp"
"""Bulk topic a newcomer receives replies on."""
MAX_REQUEST_BYTES = 512
"""Largest request accepted; requests are short JSON objects."""
MAX_ERROR_BYTES = 1024
"""Longest error text in a reply."""
MIN_CHUNK_BYTES = 4096
"""Smallest chunk a donor cuts a state into (a state of one chunk may be smaller)."""
MAX_TIMEOUT_MS = 3_600_000
"""Longest reply deadline a request may ask for."""
DONOR_BUSY = "state donor busy"
"""What a donor's refusal of a request for want of room starts with (net carries it to the
requester in the error's text): the request may be asked again later, the donor is healthy."""

_REPLY_MAGIC = b"GSR1"
_REPLY_HEADER = struct.Struct(
    "<4sBB2x16sqqQ"
)  # magic, kind, status, request id, version, index, body
REPLY_HEADER_BYTES = _REPLY_HEADER.size
_MANIFEST_MAGIC = b"GSM1"
_MANIFEST_FORMAT = 1
_MANIFEST_HEADER = struct.Struct("<4sH2xqQQQQ")  # magic, format, version, total, chunk, count, meta
_DIGEST_BYTES = 32
_REQUEST_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_INT = 1 << 62


@dataclass(frozen=True, kw_only=True, slots=True)
class StateSnapshot:
    """The global state a newcomer needs to start contributing."""

    version: int
    """The outer step the state belongs to."""
    tensors: dict[str, torch.Tensor]
    """Global weights, outer optimizer momentum, ... (CPU copies are made when serializing)."""
    meta: dict[str, Any]
    """JSON-serializable state: step, tokens, config hash, ... (comes back as JSON gives it)."""

    def __post_init__(self) -> None:
        if type(self.version) is not int or not 0 <= self.version < _MAX_INT:
            raise ValueError(f"snapshot version must be an int >= 0, got {self.version!r}")
        if not isinstance(self.meta, dict):
            raise ValueError(f"snapshot meta must be a dict, got {type(self.meta).__name__}")
        for name, tensor in self.tensors.items():
            if not isinstance(name, str) or not name or name == "__metadata__":
                raise ValueError(f"snapshot: bad tensor name {name!r}")
            if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
                raise ValueError(f"snapshot: {name!r} must be a dense torch.Tensor")


@dataclass(frozen=True, kw_only=True, slots=True)
class StateSyncLimits:
    """Sizes and counts a newcomer accepts from donors, checked before anything is allocated."""

    max_state_bytes: int = 64 << 30
    """Largest serialized state (weights, optimizer state) accepted."""
    max_chunk_bytes: int = 64 << 20
    """Largest chunk accepted."""
    max_num_chunks: int = 1 << 20
    """Most chunks a manifest may list."""
    max_meta_bytes: int = 1 << 20
    """Largest JSON meta accepted (a state whose meta grows with its model, as an optimizer's
    tree does, needs a limit sized from the model: see ``swarm_sync.meta_bytes_bound``)."""

    def __post_init__(self) -> None:
        for name in ("max_state_bytes", "max_chunk_bytes", "max_num_chunks", "max_meta_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"StateSyncLimits.{name} must be a positive int, got {value!r}")

    @property
    def max_manifest_bytes(self) -> int:
        """Largest manifest these limits allow."""
        return _MANIFEST_HEADER.size + self.max_meta_bytes + _DIGEST_BYTES * self.max_num_chunks

    @property
    def max_reply_bytes(self) -> int:
        """Largest reply these limits allow (a larger one is refused before it is received)."""
        body = max(self.max_chunk_bytes, self.max_manifest_bytes, MAX_ERROR_BYTES)
        return _REPLY_HEADER.size + body


class RequestKind(enum.IntEnum):
    """What a request asks for."""

    MANIFEST = 1
    CHUNK = 2


class ReplyStatus(enum.IntEnum):
    """How a donor answered."""

    OK = 0
    NOTHING_PUBLISHED = 1
    VERSION_GONE = 2
    BAD_REQUEST = 3
    CLOSED = 4


_KINDS = frozenset(int(kind) for kind in RequestKind)
_STATUSES = frozenset(int(status) for status in ReplyStatus)


@dataclass(frozen=True, kw_only=True, slots=True)
class Request:
    """A newcomer's request: the manifest of the newest snapshot, or one chunk of a version."""

    kind: RequestKind
    request_id: bytes
    """16 random bytes that the reply carries back."""
    version: int = 0
    index: int = 0
    timeout_ms: int = 60_000
    """How long the donor may take to deliver the reply."""
    manifest_sha256: str = ""
    """(Chunk requests) the hex sha256 of the manifest the download began on: a donor that
    published other bytes under the same version since serves the chunks of that one. Empty
    from newcomers of before it (and donors of before it ignore it): the version decides."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplyHeader:
    """The fixed header in front of every reply's body."""

    kind: RequestKind
    status: ReplyStatus
    request_id: bytes
    version: int
    index: int
    body_bytes: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Manifest:
    """What a snapshot is made of: its version, meta, and the sha256 of every chunk."""

    version: int
    total_bytes: int
    chunk_bytes: int
    meta: dict[str, Any]
    chunk_digests: tuple[bytes, ...]
    sha256: str
    """Hex sha256 of the encoded manifest: donors holding the same state agree on it."""

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_digests)

    def chunk_range(self, index: int) -> tuple[int, int]:
        """Byte range ``[start, stop)`` of chunk ``index`` in the serialized state."""
        start = index * self.chunk_bytes
        return start, min(start + self.chunk_bytes, self.total_bytes)


def encode_request(request: Request) -> bytes:
    """A request as compact JSON."""
    fields: dict[str, Any] = {
        "kind": "manifest" if request.kind is RequestKind.MANIFEST else "chunk",
        "request_id": request.request_id.hex(),
        "timeout_ms": request.timeout_ms,
    }
    if request.kind is RequestKind.CHUNK:
        fields |= {"version": request.version, "index": request.index}
        if request.manifest_sha256:
            fields["manifest"] = request.manifest_sha256
    return json.dumps(fields, separators=(",", ":")).encode()


def decode_request(payload: bytes | bytearray | memoryview) -> Request:
    """Parse and check a request.

    Raises:
        ProtocolError: oversized, not JSON, or a field missing, of the wrong type or out of range.
    """
    if len(payload) > MAX_REQUEST_BYTES:
        raise ProtocolError(f"state request of {len(payload)} bytes (at most {MAX_REQUEST_BYTES})")
    try:
        fields = json.loads(bytes(payload))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("state request is not JSON") from exc
    if not isinstance(fields, dict):
        raise ProtocolError("state request is not a JSON object")
    kinds = {"manifest": RequestKind.MANIFEST, "chunk": RequestKind.CHUNK}
    kind_name = fields.get("kind")
    kind = kinds.get(kind_name) if isinstance(kind_name, str) else None
    request_id = fields.get("request_id")
    if kind is None or not isinstance(request_id, str) or not _REQUEST_ID_RE.match(request_id):
        raise ProtocolError("state request without a valid kind and request_id")
    timeout_ms = _bounded_int(fields, "timeout_ms", 1, MAX_TIMEOUT_MS)
    version = index = 0
    manifest_sha256 = ""
    if kind is RequestKind.CHUNK:
        version = _bounded_int(fields, "version", 0, _MAX_INT)
        index = _bounded_int(fields, "index", 0, _MAX_INT)
        manifest_sha256 = fields.get("manifest", "")
        if not isinstance(manifest_sha256, str) or not (
            manifest_sha256 == "" or _SHA256_RE.match(manifest_sha256)
        ):
            raise ProtocolError("state request field 'manifest' must be a hex sha256")
    return Request(
        kind=kind,
        request_id=bytes.fromhex(request_id),
        version=version,
        index=index,
        timeout_ms=timeout_ms,
        manifest_sha256=manifest_sha256,
    )


def _bounded_int(fields: dict[str, Any], name: str, low: int, high: int) -> int:
    value = fields.get(name)
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError(f"state request field {name!r} must be an int in [{low}, {high}]")
    return value


def encode_reply(header: ReplyHeader, body: bytes | memoryview = b"") -> bytes:
    """Header plus body, ready for one bulk transfer."""
    assert header.body_bytes == len(body), "reply header and body disagree"
    packed = _REPLY_HEADER.pack(
        _REPLY_MAGIC,
        header.kind,
        header.status,
        header.request_id,
        header.version,
        header.index,
        header.body_bytes,
    )
    return b"".join((packed, body))


def decode_reply(payload: bytearray) -> tuple[ReplyHeader, memoryview]:
    """Split a reply into its header and a view of its body (no copy).

    Raises:
        ProtocolError: too short, wrong magic, unknown kind or status, or a body of another size.
    """
    if len(payload) < _REPLY_HEADER.size:
        raise ProtocolError(f"state reply of {len(payload)} bytes is shorter than its header")
    magic, kind, status, request_id, version, index, body_bytes = _REPLY_HEADER.unpack_from(payload)
    if magic != _REPLY_MAGIC:
        raise ProtocolError("state reply with a wrong magic number")
    if kind not in _KINDS or status not in _STATUSES:
        raise ProtocolError(f"state reply with unknown kind {kind} or status {status}")
    if body_bytes != len(payload) - _REPLY_HEADER.size:
        raise ProtocolError(
            f"state reply announces {body_bytes} body bytes, carries "
            f"{len(payload) - _REPLY_HEADER.size}"
        )
    header = ReplyHeader(
        kind=RequestKind(kind),
        status=ReplyStatus(status),
        request_id=request_id,
        version=version,
        index=index,
        body_bytes=body_bytes,
    )
    return header, memoryview(payload)[_REPLY_HEADER.size :]


def encode_manifest(
    *, version: int, total_bytes: int, chunk_bytes: int, meta: dict[str, Any], digests: list[bytes]
) -> bytes:
    """A manifest's bytes; the same state always encodes to the same bytes."""
    meta_bytes = _encode_meta(meta)
    header = _MANIFEST_HEADER.pack(
        _MANIFEST_MAGIC,
        _MANIFEST_FORMAT,
        version,
        total_bytes,
        chunk_bytes,
        len(digests),
        len(meta_bytes),
    )
    return b"".join((header, meta_bytes, *digests))


def _encode_meta(meta: dict[str, Any]) -> bytes:
    """A manifest's meta as it is sent."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def decode_manifest(data: bytes | memoryview, limits: StateSyncLimits) -> Manifest:
    """Parse and check a manifest against ``limits``.

    Raises:
        ProtocolError: malformed, inconsistent, or over a limit (the message names which).
    """
    size = len(data)
    if not _MANIFEST_HEADER.size <= size <= limits.max_manifest_bytes:
        raise ProtocolError(
            f"state manifest of {size} bytes (at most {limits.max_manifest_bytes} accepted)"
        )
    magic, fmt, version, total, chunk_bytes, num_chunks, meta_len = _MANIFEST_HEADER.unpack_from(
        data
    )
    if magic != _MANIFEST_MAGIC or fmt != _MANIFEST_FORMAT:
        raise ProtocolError(f"state manifest of unknown format ({magic!r}, {fmt})")
    if version < 0:
        raise ProtocolError(f"state manifest with negative version {version}")
    _check_limit("total bytes", total, limits.max_state_bytes, low=1)
    _check_limit("chunk bytes", chunk_bytes, limits.max_chunk_bytes, low=1)
    _check_limit("chunk count", num_chunks, limits.max_num_chunks, low=1)
    _check_limit("meta bytes", meta_len, limits.max_meta_bytes, low=0)
    if num_chunks > 1 and chunk_bytes < MIN_CHUNK_BYTES:
        raise ProtocolError(
            f"state manifest cuts {total} bytes into chunks of {chunk_bytes} (donors cut chunks "
            f"of at least {MIN_CHUNK_BYTES})"
        )
    if num_chunks != -(-total // chunk_bytes):
        raise ProtocolError(
            f"state manifest lists {num_chunks} chunks for {total} bytes in chunks of {chunk_bytes}"
        )
    meta_start = _MANIFEST_HEADER.size
    digests_start = meta_start + meta_len
    if size != digests_start + _DIGEST_BYTES * num_chunks:
        raise ProtocolError(f"state manifest of {size} bytes does not match its header")
    try:
        meta = json.loads(bytes(data[meta_start:digests_start]))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # (nested too deep)
        raise ProtocolError("state manifest meta is not JSON (or nested too deep)") from exc
    if not isinstance(meta, dict):
        raise ProtocolError("state manifest meta is not a JSON object")
    if _depth(meta) > _MAX_META_DEPTH:  # what reads it recurses too (optimizer state)
        raise ProtocolError(f"state manifest meta nests deeper than {_MAX_META_DEPTH} levels")
    digests = tuple(
        bytes(data[digests_start + i * _DIGEST_BYTES : digests_start + (i + 1) * _DIGEST_BYTES])
        for i in range(num_chunks)
    )
    return Manifest(
        version=version,
        total_bytes=total,
        chunk_bytes=chunk_bytes,
        meta=meta,
        chunk_digests=digests,
        sha256=hashlib.sha256(data).hexdigest(),
    )


_MAX_META_DEPTH = 32


def _depth(value: Any) -> int:
    """How deep JSON ``value`` nests (a scalar is 0), without recursion."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _check_limit(what: str, value: int, limit: int, *, low: int) -> None:
    if not low <= value <= limit:
        raise ProtocolError(f"state manifest {what} {value} outside [{low}, {limit}]")


@dataclass(frozen=True, kw_only=True, slots=True)
class SerializedSnapshot:
    """A snapshot as a donor serves it: safetensors bytes cut into chunks, and their manifest."""

    manifest: Manifest
    manifest_bytes: bytes
    blob: bytes


def serialize_snapshot(
    snapshot: StateSnapshot, *, chunk_bytes: int, max_meta_bytes: int | None = None
) -> SerializedSnapshot:
    """Serialize once: safetensors bytes, a sha256 per chunk, the manifest (blocking; CPU-heavy).

    Args:
        snapshot: what to serialize.
        chunk_bytes: bytes per chunk.
        max_meta_bytes: where given, the largest meta the snapshot's receivers accept (their
            :attr:`StateSyncLimits.max_meta_bytes`): a larger one is refused here, before any
            tensor is serialized, rather than by every newcomer.

    Raises:
        ValueError: meta is not JSON-serializable or larger than ``max_meta_bytes``, or the
            tensors cannot be saved.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    try:
        json.dumps(snapshot.meta, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"snapshot meta must be JSON-serializable (no NaN): {exc}") from exc
    if max_meta_bytes is not None:
        meta_bytes = len(_encode_meta(snapshot.meta))
        if meta_bytes > max_meta_bytes:
            raise ValueError(
                f"snapshot meta of {meta_bytes} bytes is larger than its receivers accept "
                f"({max_meta_bytes} bytes): newcomers would refuse the state"
            )
    prepared: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in snapshot.tensors.items():
        out = tensor.detach().to("cpu").contiguous()
        pointer = out.untyped_storage().data_ptr()
        if pointer and pointer in seen_storages:
            out = out.clone()  # safetensors refuses tensors that share memory (tied weights)
        seen_storages.add(pointer)
        prepared[name] = out
    try:
        blob = safetensors.torch.save(prepared)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ValueError(f"snapshot tensors cannot be serialized: {exc}") from exc
    view = memoryview(blob)
    digests = [
        hashlib.sha256(view[start : start + chunk_bytes]).digest()
        for start in range(0, len(blob), chunk_bytes)
    ]
    manifest_bytes = encode_manifest(
        version=snapshot.version,
        total_bytes=len(blob),
        chunk_bytes=chunk_bytes,
        meta=snapshot.meta,
        digests=digests,
    )
    limits = StateSyncLimits(
        max_state_bytes=max(1, len(blob)),
        max_chunk_bytes=chunk_bytes,
        max_num_chunks=max(1, len(digests)),
        max_meta_bytes=max(1, len(manifest_bytes)),
    )
    manifest = decode_manifest(manifest_bytes, limits)
    return SerializedSnapshot(manifest=manifest, manifest_bytes=manifest_bytes, blob=blob)


def deserialize_snapshot(
    manifest: Manifest, chunks: list[bytes | bytearray | memoryview]
) -> StateSnapshot:
    """Tensors from verified safetensors bytes, in chunks (blocking; consumes ``chunks``).

    Each tensor is copied once, straight out of the chunks, and each chunk is let go of as
    soon as it is copied out: the bytes held at once stay about one copy of the state (plus a
    chunk), where joining the chunks, then loading the joined bytes, held two. Every offset,
    dtype and shape of the safetensors header is checked (as safetensors checks them) before a
    tensor is allocated.

    Raises:
        ProtocolError: the bytes are not safetensors (a malformed header, or one that does not
            fit the bytes).
        CorruptedDataError: valid safetensors that hold no snapshot (a tensor named '').
    """
    if sys.byteorder != "little":  # (safetensors is little-endian: let it swap the bytes)
        tensors = _load_joined(manifest, chunks)
    else:
        tensors = _load_chunks(manifest, chunks)
    try:
        return StateSnapshot(version=manifest.version, tensors=tensors, meta=manifest.meta)
    except ValueError as exc:  # valid safetensors, not a snapshot (a tensor named '')
        raise CorruptedDataError(f"state version {manifest.version}: {exc}") from exc


_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    name: dtype
    for name, dtype in {
        "F64": getattr(torch, "float64", None),
        "F32": getattr(torch, "float32", None),
        "F16": getattr(torch, "float16", None),
        "BF16": getattr(torch, "bfloat16", None),
        "I64": getattr(torch, "int64", None),
        "I32": getattr(torch, "int32", None),
        "I16": getattr(torch, "int16", None),
        "I8": getattr(torch, "int8", None),
        "U64": getattr(torch, "uint64", None),
        "U32": getattr(torch, "uint32", None),
        "U16": getattr(torch, "uint16", None),
        "U8": getattr(torch, "uint8", None),
        "BOOL": getattr(torch, "bool", None),
        "C64": getattr(torch, "complex64", None),
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
    }.items()
    if isinstance(dtype, torch.dtype)
}
"""The safetensors dtypes torch holds, by their name in a header."""
_MAX_SAFETENSORS_HEADER_BYTES = 100_000_000
"""Largest safetensors header read (safetensors' own limit)."""
_MAX_DIM = 1 << 62


@dataclass(frozen=True, slots=True)
class _TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _load_joined(
    manifest: Manifest, chunks: list[bytes | bytearray | memoryview]
) -> dict[str, torch.Tensor]:
    """The tensors, by safetensors' own loader from the joined chunks (two copies at once)."""
    data = b"".join(chunks)
    chunks.clear()
    try:
        return safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error type from Rust
        raise ProtocolError(f"state version {manifest.version}: not safetensors ({exc})") from exc


def _load_chunks(
    manifest: Manifest, chunks: list[bytes | bytearray | memoryview]
) -> dict[str, torch.Tensor]:
    """The tensors of safetensors bytes held in ``chunks``, each copied once out of them."""
    views = [memoryview(chunk).cast("B") for chunk in chunks]
    starts = [0]
    for view in views:
        starts.append(starts[-1] + len(view))
    total = starts[-1]
    what = f"state version {manifest.version}: not safetensors"
    if total < 8:
        raise ProtocolError(f"{what}: {total} bytes, fewer than its header's length")
    (header_bytes,) = struct.unpack("<Q", _read(views, starts, 0, 8))
    if header_bytes > min(total - 8, _MAX_SAFETENSORS_HEADER_BYTES):
        raise ProtocolError(f"{what}: a header of {header_bytes} bytes in {total}")
    data_start = 8 + header_bytes
    entries = _parse_header(_read(views, starts, 8, data_start), total - data_start, what)
    tensors: dict[str, torch.Tensor] = {}
    # In order of their bytes: no later tensor needs a chunk that ends before this one does,
    # so each chunk is let go of as soon as it is copied out (one tensor may be most of them).
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        flat = torch.empty(entry.end - entry.begin, dtype=torch.uint8)
        if len(flat):
            target = flat.numpy().data
            _copy(views, starts, data_start + entry.begin, data_start + entry.end, target, chunks)
        try:
            tensors[entry.name] = flat.view(entry.dtype).reshape(entry.shape)
        except RuntimeError as exc:  # (a shape of no elements, and dims torch cannot hold)
            raise ProtocolError(f"{what}: tensor {entry.name[:64]!r}: {exc}") from exc
    chunks.clear()
    return tensors


def _parse_header(header: bytes, data_bytes: int, what: str) -> list[_TensorEntry]:
    """The tensors a safetensors header lists, each checked, and together checked to fill the
    ``data_bytes`` after it exactly, each byte once (as safetensors checks them).

    Raises:
        ProtocolError: malformed, or not fitting the data (the message says how).
    """

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        fields = dict(pairs)
        if len(fields) != len(pairs):
            raise ProtocolError(f"{what}: a header names a tensor twice")
        return fields

    try:  # (UTF-8 as safetensors reads it: json.loads would guess UTF-16 from bytes)
        fields = json.loads(header.decode("utf-8"), object_pairs_hook=unique)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"{what}: its header is not JSON") from exc
    if not isinstance(fields, dict):
        raise ProtocolError(f"{what}: its header is not a JSON object")
    metadata = fields.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ProtocolError(f"{what}: its __metadata__ is not an object of strings")
    entries = []
    for name, info in fields.items():
        if not isinstance(info, dict) or info.keys() != {"dtype", "shape", "data_offsets"}:
            raise ProtocolError(f"{what}: tensor {name[:64]!r} has no dtype, shape and offsets")
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        shape, offsets = info["shape"], info["data_offsets"]
        if (
            dtype is None
            or not isinstance(shape, list)
            or not all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes
        ):
            raise ProtocolError(f"{what}: tensor {name[:64]!r} has a bad dtype, shape or offsets")
        if any(math.prod(shape[i:]) >= 1 << 63 for i in range(1, len(shape))):
            # (a stride past int64, as safetensors refuses it: [0, 2**62, 2**62] holds 0 bytes)
            raise ProtocolError(f"{what}: tensor {name[:64]!r} has strides past 64 bits")
        num_bytes = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != num_bytes:
            raise ProtocolError(
                f"{what}: tensor {name[:64]!r} of {num_bytes} bytes has "
                f"{offsets[1] - offsets[0]} in the data"
            )
        entries.append(_TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1]))
    covered = 0
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.begin != covered:
            raise ProtocolError(f"{what}: its tensors' data overlap or leave gaps")
        covered = entry.end
    if covered != data_bytes:
        raise ProtocolError(f"{what}: its tensors take {covered} of the {data_bytes} data bytes")
    return entries


def _read(views: list[memoryview], starts: list[int], start: int, stop: int) -> bytes:
    """Bytes ``[start, stop)`` of the chunks' concatenation."""
    out = bytearray(stop - start)
    _copy(views, starts, start, stop, memoryview(out))
    return bytes(out)


def _copy(
    views: list[memoryview],
    starts: list[int],
    start: int,
    stop: int,
    target: memoryview,
    release_from: list[bytes | bytearray | memoryview] | None = None,
) -> None:
    """Copy bytes ``[start, stop)`` of the chunks' concatenation into ``target``; where
    ``release_from`` (the chunks ``views`` view) is given, let go of each chunk copied to its
    end."""
    index = bisect.bisect_right(starts, start) - 1
    done = 0
    while start + done < stop:
        view, offset = views[index], start + done - starts[index]
        take = min(len(view) - offset, stop - start - done)
        target[done : done + take] = view[offset : offset + take]
        done += take
        if release_from is not None and offset + take == len(view):
            views[index] = release_from[index] = memoryview(b"")
        index += 1
