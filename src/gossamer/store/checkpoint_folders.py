"""The names of the folders in a checkpoint store's directory, and a checkpoint folder as a
listing of the directory found it.

``step-000000123`` is step 123's checkpoint; ``.tmp-step-000000123-<8 hex>`` a folder being
written (or pruned); ``.old-step-000000123-<8 hex>`` a checkpoint set aside while a new one of
its step takes its place (see :mod:`gossamer.store.checkpoint`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from gossamer.store.checkpoint_manifest import MANIFEST_NAME

_STEP_DIR_RE = re.compile(r"^step-(\d+)$")
# A checkpoint folder the fallback of CheckpointStore._install set aside, as it names it.
_OLD_DIR_RE = re.compile(r"^\.old-step-(\d+)-[0-9a-f]{8}$")
_TMP_PREFIX = ".tmp-step-"
_OLD_PREFIX = ".old-step-"


@dataclass(frozen=True, slots=True)
class _FoundFolder:
    """A checkpoint folder as a listing of the directory found it."""

    step: int
    path: Path
    inode: int
    """Its inode then: a writer that prunes or replaces the folder changes what is at ``path``."""


def _changed_since_scan(found: _FoundFolder) -> bool:
    """Whether the folder at ``found.path`` is gone or is another folder than the listing saw."""
    try:
        return os.lstat(found.path).st_ino != found.inode
    except FileNotFoundError:
        return True


def _folder_of(path: Path) -> Path:
    return path.parent if path.name == MANIFEST_NAME and path.is_file() else path


def _step_in_name(name: str) -> int | None:
    match = _STEP_DIR_RE.match(name) or _OLD_DIR_RE.match(name)
    return int(match.group(1)) if match else None
