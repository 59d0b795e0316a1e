"""Checkpoints: verified, atomically written folders of safetensors files plus a JSON manifest.

A checkpoint of step 123 is the folder ``step-000000123/`` in the store's directory::

    step-000000123/
        model.safetensors        one file per tensor group, in safetensors format
        optimizer.safetensors
        rng.safetensors
        manifest.json            format version, step, time, meta, and size + sha256 of every file

Writing is atomic: everything goes into a hidden sibling folder (``.tmp-step-000000123-<random>``),
each file is fsynced, the manifest last, then the folder; one rename makes it visible and the
parent directory is fsynced. So a reader sees a checkpoint whole or not at all, and a writer killed
at any moment leaves at worst a hidden temporary folder, which loading ignores and the next save
removes. Loading trusts nothing: every file's size and sha256 are checked against the manifest,
whose own contents are checked against its self-hash, and nothing is ever unpickled.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from gossamer._version import __version__
from gossamer.core.clock import Clock, SystemClock
from gossamer.core.errors import CheckpointCorruptedError, IncompatibleCheckpointError
from gossamer.core.hashing import sha256_bytes, sha256_file
from gossamer.store import durable_files
from gossamer.store.checkpoint_manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    check_group_name,
    decode_manifest,
    encode_manifest,
    encode_meta,
)
from gossamer.store.optimizer_state import flatten_optimizer_state, unflatten_optimizer_state
from gossamer.store.rng_state import rng_state_capture, rng_state_restore

__all__ = [
    "CheckpointInfo",
    "CheckpointState",
    "CheckpointStore",
    "flatten_optimizer_state",
    "rng_state_capture",
    "rng_state_restore",
    "unflatten_optimizer_state",
]

logger = logging.getLogger(__name__)

_STEP_DIR_RE = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-step-"
_OLD_PREFIX = ".old-step-"
_LOCK_NAME = ".lock"
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


class CheckpointStore:
    """A directory of checkpoints: atomic saves, verified loads, the last ``keep_last`` kept.

    One process saves into a directory at a time (saves take an exclusive lock on
    ``<directory>/.lock``); any number may load.

    Args:
        directory: where the ``step-*`` folders live; created by the first save.
        keep_last: how many valid checkpoints a save keeps (at least 1).
        clock: where the manifest's creation time comes from.
    """

    def __init__(
        self, directory: Path | str, *, keep_last: int = 3, clock: Clock | None = None
    ) -> None:
        if type(keep_last) is not int or keep_last < 1:
            raise ValueError(
                f"keep_last must be an int >= 1, got {keep_last!r}: a store always keeps at "
                "least the newest valid checkpoint"
            )
        self._directory = Path(directory)
        self._keep_last = keep_last
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._skipped: list[tuple[Path, str]] = []
        # Folders this store has verified, with the (name, size, mtime, inode) of their files
        # then; pruning trusts a verification while those are unchanged.
        self._verified: dict[Path, tuple[tuple[str, int, int, int], ...]] = {}

    @property
    def directory(self) -> Path:
        """The directory holding the checkpoints."""
        return self._directory

    @property
    def keep_last(self) -> int:
        """How many valid checkpoints a save keeps."""
        return self._keep_last

    @property
    def skipped(self) -> list[tuple[Path, str]]:
        """The checkpoints the last :meth:`load_latest` passed over, newest first, with why."""
        return list(self._skipped)

    def path_for(self, step: int) -> Path:
        """The folder a checkpoint of ``step`` is saved to."""
        return self._directory / f"step-{step:09d}"

    def save(self, state: CheckpointState) -> Path:
        """Write ``state`` as a new checkpoint, atomically, then prune to ``keep_last``.

        Guarantees, for a writer that is killed or fails at any point:

        - a reader never sees a partly written checkpoint: the folder appears by one rename,
          complete and fsynced;
        - no existing valid checkpoint is lost. If a checkpoint of the same step exists, the new
          one is written beside it in full and then swapped in by one atomic exchange
          (``renameat2(RENAME_EXCHANGE)``); where the file system cannot exchange, the old folder
          is first renamed to a hidden ``.old-step-*`` name, and if the writer dies before the
          new one takes its place, the next save renames the old one back;
        - pruning runs only after the new checkpoint is in place, never deletes it, and never
          deletes a checkpoint of an unknown format version.

        Returns:
            The checkpoint's folder.

        Raises:
            ValueError: a tensor cannot be serialized or ``meta`` is not JSON (nothing is left
                behind and no existing checkpoint is touched).
            OSError: the disk failed (likewise).
        """
        encode_meta(state.meta)  # fail on bad meta before writing any tensor
        if not self._directory.is_dir():
            self._directory.mkdir(parents=True, exist_ok=True)
            durable_files.fsync_dir(self._directory.parent)
        final = self.path_for(state.step)
        with durable_files.locked(self._directory / _LOCK_NAME):
            self._clean_after_crashed_writers()
            tmp = self._directory / f"{_TMP_PREFIX}{state.step:09d}-{secrets.token_hex(4)}"
            tmp.mkdir()
            try:
                entries = [
                    _write_group(tmp, group, tensors) for group, tensors in state.tensors.items()
                ]
                manifest = Manifest(
                    format_version=FORMAT_VERSION,
                    step=state.step,
                    created_unix_s=self._clock.wall(),
                    gossamer_version=__version__,
                    files=tuple(entries),
                    meta=state.meta,
                )
                durable_files.write_file_durably(tmp / MANIFEST_NAME, encode_manifest(manifest))
                durable_files.fsync_dir(tmp)
                self._install(tmp, final)
            except BaseException:
                with contextlib.suppress(OSError):
                    durable_files.remove_tree(tmp)
                raise
            self._verified[final] = _signature(final)
            logger.info("saved checkpoint %s (step %d)", final, state.step)
            self._prune(just_saved=final)
        return final

    def load(self, path: Path | str) -> CheckpointState:
        """Load the checkpoint in folder ``path`` (or its ``manifest.json``), checking everything.

        Each file is read once; its size and sha256 are checked on the bytes read, and the tensors
        are parsed from those same bytes.

        Raises:
            FileNotFoundError: there is no folder at ``path``.
            CheckpointCorruptedError: a file is missing, truncated, fails its hash or does not
                parse; the message names the file and what is wrong.
            IncompatibleCheckpointError: the manifest is of an unknown format version.
        """
        folder, manifest = self._read_manifest(Path(path))
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for entry in manifest.files:
            file_path = folder / entry.name
            try:
                data = file_path.read_bytes()
            except FileNotFoundError:
                raise _missing(file_path, entry) from None
            _check_size(file_path, len(data), entry)
            _check_hash(file_path, sha256_bytes(data), entry)
            try:
                loaded = safetensors.torch.load(data)
            except Exception as exc:  # safetensors raises its own error type from Rust
                raise CheckpointCorruptedError(
                    f"{file_path}: not a readable safetensors file ({exc})"
                ) from exc
            del data
            if loaded.keys() != set(entry.tensor_names):
                raise CheckpointCorruptedError(
                    f"{file_path}: holds tensors {sorted(loaded)[:5]}..., the manifest lists "
                    f"{sorted(entry.tensor_names)[:5]}..."
                )
            groups[entry.group] = {name: loaded[name] for name in entry.tensor_names}
        return CheckpointState(step=manifest.step, tensors=groups, meta=manifest.meta)

    def load_latest(self) -> CheckpointState | None:
        """Load the newest valid checkpoint, passing over damaged ones.

        Each checkpoint passed over is logged with ``logging.warning`` and listed in
        :attr:`skipped`, with the reason.

        Returns:
            The newest valid checkpoint, or None if the directory holds no checkpoint at all.

        Raises:
            CheckpointCorruptedError: checkpoints exist but none is valid (starting over silently
                would throw the run away; the message lists each one and what is wrong).
            IncompatibleCheckpointError: likewise, and every one is of an unknown format version.
        """
        self._skipped = []
        incompatible = 0
        for _, folder in self._scan():
            try:
                state = self.load(folder)
            except FileNotFoundError:
                continue  # pruned by a concurrent writer since the scan
            except (CheckpointCorruptedError, IncompatibleCheckpointError) as exc:
                incompatible += isinstance(exc, IncompatibleCheckpointError)
                logger.warning("skipping checkpoint %s: %s", folder.name, exc)
                self._skipped.append((folder, str(exc)))
                continue
            if self._skipped:
                logger.warning(
                    "resuming from checkpoint %s (step %d), the newest valid one; skipped %d",
                    folder.name,
                    state.step,
                    len(self._skipped),
                )
            return state
        if not self._skipped:
            return None
        listing = "\n".join(f"  {path.name}: {reason}" for path, reason in self._skipped)
        error = (
            IncompatibleCheckpointError
            if incompatible == len(self._skipped)
            else CheckpointCorruptedError
        )
        raise error(f"no valid checkpoint in {self._directory}:\n{listing}")

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint folder, oldest first, each fully verified (reads every file)."""
        infos = []
        for step, folder in reversed(self._scan()):
            created: float | None = None
            num_bytes: int | None = None
            try:
                _, manifest = self._read_manifest(folder)
                created = manifest.created_unix_s
                num_bytes = sum(entry.num_bytes for entry in manifest.files)
                _verify_files(folder, manifest)
            except (CheckpointCorruptedError, IncompatibleCheckpointError) as exc:
                infos.append(
                    CheckpointInfo(
                        step=step,
                        path=folder,
                        valid=False,
                        reason=str(exc),
                        created_unix_s=created,
                        num_bytes=num_bytes,
                    )
                )
                continue
            except FileNotFoundError:
                continue
            infos.append(
                CheckpointInfo(
                    step=step,
                    path=folder,
                    valid=True,
                    reason=None,
                    created_unix_s=created,
                    num_bytes=num_bytes,
                )
            )
        return infos

    def _scan(self) -> builtins.list[tuple[int, Path]]:
        """The ``step-*`` folders, newest step first."""
        found = []
        for entry in self._entries():
            match = _STEP_DIR_RE.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), Path(entry.path)))
        found.sort(key=lambda item: (item[0], item[1].name), reverse=True)
        return found

    def _entries(self) -> Iterator[os.DirEntry[str]]:
        try:
            with os.scandir(self._directory) as entries:
                yield from list(entries)
        except FileNotFoundError:
            return

    def _read_manifest(self, path: Path) -> tuple[Path, Manifest]:
        folder = path.parent if path.name == MANIFEST_NAME and path.is_file() else path
        manifest_path = folder / MANIFEST_NAME
        try:
            raw = manifest_path.read_bytes()
        except FileNotFoundError:
            if not folder.is_dir():
                raise FileNotFoundError(f"no checkpoint folder at {folder}") from None
            raise CheckpointCorruptedError(
                f"{manifest_path}: missing (a checkpoint folder without a manifest is incomplete)"
            ) from None
        manifest = decode_manifest(raw, manifest_path)
        match = _STEP_DIR_RE.match(folder.name)
        if match and int(match.group(1)) != manifest.step:
            raise CheckpointCorruptedError(
                f"{manifest_path}: says step {manifest.step}, but the folder is {folder.name}"
            )
        return folder, manifest

    def _install(self, tmp: Path, final: Path) -> None:
        """Put the complete folder ``tmp`` at ``final``, replacing what is there atomically."""
        if not os.path.lexists(final):
            durable_files.rename(tmp, final)
            durable_files.fsync_dir(self._directory)
            return
        if durable_files.exchange_dirs(tmp, final):
            durable_files.fsync_dir(self._directory)
            _remove_leftover(tmp)  # now holds the replaced checkpoint
            return
        old = self._directory / f"{_OLD_PREFIX}{final.name.removeprefix('step-')}-{tmp.name[-8:]}"
        durable_files.rename(final, old)
        try:
            durable_files.rename(tmp, final)
        except BaseException:
            durable_files.rename(old, final)
            raise
        durable_files.fsync_dir(self._directory)
        _remove_leftover(old)

    def _clean_after_crashed_writers(self) -> None:
        """Remove temporary folders of dead writers; put back a replaced folder left hidden."""
        changed = False
        for entry in self._entries():
            path = Path(entry.path)
            if entry.name.startswith(_OLD_PREFIX):
                final = self._directory / f"step-{entry.name.removeprefix(_OLD_PREFIX)[:-9]}"
                if not os.path.lexists(final):
                    logger.warning("restoring %s, hidden by a writer that died", final.name)
                    durable_files.rename(path, final)
                else:
                    durable_files.remove_tree(path)
                changed = True
            elif entry.name.startswith(_TMP_PREFIX):
                logger.info("removing %s, left by a writer that died", entry.name)
                durable_files.remove_tree(path)
                changed = True
        if changed:
            durable_files.fsync_dir(self._directory)

    def _prune(self, *, just_saved: Path) -> None:
        """Keep the newest ``keep_last`` valid checkpoints (always ``just_saved``).

        Damaged checkpoints are deleted once ``keep_last`` valid ones are kept above them;
        those of an unknown format version are never deleted.
        """
        num_kept = 1  # just_saved
        for step, folder in self._scan():
            if folder == just_saved:
                continue
            valid, incompatible = self._is_valid(folder)
            if incompatible:
                continue
            if valid and num_kept < self._keep_last:
                num_kept += 1
                continue
            if not valid and num_kept < self._keep_last:
                continue
            logger.info("pruning checkpoint %s (step %d, valid=%s)", folder.name, step, valid)
            # Rename first (atomic), then delete: a writer killed while deleting leaves a
            # temporary folder the next save cleans up, never a half-deleted checkpoint.
            doomed = self._directory / f"{_TMP_PREFIX}{step:09d}-{secrets.token_hex(4)}"
            durable_files.rename(folder, doomed)
            durable_files.remove_tree(doomed)
            self._verified.pop(folder, None)

    def _is_valid(self, folder: Path) -> tuple[bool, bool]:
        """(valid, of an unknown format version), trusting an earlier check of unchanged files."""
        signature = _signature(folder)
        if self._verified.get(folder) == signature:
            return True, False
        try:
            _, manifest = self._read_manifest(folder)
            _verify_files(folder, manifest)
        except IncompatibleCheckpointError:
            return False, True
        except (CheckpointCorruptedError, FileNotFoundError):
            return False, False
        self._verified[folder] = signature
        return True, False


