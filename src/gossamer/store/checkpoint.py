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

This module holds :class:`CheckpointStore`'s saving and pruning. Its loading and listing are
its base, :class:`~gossamer.store.checkpoint_loading.CheckpointLoading`; what a checkpoint
holds is :class:`~gossamer.store.checkpoint_state.CheckpointState`; the folders' names are in
:mod:`gossamer.store.checkpoint_folders`, and each tensor group's file is written by
:mod:`gossamer.store.tensor_group_files`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
from pathlib import Path

from gossamer._version import __version__
from gossamer.core.errors import (
    CheckpointCorruptedError,
    CheckpointDiskFullError,
    CheckpointWriteError,
    GossamerError,
    IncompatibleCheckpointError,
)
from gossamer.store import durable_files
from gossamer.store.checkpoint_folders import _OLD_DIR_RE, _OLD_PREFIX, _TMP_PREFIX, _step_in_name
from gossamer.store.checkpoint_loading import CheckpointLoading
from gossamer.store.checkpoint_manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    encode_manifest,
    encode_meta,
)
from gossamer.store.checkpoint_reader import CheckpointReader
from gossamer.store.checkpoint_state import CheckpointState
from gossamer.store.tensor_group_files import _write_group

__all__ = ["CheckpointStore", "format_num_bytes"]

logger = logging.getLogger(__name__)

_LOCK_NAME = ".lock"
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
"""What a write gets on a full disk, or past the user's quota."""


class CheckpointStore(CheckpointLoading):
    """A directory of checkpoints: atomic saves, verified loads, the last ``keep_last`` kept.

    One process saves into a directory at a time (saves take an exclusive lock on
    ``<directory>/.lock``); any number may load.

    Args:
        directory: where the ``step-*`` folders live; created by the first save.
        keep_last: how many valid checkpoints a save keeps (at least 1).
        clock: where the manifest's creation time comes from.
    """

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
