"""One process at a time in a checkpoint directory."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from gossamer.core.errors import ConfigError
from gossamer.store import lease as lease_module
from gossamer.store.lease import IN_USE_NAME, directory_lease

_HOLD = """
import sys
from pathlib import Path
from gossamer.store import lease as lease_module
from gossamer.store.lease import IN_USE_NAME, directory_lease
with directory_lease(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


@contextmanager
def _held_by_another_process(directory: Path) -> Iterator[int]:
    with subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None
        assert child.stdin is not None
        try:
            assert child.stdout.readline() == "held\n"
            yield child.pid
        finally:
            child.stdin.close()
            child.wait(timeout=30)


def test_a_directory_another_process_holds_is_refused_naming_it(tmp_path: Path) -> None:
    with (
        _held_by_another_process(tmp_path / "ckpt") as pid,
        pytest.raises(
            ConfigError, match=rf"checkpoint.directory: .* in use by another .*pid {pid}"
        ),
        directory_lease(tmp_path / "ckpt"),
    ):
        pass
    with directory_lease(tmp_path / "ckpt"):  # its holder gone, free again
        pass


def test_holders_in_one_process_share_a_directory(tmp_path: Path) -> None:
    with directory_lease(tmp_path), directory_lease(tmp_path):
        pass
    with directory_lease(tmp_path), _held_by_another_process(tmp_path / "other"):
        pass


def test_a_trainer_refuses_a_directory_another_run_uses(tmp_path: Path) -> None:
    # Two peers started with the same config on one machine shared one checkpoint folder: each
    # saved its steps over the other's, and (a swarm's peer key lives there) one identity.
    from gossamer.core.config import (
        CheckpointConfig,
        DataConfig,
        ModelConfig,
        RunConfig,
        TrainConfig,
    )
    from gossamer.train import Trainer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x\n" * 400)
    config = RunConfig(
        model=ModelConfig(num_layers=1, num_heads=2, width=16, context=16),
        data=DataConfig(source="text", path=str(corpus)),
        train=TrainConfig(max_steps=2, batch_size=2, eval_batches=1),
        checkpoint=CheckpointConfig(directory=str(tmp_path / "ckpt")),
    )
    with (
        _held_by_another_process(tmp_path / "ckpt"),
        pytest.raises(ConfigError, match="in use by another Gossamer process"),
    ):
        Trainer(config)
    with Trainer(dataclasses.replace(config)) as trainer:
        trainer.run()


def test_a_lock_file_another_user_made_is_locked_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In a shared folder another user's .in-use (0644) cannot be opened for writing: the
    # PermissionError came out of the run as a traceback.
    (tmp_path / IN_USE_NAME).write_text("")
    real_open = os.open

    def open_as_another_user(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(lease_module.os, "open", open_as_another_user)
    with directory_lease(tmp_path):
        pass
    # A folder this user cannot write at all: said so (a FileNotFoundError of the read-only
    # open came out of a swarm peer before).
    with pytest.raises(ConfigError, match="cannot be written"), directory_lease(tmp_path / "x"):
        pass


def test_a_file_system_without_locks_is_used_unguarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # (some NFS and FUSE mounts: ENOLCK came out as a traceback where runs trained before)
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lease_module.fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING), directory_lease(tmp_path), directory_lease(tmp_path):
        pass
    assert "cannot be locked" in caplog.text
