"""What a checkpoint holds (:class:`CheckpointState`) and what a listing of a store says of
one (:class:`CheckpointInfo`): the data the checkpoint store takes and gives.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gossamer.store.checkpoint_manifest import check_group_name

__all__ = ["CheckpointInfo", "CheckpointState"]

_RESERVED_TENSOR_NAME = "__metadata__"  # safetensors keeps its own header metadata under it


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointState:
    """What a checkpoint holds.

    ``meta`` comes back from a load as JSON gives it: tuples as lists, dict keys as strings.
    """

    step: int
    """The training step; names the checkpoint's folder."""
    tensors: dict[str, dict[str, torch.Tensor]]
    """Named groups of named tensors; each group is one safetensors file (``model``, ...)."""
    meta: dict[str, Any]
    """JSON-serializable state: run config, data position, optimizer param groups, RNG states."""

    def __post_init__(self) -> None:
        if type(self.step) is not int or self.step < 0:
            raise ValueError(f"checkpoint step must be an int >= 0, got {self.step!r}")
        if not isinstance(self.meta, dict):
            raise ValueError(f"checkpoint meta must be a dict, got {type(self.meta).__name__}")
        for group, tensors in self.tensors.items():
            check_group_name(group)
            if not isinstance(tensors, Mapping):
                raise ValueError(f"tensor group {group!r} must be a dict of tensors")
            for name, tensor in tensors.items():
                if not isinstance(name, str) or name == _RESERVED_TENSOR_NAME:
                    raise ValueError(f"tensor group {group!r}: bad tensor name {name!r}")
                if not isinstance(tensor, torch.Tensor):
                    raise ValueError(
                        f"tensor group {group!r}: {name!r} is a {type(tensor).__name__}, "
                        "not a torch.Tensor (put plain values in meta)"
                    )


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointInfo:
    """One checkpoint folder as :meth:`CheckpointStore.list` sees it."""

    step: int
    """The step in the folder's name."""
    path: Path
    """The checkpoint's folder."""
    valid: bool
    """Whether every check passed (manifest, sizes, hashes, safetensors headers)."""
    reason: str | None
    """Why it is not valid; None when it is."""
    created_unix_s: float | None = None
    """When it was written (from the manifest; None if the manifest is unreadable)."""
    num_bytes: int | None = None
    """Total size of its tensor files (from the manifest; None if unreadable)."""
