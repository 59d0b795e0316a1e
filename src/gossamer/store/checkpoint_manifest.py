"""The checkpoint manifest: what ``manifest.json`` holds, how it is written and how it is checked.

A manifest names the format and its version, the step, when and by which Gossamer it was written,
every tensor file of the checkpoint (name, tensor group, byte size, sha256, tensor names in order)
and the caller's JSON ``meta``. It ends with ``manifest_sha256``: the sha256 of the canonical JSON
(sorted keys, no spaces, ASCII) of every other field, so that any change to what the manifest says
is detected, wherever in the file it lands. Future format versions keep this self-hash scheme, so an
intact manifest of a newer version is told apart from a damaged one.

A manifest is at most :data:`MAX_MANIFEST_BYTES`: a reader refuses a bigger one before reading it,
and a writer refuses to write one (large state belongs in tensors, not in ``meta``).
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gossamer.core.errors import CheckpointCorruptedError, IncompatibleCheckpointError
from gossamer.core.hashing import sha256_bytes

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "SUPPORTED_FORMAT_VERSIONS",
    "FileEntry",
    "Manifest",
    "check_group_name",
    "decode_manifest",
    "encode_manifest",
    "encode_meta",
]

FORMAT_NAME = "gossamer-checkpoint"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = frozenset({1})
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 64 * 2**20
"""The largest manifest a reader accepts: a damaged or foreign file is refused before it is read
whole; a real manifest (file sizes, hashes, tensor names, meta) is far smaller."""
_SELF_HASH_KEY = "manifest_sha256"
_GROUP_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_TENSOR_FILE_SUFFIX = ".safetensors"


@dataclass(frozen=True, kw_only=True, slots=True)
class FileEntry:
    """One tensor file of a checkpoint, as the manifest lists it."""

    group: str
    """The tensor group the file holds (``model``, ``optimizer``, ...)."""
    num_bytes: int
    """The file's exact size."""
    sha256: str
    """Hex sha256 of the file's bytes."""
    tensor_names: tuple[str, ...]
    """The group's tensor names, in the order the caller gave them."""

    @property
    def name(self) -> str:
        """The file's name inside the checkpoint folder."""
        return self.group + _TENSOR_FILE_SUFFIX


@dataclass(frozen=True, kw_only=True, slots=True)
class Manifest:
    """The parsed contents of ``manifest.json``."""

    format_version: int
    """Version of the checkpoint format (see :data:`SUPPORTED_FORMAT_VERSIONS`)."""
    step: int
    """Training step the checkpoint holds."""
    created_unix_s: float
    """Wall-clock time the checkpoint was written, in seconds since the Unix epoch."""
    gossamer_version: str
    """Version of Gossamer that wrote it."""
    files: tuple[FileEntry, ...]
    """The tensor files, one per group."""
    meta: dict[str, Any]
    """The caller's JSON metadata."""


def check_group_name(group: object) -> str:
    """Return ``group`` if it can name a tensor file, else raise ``ValueError`` saying why."""
    if not isinstance(group, str) or not _GROUP_NAME_RE.match(group):
        raise ValueError(
            f"tensor group name {group!r} cannot name a file: use 1-128 characters from "
            "letters, digits, '_', '.' and '-', not starting with '.' or '-'"
        )
    return group


def encode_meta(meta: dict[str, Any]) -> str:
    """Canonical JSON of ``meta``; raises ``ValueError`` naming the problem if it is not JSON."""
    try:
        return _canonical(meta)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint meta must be JSON-serializable: {exc}") from exc


def encode_manifest(manifest: Manifest) -> bytes:
    """The bytes of ``manifest.json`` for ``manifest``, self-hash included."""
    created = datetime.datetime.fromtimestamp(manifest.created_unix_s, tz=datetime.UTC)
    body: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": manifest.format_version,
        "step": manifest.step,
        "created_unix_s": manifest.created_unix_s,
        "created_utc": created.isoformat(timespec="milliseconds"),
        "gossamer_version": manifest.gossamer_version,
        "files": [
            {
                "name": entry.name,
                "group": entry.group,
                "bytes": entry.num_bytes,
                "sha256": entry.sha256,
                "tensors": list(entry.tensor_names),
            }
            for entry in manifest.files
        ],
        # As a reader will see it: keys that are not strings (2, 10) come back as strings
        # ("10", "2"), which sort otherwise, and a self-hash of the meta as given never
        # matched what was read back (every such checkpoint refused as damaged).
        "meta": json.loads(encode_meta(manifest.meta)),
    }
    body[_SELF_HASH_KEY] = sha256_bytes(_canonical(body).encode("ascii"))
    data = (json.dumps(body, indent=1, ensure_ascii=True) + "\n").encode("ascii")
    if len(data) > MAX_MANIFEST_BYTES:
        # Written anyway, it would be a checkpoint that no reader accepts.
        raise ValueError(
            f"the checkpoint manifest would be {len(data)} bytes, more than the "
            f"{MAX_MANIFEST_BYTES} a reader accepts: put large state in tensors, not in meta"
        )
    return data


