"""Loading and listing a directory of checkpoints: the reading layer of
:class:`~gossamer.store.checkpoint.CheckpointStore`.

:class:`CheckpointLoading` holds the store's directory and settings, loads one checkpoint or
the newest valid one, and lists and verifies them all; every file is checked against the
manifest (see :mod:`gossamer.store.checkpoint_reader`). A reader that races the one writer
lists the directory again rather than report damage. Saving and pruning are the store's, in
:mod:`gossamer.store.checkpoint`.
"""

from __future__ import annotations

import builtins
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import safetensors.torch
import torch

from gossamer.core.clock import Clock, SystemClock
from gossamer.core.errors import (
    CheckpointCorruptedError,
    CheckpointReadError,
    IncompatibleCheckpointError,
)
from gossamer.core.hashing import sha256_bytes
from gossamer.store.checkpoint_folders import (
    _OLD_DIR_RE,
    _STEP_DIR_RE,
    _changed_since_scan,
    _folder_of,
    _FoundFolder,
    _step_in_name,
)
from gossamer.store.checkpoint_reader import CheckpointReader, check_hash, check_size, unreadable
from gossamer.store.checkpoint_state import CheckpointInfo, CheckpointState

__all__ = ["CheckpointLoading"]

logger = logging.getLogger(__name__)

_NUM_READ_PASSES = 5
"""How many times a reader lists the directory again after a writer changed a folder it read."""
_NUM_LISTING_TRIES = 3
"""How many times a listing is retried while the directory changes during it."""


