"""One tensor group of a checkpoint written as a safetensors file: its tensors made CPU, dense,
contiguous and unshared, serialized, hashed and written durably.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch

from gossamer.core.hashing import sha256_bytes
from gossamer.store import durable_files
from gossamer.store.checkpoint_manifest import FileEntry


def _write_group(folder: Path, group: str, tensors: Mapping[str, torch.Tensor]) -> FileEntry:
    prepared = _prepare_tensors(group, tensors)
    try:
        data = safetensors.torch.save(prepared)
    except (ValueError, RuntimeError, TypeError, KeyError) as exc:  # KeyError: unknown dtype
        raise ValueError(f"tensor group {group!r} cannot be saved: {exc}") from exc
    entry = FileEntry(
        group=group,
        num_bytes=len(data),
        sha256=sha256_bytes(data),
        tensor_names=tuple(tensors),
    )
    durable_files.write_file_durably(folder / entry.name, data)
    return entry


def _prepare_tensors(group: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, dense, contiguous tensors, none sharing memory with another (safetensors needs it)."""
    prepared: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in tensors.items():
        if tensor.is_quantized:
            raise ValueError(
                f"tensor group {group!r}: {name!r} is quantized ({tensor.dtype}), which "
                "safetensors cannot hold; save its .int_repr() and put the scale and zero point "
                "in meta, or save .dequantize()"
            )
        if tensor.layout != torch.strided:
            raise ValueError(
                f"tensor group {group!r}: {name!r} has layout {tensor.layout}; "
                "save it dense (.to_dense())"
            )
        out = tensor.detach()
        if out.device.type != "cpu":
            out = out.to("cpu")
        out = out.contiguous()
        storage = out.untyped_storage().data_ptr()
        if storage in seen_storages:
            out = out.clone()  # tied weights share storage; safetensors refuses shared tensors
        elif storage:
            seen_storages.add(storage)
        prepared[name] = out
    return prepared
