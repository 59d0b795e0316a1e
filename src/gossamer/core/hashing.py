"""Content hashes: of files, byte strings and named tensors, computed the same way everywhere."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["sha256_bytes", "sha256_file", "sha256_state"]

_CHUNK_BYTES = 1 << 20


def sha256_bytes(data: bytes | memoryview) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's contents, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_state(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 over named tensors: names in sorted order, each with dtype, shape and raw bytes.

    Two peers holding bit-identical weights get the same hash whatever the insertion order of
    their dicts or the memory layout of their tensors.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        header = f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode()
        digest.update(len(header).to_bytes(8, "little"))
        digest.update(header)
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
