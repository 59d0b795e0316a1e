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
removes. Re-saving a step where the file system cannot exchange two folders atomically sets the old
folder aside as ``.old-step-000000123-<random>`` for a moment; a writer killed then leaves it, and
readers take it for step 123's checkpoint until the next save puts it back.

Loading trusts nothing: every file's size and sha256 are checked against the manifest, whose own
contents are checked against its self-hash, and nothing is ever unpickled. Only regular files are
read (a symlink, FIFO or device is refused), and a file's size is checked before it is read, so a
damaged or foreign folder costs no more memory than the checkpoint it claims to be.

A reader may race the one writer: the folder it is reading may be pruned, or replaced by a new save
of the same step. Each file is opened through a handle on the folder, right after the manifest, so
the reader gets the files of that manifest; if one is gone all the same, and the folder is no longer
the one the reader listed, the reader lists the directory again rather than report damage.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import logging
import os
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from gossamer._version import __version__
from gossamer.core.clock import Clock, SystemClock
from gossamer.core.errors import (
    CheckpointCorruptedError,
    CheckpointDiskFullError,
    CheckpointReadError,
    CheckpointWriteError,
    GossamerError,
    IncompatibleCheckpointError,
)
from gossamer.core.hashing import sha256_bytes
from gossamer.store import durable_files
from gossamer.store.checkpoint_manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    check_group_name,
    encode_manifest,
    encode_meta,
)
from gossamer.store.checkpoint_reader import CheckpointReader, check_hash, check_size, unreadable
from gossamer.store.optimizer_state import flatten_optimizer_state, unflatten_optimizer_state
from gossamer.store.rng_state import rng_state_capture, rng_state_restore

__all__ = [
    "CheckpointDiskFullError",
    "CheckpointInfo",
    "CheckpointReadError",
    "CheckpointState",
    "CheckpointStore",
    "CheckpointWriteError",
    "flatten_optimizer_state",
    "format_num_bytes",
    "rng_state_capture",
    "rng_state_restore",
    "unflatten_optimizer_state",
]

logger = logging.getLogger(__name__)