def decode_manifest(data: bytes, where: Path) -> Manifest:
    """Parse and check the bytes of a manifest read from ``where``.

    Raises:
        CheckpointCorruptedError: the bytes are not JSON, fail the self-hash, lack a field or hold
            a value out of range (nested too deeply to parse, a number too big for a float).
        IncompatibleCheckpointError: the manifest is of another format or an unknown version.
    """
    try:
        return _decode(data, where)
    except RecursionError as exc:
        # Python's JSON parser and encoder recurse once per nesting level.
        raise CheckpointCorruptedError(
            f"{where}: malformed manifest: JSON nested too deeply to parse"
        ) from exc


def _decode(data: bytes, where: Path) -> Manifest:
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointCorruptedError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise CheckpointCorruptedError(f"{where}: not a JSON object")
    stored_hash = body.pop(_SELF_HASH_KEY, None)
    intact = isinstance(stored_hash, str) and stored_hash == sha256_bytes(
        _canonical(body).encode("ascii")
    )
    version = body.get("format_version")
    known = type(version) is int and version in SUPPORTED_FORMAT_VERSIONS
    # The hash comes first: every format version keeps it, so only an intact manifest can say
    # it is of a newer version. A damaged one that seems to (a flipped digit, a damaged key)
    # is damaged: read as newer it would stop a resume from the good checkpoint before it.
    if not intact:
        unknown = "" if known else f" (it names format version {version!r}, itself damaged)"
        raise CheckpointCorruptedError(
            f"{where}: hash mismatch: the manifest's contents do not match its "
            f"{_SELF_HASH_KEY} (the file was altered or damaged){unknown}"
        )
    if not known:
        supported = ", ".join(str(v) for v in sorted(SUPPORTED_FORMAT_VERSIONS))
        raise IncompatibleCheckpointError(
            f"{where}: unknown format version {version!r} (this Gossamer reads version "
            f"{supported}; a newer Gossamer may read it)"
        )
    if body.get("format") != FORMAT_NAME:
        raise IncompatibleCheckpointError(
            f"{where}: format {body.get('format')!r} is not {FORMAT_NAME!r}"
        )
    try:
        return _parse_body(body)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise CheckpointCorruptedError(f"{where}: malformed manifest: {exc}") from exc


def _parse_body(body: dict[str, Any]) -> Manifest:
    files = []
    seen: set[str] = set()
    for raw in _typed(body, "files", list):
        if not isinstance(raw, dict):
            raise TypeError("each entry of 'files' must be an object")
        group = check_group_name(raw["group"])
        if group in seen:
            raise ValueError(f"group {group!r} is listed twice")
        seen.add(group)
        entry = FileEntry(
            group=group,
            num_bytes=_typed(raw, "bytes", int),
            sha256=_typed(raw, "sha256", str),
            tensor_names=tuple(_typed(raw, "tensors", list)),
        )
        if raw.get("name") != entry.name:
            raise ValueError(f"file {raw.get('name')!r} should be named {entry.name!r}")
        if entry.num_bytes < 0 or not _SHA256_RE.match(entry.sha256):
            raise ValueError(f"file {entry.name!r} has a bad size or sha256")
        if not all(isinstance(name, str) for name in entry.tensor_names):
            raise TypeError(f"file {entry.name!r}: tensor names must be strings")
        files.append(entry)
    step = _typed(body, "step", int)
    if step < 0:
        raise ValueError(f"step {step} is negative")
    created = body["created_unix_s"]
    if type(created) not in (int, float):
        raise TypeError("'created_unix_s' must be a number")
    return Manifest(
        format_version=_typed(body, "format_version", int),
        step=step,
        created_unix_s=float(created),
        gossamer_version=_typed(body, "gossamer_version", str),
        files=tuple(files),
        meta=_typed(body, "meta", dict),
    )


def _typed(body: dict[str, Any], key: str, kind: type[Any]) -> Any:
    value = body[key]
    # bool is an int to Python but never a valid count or step here.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{key!r} must be of type {kind.__name__}, got {type(value).__name__}")
    return value


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
