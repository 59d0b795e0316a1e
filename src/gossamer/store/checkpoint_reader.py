"""Reading one checkpoint folder safely: its manifest checked, then its files on demand.

Every file is opened through one handle on the folder, only regular files are opened (a symlink,
FIFO or device is refused), and a file's size is checked against the manifest before any of it is
read, so a damaged or foreign folder costs no more memory than the checkpoint it claims to be.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import io
import json
import os
import stat
from pathlib import Path
from types import TracebackType
from typing import Self

from gossamer.core.errors import CheckpointCorruptedError, CheckpointReadError
from gossamer.store import durable_files
from gossamer.store.checkpoint_manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    FileEntry,
    Manifest,
    decode_manifest,
)

__all__ = ["CheckpointReader", "check_hash", "check_size", "missing_file", "unreadable"]

_RESERVED_TENSOR_NAME = "__metadata__"  # safetensors keeps its own header metadata under it


class CheckpointReader:
    """One checkpoint folder opened for reading: its manifest read and checked, files on demand.

    Every file is opened through one handle on the folder, so the files are those of the manifest
    read even if a writer renames or replaces the folder meanwhile; a file a writer deletes
    before it is opened is missing all the same (the caller can tell by the folder's inode).
    Only regular files are opened, and a file's size is checked before any of it is read.

    Args:
        folder: the checkpoint's folder.
        step: the step its name says (None: not named for one); the manifest must agree.

    Raises (on creation):
        FileNotFoundError: there is no folder at ``folder``.
        CheckpointCorruptedError: the manifest is missing, not a regular file, too big or
            malformed, or names another step than the folder.
        IncompatibleCheckpointError: the manifest is of an unknown format version.
        CheckpointReadError: the folder or its manifest cannot be read (no permission, an I/O
            error); also from :meth:`open_files` for a tensor file.
    """

    def __init__(self, folder: Path, *, step: int | None = None) -> None:
        self.folder = folder
        self._step = step
        self._files = contextlib.ExitStack()
        try:
            self._folder_fd = durable_files.open_folder(folder)
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(f"no checkpoint folder at {folder}") from None
        except OSError as exc:
            raise unreadable(folder, exc) from exc
        self._files.callback(os.close, self._folder_fd)
        try:
            self.manifest = self._read_manifest()
        except BaseException:
            self._files.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._files.close()

    def open_files(self) -> builtins.list[tuple[FileEntry, Path, io.BufferedReader]]:
        """Open every tensor file the manifest lists, all before any is read, sizes checked.

        Raises:
            CheckpointCorruptedError: a file is missing, not a regular file or of the wrong size.
            CheckpointReadError: a file cannot be opened (no permission, an I/O error).
        """
        opened = []
        for entry in self.manifest.files:
            file_path = self.folder / entry.name
            try:
                file, size = self._open(file_path)
            except FileNotFoundError:
                raise missing_file(file_path, entry) from None
            self._files.enter_context(file)
            check_size(file_path, size, entry)
            opened.append((entry, file_path, file))
        return opened

    def verify_files(self) -> None:
        """Check every file's size, hash and safetensors header, streaming (list, pruning)."""
        for entry, file_path, file in self.open_files():
            check_hash(file_path, hashlib.file_digest(file, "sha256").hexdigest(), entry)
            file.seek(0)
            check_safetensors_header(file_path, file, entry)

    def _read_manifest(self) -> Manifest:
        manifest_path = self.folder / MANIFEST_NAME
        try:
            file, size = self._open(manifest_path)
        except FileNotFoundError:
            raise CheckpointCorruptedError(
                f"{manifest_path}: missing (a checkpoint folder without a manifest is incomplete)"
            ) from None
        with file:
            if size > MAX_MANIFEST_BYTES:
                raise CheckpointCorruptedError(
                    f"{manifest_path}: {size} bytes, more than the {MAX_MANIFEST_BYTES >> 20} MiB "
                    "a manifest may have (not a manifest this Gossamer wrote)"
                )
            try:
                raw = file.read(size)
            except OSError as exc:  # (EIO)
                raise unreadable(manifest_path, exc) from exc
        manifest = decode_manifest(raw, manifest_path)
        step = self._step
        if step is not None and step != manifest.step:
            raise CheckpointCorruptedError(
                f"{manifest_path}: says step {manifest.step}, but the folder is {self.folder.name}"
            )
        return manifest

    def _open(self, file_path: Path) -> tuple[io.BufferedReader, int]:
        """Open a regular file of the folder; (file, size). Raises FileNotFoundError if absent."""
        try:
            fd = durable_files.open_for_reading(file_path.name, folder_fd=self._folder_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # what O_NOFOLLOW gives for a symlink
                raise CheckpointCorruptedError(
                    f"{file_path}: a symbolic link; a checkpoint holds only regular files"
                ) from None
            if isinstance(exc, FileNotFoundError):
                raise
            raise unreadable(file_path, exc) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointCorruptedError(
                    f"{file_path}: not a regular file (mode {stat.filemode(st.st_mode)}); a "
                    "checkpoint holds only regular files"
                )
            file = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        return file, st.st_size


def check_size(file_path: Path, size: int, entry: FileEntry) -> None:
    if size < entry.num_bytes:
        raise CheckpointCorruptedError(
            f"{file_path}: truncated: {size} bytes, the manifest says {entry.num_bytes}"
        )
    if size > entry.num_bytes:
        raise CheckpointCorruptedError(
            f"{file_path}: size mismatch: {size} bytes, longer than the {entry.num_bytes} "
            "the manifest says"
        )


def check_hash(file_path: Path, actual: str, entry: FileEntry) -> None:
    if actual != entry.sha256:
        raise CheckpointCorruptedError(
            f"{file_path}: hash mismatch: sha256 {actual[:16]}..., "
            f"the manifest says {entry.sha256[:16]}..."
        )


def check_safetensors_header(file_path: Path, file: io.BufferedReader, entry: FileEntry) -> None:
    prefix = file.read(8)
    header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    header_ok = 0 <= header_len <= entry.num_bytes - 8
    header = file.read(header_len) if header_ok else b""
    try:
        names = set(json.loads(header)) - {_RESERVED_TENSOR_NAME} if header_ok else None
    except (TypeError, ValueError, RecursionError):
        names = None
    if names != set(entry.tensor_names):
        raise CheckpointCorruptedError(
            f"{file_path}: not a readable safetensors file, or not the tensors the manifest lists"
        )


def missing_file(file_path: Path, entry: FileEntry) -> CheckpointCorruptedError:
    return CheckpointCorruptedError(
        f"{file_path}: missing (the manifest lists it, {entry.num_bytes} bytes)"
    )


def unreadable(path: Path, exc: OSError) -> CheckpointReadError:
    """The error for a checkpoint folder or file that exists but cannot be read."""
    hint = " (check its owner and permissions)" if isinstance(exc, PermissionError) else ""
    error = CheckpointReadError(f"{path}: cannot be read: {exc.strerror or exc}{hint}")
    error.errno = exc.errno
    return error