_STEP_DIR_RE = re.compile(r"^step-(\d+)$")
# A checkpoint folder the fallback of CheckpointStore._install set aside, as it names it.
_OLD_DIR_RE = re.compile(r"^\.old-step-(\d+)-[0-9a-f]{8}$")
_TMP_PREFIX = ".tmp-step-"
_OLD_PREFIX = ".old-step-"
_NUM_READ_PASSES = 5
"""How many times a reader lists the directory again after a writer changed a folder it read."""
_NUM_LISTING_TRIES = 3
"""How many times a listing is retried while the directory changes during it."""
_LOCK_NAME = ".lock"
_RESERVED_TENSOR_NAME = "__metadata__"  # safetensors keeps its own header metadata under it
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
"""What a write gets on a full disk, or past the user's quota."""


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

    def save(self, state: CheckpointState) -> Path:
        """Write ``state`` as a new checkpoint, atomically, then prune to ``keep_last``.

        Guarantees, for a writer that is killed or fails at any point:

        - a reader never sees a partly written checkpoint: the folder appears by one rename,
          complete and fsynced;
        - no existing valid checkpoint is lost. If a checkpoint of the same step exists, the new
          one is written beside it in full and then swapped in by one atomic exchange
          (``renameat2(RENAME_EXCHANGE)``); where the file system cannot exchange, the old folder
          is first renamed to a hidden ``.old-step-*`` name, and if the writer dies before the
          new one takes its place, readers take the hidden one for that step's checkpoint and
          the next save renames it back;
        - a checkpoint of an unknown format version (written by a newer Gossamer) is never
          deleted: a save of its step is refused, and pruning passes over it;
        - pruning runs only after the new checkpoint is in place and never deletes it;
        - on a full disk (or past the user's quota) every checkpoint but the newest valid one
          is removed (damaged ones too, newer or not: no resume takes them, and they held the
          room while valid older ones went), with a warning that says how many, and the save is
          tried once more: with room for ``keep_last`` checkpoints and not one more, every save
          failed before. The newest valid checkpoint is never removed for room, nor one of an
          unknown format version or one that cannot be read.

        Returns:
            The checkpoint's folder.

        Raises:
            ValueError: a tensor cannot be serialized, ``meta`` is not JSON, or the manifest would
                be larger than a reader accepts (nothing is left behind and no existing checkpoint
                is touched).
            IncompatibleCheckpointError: the folder of this step holds a checkpoint of an unknown
                format version (likewise).
            CheckpointDiskFullError: no room for the checkpoint even then (likewise); the message
                names the directory, the bytes needed and the bytes free.
            CheckpointWriteError: the disk failed otherwise (likewise). Both subclass ``OSError``.
        """
        encode_meta(state.meta)  # fail on bad meta before writing any tensor
        try:
            return self._save(state)
        except GossamerError:
            raise
        except OSError as exc:
            if exc.errno in _DISK_FULL_ERRNOS:
                raise self._disk_full_error(state, exc, num_removed=0) from exc
            error = CheckpointWriteError(
                f"could not write the checkpoint of step {state.step} to {self._directory}: {exc}"
            )
            error.errno = exc.errno
            raise error from exc

    def _save(self, state: CheckpointState) -> Path:
        if not self._directory.is_dir():
            self._directory.mkdir(parents=True, exist_ok=True)
            durable_files.fsync_dir(self._directory.parent)
        final = self.path_for(state.step)
        with durable_files.locked(self._directory / _LOCK_NAME):
            self._clean_after_crashed_writers()
            self._refuse_to_replace_unknown_format(final, state.step)
            try:
                self._write(state, final)
            except OSError as exc:
                if exc.errno not in _DISK_FULL_ERRNOS:
                    raise
                num_removed = self._prune(just_saved=None, keep_last=1, damaged_too=True)
                if not num_removed:
                    raise self._disk_full_error(state, exc, num_removed=0) from exc
                logger.warning(
                    "no space left in %s for the checkpoint of step %d: removed %d checkpoint(s), "
                    "all but the newest valid one (damaged ones included), and trying once more "
                    "(it needs room for keep_last + 1 = %d checkpoints)",
                    self._directory,
                    state.step,
                    num_removed,
                    self._keep_last + 1,
                )
                try:
                    self._write(state, final)
                except OSError as again:
                    if again.errno not in _DISK_FULL_ERRNOS:
                        raise
                    raise self._disk_full_error(state, again, num_removed=num_removed) from again
            self._verified[final] = _signature(final)
            logger.info("saved checkpoint %s (step %d)", final, state.step)
            self._prune(just_saved=final)
        return final

    def _write(self, state: CheckpointState, final: Path) -> None:
        """Write ``state`` into a temporary folder and put it at ``final``; on any failure the
        temporary folder is removed (a full disk's bytes given back) and what was at ``final``
        stays."""
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

    def _disk_full_error(
        self, state: CheckpointState, exc: OSError, *, num_removed: int
    ) -> CheckpointDiskFullError:
        needed = _num_bytes_of(state)
        free = self.free_bytes()
        free_text = (
            "an unknown amount" if free is None else f"{format_num_bytes(free)} ({free:,} bytes)"
        )
        newest_valid: Path | None = None
        with contextlib.suppress(OSError):  # (the message must not fail in its turn)
            newest_valid = next(
                (found.path for found in self._scan() if self._is_valid(found.path)[0]), None
            )
        left = (
            f"the newest valid checkpoint there, {newest_valid.name}, is kept (a resume goes "
            "on from it)"
            if newest_valid is not None
            else "no valid checkpoint is there"
        )
        error = CheckpointDiskFullError(
            f"no space left in {self._directory} for the checkpoint of step {state.step} "
            f"({exc.strerror or exc}): it needs about {format_num_bytes(needed)} "
            f"({needed:,} bytes) and {free_text} "
            f"{'is' if exc.errno == errno.ENOSPC else 'may be'} free"
            + (
                f", after {num_removed} other checkpoint(s) were removed (all but the newest "
                "valid one)"
                if num_removed
                else ""
            )
            + f"; {left}. Free some space, or give a directory on a larger disk (it needs room "
            f"for keep_last + 1 = {self._keep_last + 1} checkpoints)"
        )
        error.errno = exc.errno
        return error

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

    def _read_manifest(self, folder: Path) -> Manifest:
        with CheckpointReader(folder, step=_step_in_name(folder.name)) as reader:
            return reader.manifest

    def _refuse_to_replace_unknown_format(self, final: Path, step: int) -> None:
        """Raise if ``final`` holds a checkpoint of an unknown format, which a save would delete."""
        if not os.path.lexists(final):
            return
        try:
            self._read_manifest(final)
        except IncompatibleCheckpointError as exc:
            raise IncompatibleCheckpointError(
                f"will not save step {step}: "
                f"{final} holds a checkpoint of a format this Gossamer cannot read, most likely "
                f"written by a newer Gossamer, and saving would replace it ({exc}). Upgrade "
                f"Gossamer to go on from it, or move that folder out of {self._directory} to "
                "save this step here"
            ) from exc
        except (CheckpointCorruptedError, FileNotFoundError):
            return  # damaged or gone: the new checkpoint may take its place

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

    def check_writable(self) -> None:
        """Make the directory if needed and check that checkpoints can be written there (a file
        made and removed), so a run finds out before it trains, not at its first save.

        Raises:
            OSError: the directory cannot be made or written.
        """
        self._directory.mkdir(parents=True, exist_ok=True)
        probe = self._directory / f".write-probe-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()

    def free_bytes(self) -> int | None:
        """Bytes free to this user on the directory's file system (None if it cannot tell)."""
        existing = self._directory.absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent  # (not made yet: the disk it will be made on)
        try:
            st = os.statvfs(existing)
        except OSError:
            return None
        return int(st.f_bavail * st.f_frsize)

    def room_for_checkpoints(self, checkpoint_num_bytes: int) -> int | None:
        """How many checkpoints of ``checkpoint_num_bytes`` the directory's disk holds at once:
        its free space plus what the checkpoints there take (pruning gives that back). None
        where the file system does not tell its free space.

        A run needs room for ``keep_last + 1``: it writes the next checkpoint before it prunes.
        With less, a save on a full disk removes older checkpoints first (see :meth:`save`).

        Raises:
            CheckpointDiskFullError: not even one checkpoint can be written beside the newest,
                with every other one there removed (a save never removes the newest for room;
                a directory with none counts the run's first, so it needs room for two).
        """
        free = self.free_bytes()
        if free is None:
            return None
        # (a folder without a manifest is the user's, never pruned: its bytes are not freeable)
        usages = [
            _disk_usage(found.path)
            for found in self._scan()
            if (found.path / MANIFEST_NAME).exists()
        ]
        held = sum(usages)
        need = max(1, checkpoint_num_bytes)
        # A save never removes the newest checkpoint for room, so from the second save on
        # the disk holds it and the one being written: a run with none yet needs room for two
        # (with room for one, its first save passed and its second failed).
        newest = usages[0] if usages else need
        if free + held - newest < need:
            kept = " beside the newest checkpoint there" if usages else " beside its first one"
            error = CheckpointDiskFullError(
                f"{self._directory} has no room for one checkpoint of about "
                f"{format_num_bytes(need)}{kept}: {format_num_bytes(free)} is free"
                + (
                    f" and its older checkpoints take {format_num_bytes(held - newest)}"
                    if held - newest
                    else ""
                )
                + "; free some space, or give a directory on a larger disk (it needs room for "
                f"keep_last + 1 = {self._keep_last + 1} checkpoints)"
            )
            error.errno = errno.ENOSPC
            raise error
        return (free + held) // need

    def _clean_after_crashed_writers(self) -> None:
        """Remove temporary folders of dead writers; put back a replaced folder left hidden."""
        changed = False
        for entry in self._entries():
            path = Path(entry.path)
            old = _OLD_DIR_RE.match(entry.name)
            if old:
                final = self._directory / f"step-{old.group(1)}"
                if not os.path.lexists(final):
                    logger.warning("restoring %s, hidden by a writer that died", final.name)
                    durable_files.rename(path, final)
                else:
                    _remove_leftover(path)
                changed = True
            elif entry.name.startswith(_TMP_PREFIX):
                logger.info("removing %s, left by a writer that died", entry.name)
                _remove_leftover(path)
                changed = True
        if changed:
            durable_files.fsync_dir(self._directory)

    def _prune(
        self, *, just_saved: Path | None, keep_last: int | None = None, damaged_too: bool = False
    ) -> int:
        """Keep the newest ``keep_last`` (default: the store's) valid checkpoints, always
        ``just_saved`` (where None, the newest valid one is kept). Returns how many it removed.

        Damaged checkpoints are deleted once ``keep_last`` valid ones are kept above them, or
        wherever they are with ``damaged_too`` (a full disk); those of an unknown format version
        are never deleted.
        """
        num_to_keep = self._keep_last if keep_last is None else keep_last
        num_kept = 0 if just_saved is None else 1
        num_removed = 0
        for found in self._scan():
            step, folder = found.step, found.path
            if folder == just_saved:
                continue
            if not (folder / MANIFEST_NAME).exists():
                # Not a checkpoint, nor a torn one (a checkpoint's folder takes its name once
                # whole): something of the user's, never deleted.
                continue
            valid, keep = self._is_valid(folder)
            if keep:
                continue
            if valid and num_kept < num_to_keep:
                num_kept += 1
                continue
            if not valid and num_kept < num_to_keep and not damaged_too:
                continue
            logger.info("pruning checkpoint %s (step %d, valid=%s)", folder.name, step, valid)
            # Rename first (atomic), then delete: a writer killed while deleting leaves a
            # temporary folder the next save cleans up, never a half-deleted checkpoint.
            doomed = self._directory / f"{_TMP_PREFIX}{step:09d}-{secrets.token_hex(4)}"
            try:
                durable_files.rename(folder, doomed)
            except OSError as exc:
                logger.warning("could not prune checkpoint %s (%s); kept", folder.name, exc)
                continue
            _remove_leftover(doomed)
            self._verified.pop(folder, None)
            num_removed += 1
        return num_removed

    def _is_valid(self, folder: Path) -> tuple[bool, bool]:
        """(valid, kept whatever ``keep_last`` says: of an unknown format version, or unreadable
        now), trusting an earlier check of unchanged files."""
        signature = _signature(folder)
        if self._verified.get(folder) == signature:
            return True, False
        try:
            with CheckpointReader(folder, step=_step_in_name(folder.name)) as reader:
                reader.verify_files()
        except IncompatibleCheckpointError:
            return False, True
        except (CheckpointCorruptedError, FileNotFoundError):
            return False, False
        except OSError as exc:  # (an I/O error is no proof of damage: kept, like the unknown)
            logger.warning("could not read checkpoint %s to prune it (%s); kept", folder, exc)
            return False, True
        self._verified[folder] = signature
        return True, False


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