def _write_group(folder: Path, group: str, tensors: Mapping[str, torch.Tensor]) -> FileEntry:
    prepared = _prepare_tensors(group, tensors)
    try:
        data = safetensors.torch.save(prepared)
    except (ValueError, RuntimeError, TypeError) as exc:
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


def _verify_files(folder: Path, manifest: Manifest) -> None:
    """Check every file's size, hash and safetensors header, streaming (for listing, pruning)."""
    for entry in manifest.files:
        file_path = folder / entry.name
        try:
            size = file_path.stat().st_size
        except FileNotFoundError:
            raise _missing(file_path, entry) from None
        _check_size(file_path, size, entry)
        _check_hash(file_path, sha256_file(file_path), entry)
        _check_safetensors_header(file_path, entry)


def _check_size(file_path: Path, size: int, entry: FileEntry) -> None:
    if size < entry.num_bytes:
        raise CheckpointCorruptedError(
            f"{file_path}: truncated: {size} bytes, the manifest says {entry.num_bytes}"
        )
    if size > entry.num_bytes:
        raise CheckpointCorruptedError(
            f"{file_path}: size mismatch: {size} bytes, longer than the {entry.num_bytes} "
            "the manifest says"
        )


def _check_hash(file_path: Path, actual: str, entry: FileEntry) -> None:
    if actual != entry.sha256:
        raise CheckpointCorruptedError(
            f"{file_path}: hash mismatch: sha256 {actual[:16]}..., "
            f"the manifest says {entry.sha256[:16]}..."
        )


