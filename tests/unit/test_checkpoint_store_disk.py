"""The checkpoint store on a disk that fills up or cannot be read: it makes room where it can,
and otherwise raises Gossamer's errors naming the folder, never a bare ``OSError``."""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path

import pytest
import torch
from disk_fakes import FaultyFullDisk, folder_bytes

from gossamer.core.errors import (
    CheckpointDiskFullError,
    CheckpointReadError,
    CheckpointWriteError,
    GossamerError,
)
from gossamer.store import CheckpointState, CheckpointStore, durable_files
from gossamer.store.checkpoint_manifest import MANIFEST_NAME

_NUM_VALUES = 16_384  # 64 KiB of float32 a checkpoint: the manifest is small beside it


def _state(step: int, *, num_values: int = _NUM_VALUES) -> CheckpointState:
    return CheckpointState(
        step=step,
        tensors={"model": {"w": torch.full((num_values,), float(step))}},
        meta={"step": step},
    )


def _steps(directory: Path) -> list[int]:
    return CheckpointStore(directory).steps()


def _leftovers(directory: Path) -> list[str]:
    return [path.name for path in directory.iterdir() if path.name.startswith((".tmp", ".old"))]


def _flip_last_byte(path: Path) -> None:
    """Damage a checkpoint's file: its sha256 no longer matches the manifest."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _checkpoint_bytes(tmp_path: Path) -> int:
    """The size of one checkpoint of :func:`_state`, measured on a scratch store."""
    return folder_bytes(CheckpointStore(tmp_path / "scratch").save(_state(1)))


def test_a_full_disk_with_room_for_keep_last_checkpoints_makes_room_and_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Room for keep_last checkpoints and not one more: every save (every resume's first one)
    # failed with a bare OSError, as pruning comes after the new checkpoint is written.
    size = _checkpoint_bytes(tmp_path)
    directory = tmp_path / "ck"
    disk = FaultyFullDisk(directory, 3 * size + size // 2, monkeypatch)
    store = CheckpointStore(directory, keep_last=3)
    for step in (1, 2, 3):
        store.save(_state(step))
    with caplog.at_level(logging.WARNING, logger="gossamer.store.checkpoint"):
        saved = store.save(_state(4))
    assert disk.num_refused == 1
    assert _steps(directory) == [3, 4]  # 1 and 2 removed; 3, the newest valid one, kept
    loaded = store.load(saved)
    assert loaded.step == 4
    assert not _leftovers(directory)
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(directory) in warning.getMessage()
    assert "removed 2 checkpoint(s), all but the newest valid one" in warning.getMessage()
    store.save(_state(5))  # and the next save fits beside it
    assert _steps(directory) == [3, 4, 5]


def test_a_full_disk_never_removes_the_newest_valid_checkpoint_and_says_what_it_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = _checkpoint_bytes(tmp_path)
    directory = tmp_path / "ck"
    disk = FaultyFullDisk(directory, 3 * size + size // 2, monkeypatch)
    store = CheckpointStore(directory, keep_last=3)
    for step in (1, 2, 3):
        store.save(_state(step))
    _flip_last_byte(store.path_for(3) / "model.safetensors")  # step 2 is the newest valid one now
    big = _state(4, num_values=3 * _NUM_VALUES)  # more than removing steps 1 and 3 makes room for
    with pytest.raises(CheckpointDiskFullError) as excinfo:
        store.save(big)
    assert disk.num_refused == 2  # tried once more after making room
    assert _steps(directory) == [2]  # 1 (older) and 3 (damaged) went; 2, the newest valid, stayed
    assert store.load(store.path_for(2)).step == 2
    assert not _leftovers(directory)
    message = str(excinfo.value)
    needed = 3 * _NUM_VALUES * 4
    assert str(directory) in message
    assert f"step 4 (No space left on device): it needs about 192.0 KiB ({needed:,} bytes)" in (
        message
    )
    assert f"({disk.free_bytes():,} bytes) is free" in message
    assert "after 2 other checkpoint(s) were removed (all but the newest valid one)" in message
    assert "the newest valid checkpoint there, step-000000002, is kept" in message
    # One of Gossamer's errors (the command line prints one line), and still an OSError.
    assert isinstance(excinfo.value, GossamerError)
    assert isinstance(excinfo.value, OSError)
    assert excinfo.value.errno == errno.ENOSPC


def test_a_full_disk_removes_a_damaged_checkpoint_newer_than_the_newest_valid_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The damaged newer checkpoint (no resume takes it) was kept while valid older ones went,
    # and with it holding the room the save failed.
    size = _checkpoint_bytes(tmp_path)
    directory = tmp_path / "ck"
    disk = FaultyFullDisk(directory, 2 * size + size // 2, monkeypatch)
    store = CheckpointStore(directory, keep_last=2)
    store.save(_state(1))
    store.save(_state(2))
    _flip_last_byte(store.path_for(2) / "model.safetensors")  # step 1 is the newest valid one now
    store.save(_state(3))
    assert disk.num_refused == 1
    assert _steps(directory) == [1, 3]
    assert store.load(store.path_for(3)).step == 3


def test_a_full_disk_with_nothing_to_remove_fails_at_once_keeping_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = _checkpoint_bytes(tmp_path)
    directory = tmp_path / "ck"
    disk = FaultyFullDisk(directory, size + size // 2, monkeypatch)
    store = CheckpointStore(directory, keep_last=3)
    store.save(_state(1))
    with pytest.raises(CheckpointDiskFullError, match=r"no space left in .* step 2"):
        store.save(_state(2))
    assert disk.num_refused == 1  # nothing could be removed: no second try
    assert _steps(directory) == [1]
    assert not _leftovers(directory)


def test_another_disk_failure_at_a_save_is_a_write_error_naming_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path, keep_last=3)
    store.save(_state(1))

    def failing(path: Path, data: bytes | memoryview) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))

    monkeypatch.setattr(durable_files, "write_file_durably", failing)
    with pytest.raises(CheckpointWriteError) as excinfo:
        store.save(_state(2))
    assert not isinstance(excinfo.value, CheckpointDiskFullError)
    assert f"checkpoint of step 2 to {tmp_path}" in str(excinfo.value)
    assert "Input/output error" in str(excinfo.value)
    assert _steps(tmp_path) == [1]


def test_room_for_checkpoints_counts_free_space_and_the_checkpoints_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = _checkpoint_bytes(tmp_path)
    directory = tmp_path / "ck"
    FaultyFullDisk(directory, 3 * size + size // 2, monkeypatch)
    store = CheckpointStore(directory, keep_last=3)
    assert store.room_for_checkpoints(size) == 3
    store.save(_state(1))
    store.save(_state(2))
    # (what the checkpoints there take comes back when they are pruned)
    assert store.room_for_checkpoints(size) == 3
    assert store.room_for_checkpoints(2 * size) == 1  # beside the newest, once 1 is removed


def test_room_for_checkpoints_refuses_a_disk_without_room_for_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = _checkpoint_bytes(tmp_path)
    directory = tmp_path / "ck"
    FaultyFullDisk(directory, 2 * size - 1000, monkeypatch)
    store = CheckpointStore(directory, keep_last=3)
    store.save(_state(1))
    with pytest.raises(CheckpointDiskFullError) as excinfo:
        store.room_for_checkpoints(size)  # the newest stays, and one more does not fit beside it
    message = str(excinfo.value)
    assert f"{directory} has no room for one checkpoint of about" in message
    assert "beside the newest checkpoint there" in message
    assert "keep_last + 1 = 4" in message
    room = store.room_for_checkpoints(size // 2)
    assert room is not None
    assert room >= 1


def test_room_for_checkpoints_does_not_count_a_folder_of_the_users_as_freeable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A step-N folder without a manifest is never pruned, so its bytes never come back; they
    # were counted as room, and the check passed a run whose saves then failed.
    size = _checkpoint_bytes(tmp_path)
    directory = tmp_path / "ck"
    FaultyFullDisk(directory, 3 * size + size // 2, monkeypatch)
    store = CheckpointStore(directory, keep_last=1)
    store.save(_state(1))
    users = directory / "step-000000000"
    users.mkdir()
    (users / "notes.bin").write_bytes(b"x" * (2 * size))
    with pytest.raises(CheckpointDiskFullError, match="no room for one checkpoint"):
        store.room_for_checkpoints(size)


def test_a_directory_without_checkpoints_needs_room_for_two(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With room for one, a new run's first save passed and its second failed: the newest is
    # never removed for room, so the second needs room beside the first.
    size = _checkpoint_bytes(tmp_path)
    directory = tmp_path / "ck"
    FaultyFullDisk(directory, 2 * size - 1000, monkeypatch)
    store = CheckpointStore(directory, keep_last=1)
    with pytest.raises(CheckpointDiskFullError) as excinfo:
        store.room_for_checkpoints(size)
    assert "beside its first one" in str(excinfo.value)
    store.save(_state(1))
    with pytest.raises(CheckpointDiskFullError):
        store.save(_state(2))  # (what the check foresaw)
    assert CheckpointStore(directory, keep_last=1).load_latest() is not None


def test_loading_a_file_that_cannot_be_read_is_a_read_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A PermissionError's traceback before (eval/sample given the folder, run as another user).
    store = CheckpointStore(tmp_path)
    folder = store.save(
        CheckpointState(
            step=4,
            tensors={"model": {"w": torch.zeros(3)}, "optimizer": {"m": torch.zeros(2)}},
            meta={},
        )
    )
    real_open = durable_files.open_for_reading

    def open_for_reading(name: str, *, folder_fd: int) -> int:
        if name == "optimizer.safetensors":  # (root reads any file: the error is made here)
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)
        return real_open(name, folder_fd=folder_fd)

    monkeypatch.setattr(durable_files, "open_for_reading", open_for_reading)
    with pytest.raises(CheckpointReadError) as excinfo:
        store.load(folder)
    assert str(excinfo.value) == (
        f"{folder / 'optimizer.safetensors'}: cannot be read: Permission denied "
        "(check its owner and permissions)"
    )
    assert isinstance(excinfo.value, GossamerError)
    # The directory's newest valid checkpoint is looked for past it, and it is kept.
    with pytest.raises(GossamerError, match=r"optimizer\.safetensors: cannot be read"):
        store.load_latest()
    assert (folder / MANIFEST_NAME).exists()


def test_loading_a_folder_that_cannot_be_read_is_a_read_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path)
    folder = store.save(_state(1, num_values=3))

    def open_folder(path: Path) -> int:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(durable_files, "open_folder", open_folder)
    with pytest.raises(
        CheckpointReadError, match=rf"^{re.escape(str(folder))}: cannot be read: Permission denied"
    ):
        store.load(folder)
