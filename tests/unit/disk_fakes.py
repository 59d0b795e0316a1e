"""A disk that fills up, for the checkpoint store's and the training loop's tests (no root, no
tmpfs): the store's durable writes and ``os.statvfs`` see a disk of a set capacity."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from gossamer.store import durable_files


class FaultyFullDisk:
    """A disk of ``capacity_bytes`` holding ``root``: a durable write that would take the files
    under ``root`` past it fails with ENOSPC, as a full disk's does, and ``os.statvfs`` tells
    what is left of it.

    Args:
        root: the folder whose files count as the disk's contents.
        capacity_bytes: the disk's size (file sizes; blocks are not modelled).
        monkeypatch: swaps the store's durable write and ``os.statvfs`` for the test.
    """

    def __init__(self, root: Path, capacity_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.capacity_bytes = capacity_bytes
        self.num_refused = 0
        self._write = durable_files.write_file_durably
        monkeypatch.setattr(durable_files, "write_file_durably", self.write_file_durably)
        monkeypatch.setattr(os, "statvfs", self.statvfs)

    def used_bytes(self) -> int:
        """The sizes of the files under ``root`` together."""
        return sum(path.stat().st_size for path in self.root.rglob("*") if path.is_file())

    def free_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.used_bytes())

    def write_file_durably(self, path: Path, data: bytes | memoryview) -> None:
        if len(data) > self.free_bytes():
            self.num_refused += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self._write(path, data)

    def statvfs(self, path: object) -> SimpleNamespace:
        del path
        return SimpleNamespace(f_bavail=self.free_bytes(), f_frsize=1)


def folder_bytes(folder: Path) -> int:
    """The sizes of the files in a checkpoint folder together."""
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