def _remove_leftover(path: Path) -> None:
    """Remove a folder no longer needed (replaced, pruned, a dead writer's); if that fails (a
    file made immutable, a busy file on NFS), warn: the next save retries, and the checkpoint
    just saved stays saved (such an error failed every save from then on)."""
    try:
        durable_files.remove_tree(path)
    except OSError as exc:
        logger.warning("could not remove %s (the next save retries): %s", path, exc)


def _signature(folder: Path) -> tuple[tuple[str, int, int, int], ...]:
    try:
        with os.scandir(folder) as entries:
            stats = [(entry.name, entry.stat(follow_symlinks=False)) for entry in entries]
    except FileNotFoundError:
        return ()
    return tuple(sorted((name, st.st_size, st.st_mtime_ns, st.st_ino) for name, st in stats))


def _num_bytes_of(state: CheckpointState) -> int:
    """About the bytes a checkpoint of ``state`` takes: its tensors' (the headers add a little)."""
    return sum(
        tensor.numel() * tensor.element_size()
        for tensors in state.tensors.values()
        for tensor in tensors.values()
    )


def _disk_usage(folder: Path) -> int:
    """Bytes the files of a checkpoint folder hold (their sizes: the blocks they take on disk
    are a little more)."""
    total = 0
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                total += entry.stat(follow_symlinks=False).st_size
    return total


def format_num_bytes(num_bytes: int) -> str:
    """``num_bytes`` in the largest binary unit it makes at least 1 of: ``344.1 KiB``."""
    value = float(num_bytes)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
