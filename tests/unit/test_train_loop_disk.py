"""The training loop on a disk that fills up: warned of at the start, refused there if not one
checkpoint fits, room made at a save where it can be, and otherwise one clear error."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
from disk_fakes import FaultyFullDisk, folder_bytes
from typer.testing import CliRunner

from gossamer.cli.main import app
from gossamer.core.config import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from gossamer.core.errors import CheckpointDiskFullError, ConfigError
from gossamer.store import CheckpointStore, durable_files
from gossamer.train import Trainer

TEXT = "def add(a, b):\n    return a + b\n\n" * 200 + "class Point:\n    x: int\n    y: int\n" * 100


def _config(tmp_path: Path, folder: str, *, max_steps: int) -> RunConfig:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(TEXT)
    return RunConfig(
        model=ModelConfig(num_layers=1, num_heads=2, width=32, context=32),
        data=DataConfig(source="text", path=str(corpus), validation_fraction=0.1),
        optim=OptimConfig(lr=1e-2, warmup_steps=2),
        train=TrainConfig(max_steps=max_steps, batch_size=4, eval_every=0, eval_batches=1),
        checkpoint=CheckpointConfig(directory=str(tmp_path / folder), every_steps=4, keep_last=3),
    )


def _used_bytes(directory: Path) -> int:
    return sum(folder_bytes(folder) for folder in directory.glob("step-*"))


def test_keep_last_checkpoints_on_a_full_disk_resume_and_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Room for exactly keep_last checkpoints: every resume died at its first save, with an
    # OSError's traceback, as the new checkpoint is written before the oldest is pruned.
    config = _config(tmp_path, "ck", max_steps=12)
    with Trainer(config) as trainer:
        trainer.run()
    directory = tmp_path / "ck"
    assert CheckpointStore(directory).steps() == [4, 8, 12]
    one = folder_bytes(directory / "step-000000012")
    FaultyFullDisk(directory, _used_bytes(directory) + one // 2, monkeypatch)
    with Trainer(_config(tmp_path, "ck", max_steps=16)) as trainer:
        result = trainer.run()
    assert result.steps_done == 16
    assert CheckpointStore(directory).steps() == [12, 16]  # room made: all but the newest
    latest = CheckpointStore(directory).load_latest()
    assert latest is not None
    assert latest.step == 16


def test_a_full_disk_at_a_save_ends_the_run_with_a_checkpoint_error_keeping_the_last_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path, "ck", max_steps=4)
    with Trainer(config) as trainer:
        trainer.run()
    directory = tmp_path / "ck"
    one = folder_bytes(directory / "step-000000004")
    disk = FaultyFullDisk(directory, 10 * one, monkeypatch)
    with Trainer(_config(tmp_path, "ck", max_steps=12)) as trainer:
        disk.capacity_bytes = one + one // 2  # filled by something else once the run started
        with pytest.raises(CheckpointDiskFullError) as excinfo:
            trainer.run()
    message = str(excinfo.value)
    assert f"no space left in {directory} for the checkpoint of step 8" in message
    assert "bytes) is free" in message
    assert "the newest valid checkpoint there, step-000000004, is kept" in message
    monkeypatch.undo()  # space freed: the same run resumes from step 4 (the directory let go)
    with Trainer(_config(tmp_path, "ck", max_steps=12)) as trainer:
        assert trainer.step == 4
        assert trainer.run().steps_done == 12


def _checkpoint_estimate(tmp_path: Path) -> int:
    """What the start's check takes one checkpoint for: the model's tensors and AdamW's two
    moments of each trained parameter."""
    with Trainer(_config(tmp_path, "scratch", max_steps=4)) as trainer:
        model = sum(t.numel() * t.element_size() for t in trainer.model.state_dict().values())
        moments = 2 * sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    return model + moments


def test_a_disk_with_room_for_fewer_than_keep_last_plus_one_checkpoints_is_warned_of(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    estimate = _checkpoint_estimate(tmp_path)
    directory = tmp_path / "ck"
    FaultyFullDisk(directory, estimate * 5 // 2, monkeypatch)
    with (
        caplog.at_level(logging.WARNING, logger="gossamer.train.loop"),
        Trainer(_config(tmp_path, "ck", max_steps=4)),
    ):
        pass
    [warning] = [r.getMessage() for r in caplog.records if "has room for" in r.getMessage()]
    assert f"checkpoint.directory {directory} has room for 2 checkpoint(s)" in warning
    assert "checkpoint.keep_last + 1 = 4" in warning
    assert warning.startswith("peer ")


def test_a_disk_without_room_for_one_checkpoint_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found at the first save, it cost every step before it (300 steps in the reviewer's run).
    estimate = _checkpoint_estimate(tmp_path)
    directory = tmp_path / "ck"
    FaultyFullDisk(directory, estimate // 2, monkeypatch)
    with pytest.raises(ConfigError) as excinfo:
        Trainer(_config(tmp_path, "ck", max_steps=4))
    message = str(excinfo.value)
    assert message.startswith(f"checkpoint.directory: {directory} has no room for one checkpoint")
    assert "free" in message
    monkeypatch.undo()
    with Trainer(_config(tmp_path, "ck", max_steps=4)):  # (the directory was let go)
        pass


def test_a_finished_run_resumed_on_a_full_disk_is_not_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It trains no step and writes no checkpoint: re-running a finished command was refused.
    with Trainer(_config(tmp_path, "ck", max_steps=2)) as trainer:
        trainer.run()
    FaultyFullDisk(tmp_path / "ck", 0, monkeypatch)
    with Trainer(_config(tmp_path, "ck", max_steps=2)) as trainer:
        assert trainer.run_state.step == 2


def test_the_command_line_reports_a_full_disk_in_one_line_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)

    def full(path: Path, data: bytes | memoryview) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(durable_files, "write_file_durably", full)
    args = [
        "train",
        "--model.num-layers",
        "1",
        "--model.num-heads",
        "2",
        "--model.width",
        "16",
        "--model.context",
        "16",
        "--data.source",
        "text",
        "--data.path",
        str(corpus),
        "--train.max-steps",
        "2",
        "--train.batch-size",
        "2",
        "--train.eval-batches",
        "1",
        "--checkpoint.directory",
        str(tmp_path / "ck"),
    ]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith(
        f"error: CheckpointDiskFullError: no space left in {tmp_path / 'ck'} for the "
        "checkpoint of step 2"
    )