class CheckpointLoading:
    """A directory of checkpoints, loaded and listed: the base of
    :class:`~gossamer.store.checkpoint.CheckpointStore`, which adds saving and pruning (its
    docstring says what the arguments are)."""

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
        self.loaded_from: Path | None = None
        """The folder the last :meth:`load_latest` loaded (None before, or if it found none)."""
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

    def load(self, path: Path | str) -> CheckpointState:
        """Load the checkpoint in folder ``path`` (or its ``manifest.json``), checking everything.

        Every file must be a regular file (not a symlink, FIFO or device) of the size the manifest
        says before it is read; it is then read once, its sha256 checked on the bytes read, and
        the tensors parsed from those same bytes.

        Raises:
            FileNotFoundError: there is no folder at ``path``.
            CheckpointCorruptedError: a file is missing, not a regular file, of the wrong size,
                fails its hash or does not parse; the message names the file and what is wrong.
            IncompatibleCheckpointError: the manifest is of an unknown format version.
            CheckpointReadError: the folder or a file of it cannot be read (no permission, an I/O
                error); the message names it. (An ``OSError`` too.)
        """
        groups: dict[str, dict[str, torch.Tensor]] = {}
        folder = _folder_of(Path(path))
        with CheckpointReader(folder, step=_step_in_name(folder.name)) as reader:
            for entry, file_path, file in reader.open_files():
                try:
                    data = file.read(entry.num_bytes)
                except OSError as exc:  # (EIO)
                    raise unreadable(file_path, exc) from exc
                check_size(file_path, len(data), entry)  # shorter if it shrank once opened
                check_hash(file_path, sha256_bytes(data), entry)
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
            manifest = reader.manifest
        return CheckpointState(step=manifest.step, tensors=groups, meta=manifest.meta)

    def load_latest(self) -> CheckpointState | None:
        """Load the newest valid checkpoint, passing over damaged ones.

        Each checkpoint passed over is logged with ``logging.warning`` and listed in
        :attr:`skipped`, with the reason. A checkpoint that a concurrent writer prunes or replaces
        while it is read is not damaged: the directory is listed again and read anew (a few
        times at most; then it is passed over like a damaged one).

        Returns:
            The newest valid checkpoint, or None if the directory holds no checkpoint at all.

        Raises:
            IncompatibleCheckpointError: a checkpoint newer than the newest valid one is of an
                unknown format version (a newer Gossamer wrote it): resuming from the older one
                would silently lose its progress. Also when every checkpoint is of an unknown
                format version.
            CheckpointCorruptedError: checkpoints exist but none is valid (starting over silently
                would throw the run away; the message lists each one and what is wrong).
        """
        for pass_number in range(1, _NUM_READ_PASSES + 1):
            self._skipped = []
            self.loaded_from = None
            newer_unknown: builtins.list[Path] = []
            changed = False
            for found in self._scan():
                try:
                    state = self.load(found.path)
                except IncompatibleCheckpointError as exc:
                    newer_unknown.append(found.path)
                    self._skip(found.path, str(exc))
                    continue
                except (CheckpointCorruptedError, FileNotFoundError) as exc:
                    if _changed_since_scan(found):
                        if pass_number < _NUM_READ_PASSES:
                            changed = True
                            break
                        self._skip(found.path, f"{exc} (it changed while it was read)")
                        continue
                    self._skip(found.path, str(exc))
                    continue
                except CheckpointReadError as exc:  # (EACCES, EIO: passed over like a damaged one)
                    self._skip(found.path, str(exc))
                    continue
                except OSError as exc:  # (ESTALE, ...: likewise)
                    self._skip(found.path, f"could not be read: {exc}")
                    continue
                if newer_unknown:
                    raise _newer_unknown_format_error(newer_unknown, resumable=found.path)
                if self._skipped:
                    logger.warning(
                        "using checkpoint %s (step %d), the newest valid one; skipped %d",
                        found.path.name,
                        state.step,
                        len(self._skipped),
                    )
                self.loaded_from = found.path
                return state
            if not changed:
                break
            logger.info(
                "a checkpoint in %s changed while it was read (a writer saved or pruned); "
                "reading the directory again",
                self._directory,
            )
        if not self._skipped:
            return None
        listing = "\n".join(f"  {path.name}: {reason}" for path, reason in self._skipped)
        error = (
            IncompatibleCheckpointError
            if len(newer_unknown) == len(self._skipped)
            else CheckpointCorruptedError
        )
        raise error(f"no valid checkpoint in {self._directory}:\n{listing}")

    def list(self) -> builtins.list[CheckpointInfo]:
        """Every checkpoint folder, oldest first, each fully verified (reads every file).

        A folder a concurrent writer prunes or replaces while it is verified is not reported as
        damaged: the directory is listed again (a few times at most) and the listing is of what
        is there then.
        """
        verified: dict[tuple[Path, int], CheckpointInfo] = {}
        infos: builtins.list[CheckpointInfo] = []
        for pass_number in range(1, _NUM_READ_PASSES + 1):
            infos = []
            changed = False
            for found in reversed(self._scan()):
                info = verified.get((found.path, found.inode))
                if info is None:
                    info = self._inspect(found)
                if info is None:  # pruned or replaced by a writer while it was read
                    changed = True
                    if pass_number < _NUM_READ_PASSES:
                        break
                    continue
                verified[(found.path, found.inode)] = info
                infos.append(info)
            if not changed:
                break
        return infos

    def steps(self) -> builtins.list[int]:
        """The steps of the checkpoint folders in the directory, oldest first.

        From the folders' names alone: nothing is read or verified, so a damaged checkpoint
        counts too.
        """
        return sorted({found.step for found in self._scan()})

    def _skip(self, folder: Path, reason: str) -> None:
        logger.warning("skipping checkpoint %s: %s", folder.name, reason)
        self._skipped.append((folder, reason))

    def _inspect(self, found: _FoundFolder) -> CheckpointInfo | None:
        """Verify one folder for :meth:`list`; None if it changed since the scan that found it."""
        created: float | None = None
        num_bytes: int | None = None
        try:
            with CheckpointReader(found.path, step=found.step) as reader:
                created = reader.manifest.created_unix_s
                num_bytes = sum(entry.num_bytes for entry in reader.manifest.files)
                reader.verify_files()
        except (CheckpointCorruptedError, IncompatibleCheckpointError, OSError) as exc:
            # (a folder it cannot read, EACCES or EIO, is listed as such, not the end of listing)
            if not isinstance(exc, IncompatibleCheckpointError) and _changed_since_scan(found):
                return None
            return CheckpointInfo(
                step=found.step,
                path=found.path,
                valid=False,
                reason=str(exc),
                created_unix_s=created,
                num_bytes=num_bytes,
            )
        return CheckpointInfo(
            step=found.step,
            path=found.path,
            valid=True,
            reason=None,
            created_unix_s=created,
            num_bytes=num_bytes,
        )

    def _scan(self) -> builtins.list[_FoundFolder]:
        """The checkpoint folders, newest step first, each with its inode as listed.

        A folder ``.old-step-N-<8 hex>`` that the fallback of :meth:`_install` set aside is step
        N's checkpoint while ``step-N`` is absent: its writer died before the new folder took its
        place (the next save renames it back). Without it, a reader would find no checkpoint of
        that step and a run would start over.
        """
        entries = self._listing()
        names = {entry.name for entry in entries}
        found = []
        for entry in entries:
            match = _STEP_DIR_RE.match(entry.name)
            if match is None:
                match = _OLD_DIR_RE.match(entry.name)
                if match is None or f"step-{match.group(1)}" in names:
                    continue
            if entry.is_dir():
                found.append(_FoundFolder(int(match.group(1)), Path(entry.path), entry.inode()))
        found.sort(key=lambda item: (item.step, item.path.name), reverse=True)
        return found

    def _listing(self) -> builtins.list[os.DirEntry[str]]:
        """The directory's entries, listed again while it changes during the listing.

        A listing that races a rename may miss both the new name and the old one (``readdir``
        promises nothing for entries renamed during it), so a reader could find no checkpoint
        while one was being replaced by a newer one. The directory's times tell whether an
        entry changed; they tick coarsely, so this narrows the race rather than closing it.
        """
        entries: builtins.list[os.DirEntry[str]] = []
        for _ in range(_NUM_LISTING_TRIES):
            before = self._directory_stamp()
            entries = list(self._entries())
            if self._directory_stamp() == before:
                break
        return entries

    def _directory_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._directory)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_ctime_ns

    def _entries(self) -> Iterator[os.DirEntry[str]]:
        try:
            with os.scandir(self._directory) as entries:
                yield from list(entries)
        except FileNotFoundError:
            return


def _newer_unknown_format_error(
    folders: Sequence[Path], *, resumable: Path
) -> IncompatibleCheckpointError:
    names = " and ".join(str(folder) for folder in folders)
    return IncompatibleCheckpointError(
        f"{names}: of an unknown format version (a newer Gossamer wrote it) and newer than "
        f"{resumable.name}, the newest checkpoint this Gossamer can read; resuming from "
        f"{resumable.name} would lose its progress. Upgrade Gossamer to resume from it, or move "
        f"it out of {resumable.parent} to resume from {resumable.name}"
    )