def _check_safetensors_header(file_path: Path, entry: FileEntry) -> None:
    with file_path.open("rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        header_ok = 0 <= header_len <= entry.num_bytes - 8
        header = f.read(header_len) if header_ok else b""
    try:
        names = set(json.loads(header)) - {_RESERVED_TENSOR_NAME} if header_ok else None
    except (TypeError, ValueError):
        names = None
    if names != set(entry.tensor_names):
        raise CheckpointCorruptedError(
            f"{file_path}: not a readable safetensors file, or not the tensors the manifest lists"
        )


def _remove_leftover(path: Path) -> None:
    """Remove a folder the new checkpoint replaced; if that fails, the next save retries."""
    try:
        durable_files.remove_tree(path)
    except OSError as exc:
        logger.warning("could not remove %s (the next save retries): %s", path, exc)


def _missing(file_path: Path, entry: FileEntry) -> CheckpointCorruptedError:
    return CheckpointCorruptedError(
        f"{file_path}: missing (the manifest lists it, {entry.num_bytes} bytes)"
    )


def _signature(folder: Path) -> tuple[tuple[str, int, int, int], ...]:
    try:
        with os.scandir(folder) as entries:
            stats = [(entry.name, entry.stat(follow_symlinks=False)) for entry in entries]
    except FileNotFoundError:
        return ()
    return tuple(sorted((name, st.st_size, st.st_mtime_ns, st.st_ino) for name, st in stats))
