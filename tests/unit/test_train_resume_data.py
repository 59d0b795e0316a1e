"""A resume whose training data changed size: it goes on, at a new epoch, and says so.

A text file appended to, or the standard library of a Python updated by a patch release, made a
checkpoint impossible to resume ("the data position was saved with num_tokens=44546, and this
run has num_tokens=44564"): the only way forward was a fresh folder, its weights thrown away.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import pytest
import torch

from gossamer.core.config import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from gossamer.core.errors import IncompatibleCheckpointError
from gossamer.core.hashing import sha256_state
from gossamer.train import Trainer

APPENDED = "# one more line\n"
TEXT = "def add(a, b):\n    return a + b\n\n" * 200 + "class Point:\n    x: int\n    y: int\n" * 100


def _config(corpus: Path, ckpt_dir: Path, *, seed: int = 3) -> RunConfig:
    return RunConfig(
        model=ModelConfig(num_layers=1, num_heads=2, width=32, context=32),
        data=DataConfig(source="text", path=str(corpus), validation_fraction=0.1),
        optim=OptimConfig(lr=1e-2, warmup_steps=2),
        train=TrainConfig(
            max_steps=12, batch_size=4, eval_every=0, eval_batches=1, seed=seed, log_every=100
        ),
        checkpoint=CheckpointConfig(directory=str(ckpt_dir), every_steps=0),
    )


def _training_tokens(num_bytes: int) -> int:
    """The training split of a file of ``num_bytes`` (its tail of 10% held out)."""
    return num_bytes - round(num_bytes * 0.1)


def _optimizer_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = trainer.run_state.optimizer.state_dict()["state"]
    return {f"{index}.{key}": value for index, s in state.items() for key, value in s.items()}


@pytest.fixture
def paused(tmp_path: Path) -> tuple[RunConfig, Path, str, dict[str, torch.Tensor]]:
    """A run paused at step 4 (its data position in epoch 0), and its corpus appended to
    since: the config, the corpus, and its weights' and optimizer's state at the pause."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    config = _config(corpus, tmp_path / "ckpt")
    with Trainer(config) as first:
        first.run(stop_at_step=4)
        assert first.run_state.stream.state_dict()["epoch"] == 0
        weights = sha256_state(first.model.state_dict())
        optimizer = copy.deepcopy(_optimizer_tensors(first))
    with corpus.open("a") as file:
        file.write(APPENDED)
    return config, corpus, weights, optimizer


def test_a_resume_on_data_of_another_size_goes_on_at_a_new_epoch(
    paused: tuple[RunConfig, Path, str, dict[str, torch.Tensor]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    config, _, weights, optimizer = paused
    with caplog.at_level(logging.WARNING), Trainer(config) as resumed:
        assert resumed.step == 4
        assert sha256_state(resumed.model.state_dict()) == weights
        restored = _optimizer_tensors(resumed)
        assert restored.keys() == optimizer.keys()
        assert all(torch.equal(restored[k], optimizer[k]) for k in optimizer)
        position = resumed.run_state.stream.state_dict()
        assert (position["epoch"], position["position"]) == (1, 0)
        assert position["num_tokens"] == len(resumed.corpus.train)
        assert resumed.run().steps_done == config.train.max_steps
    before, after = (_training_tokens(len(TEXT) + extra) for extra in (0, len(APPENDED)))
    assert f"held {before} tokens, and holds {after} now" in caplog.text
    assert "starts a new epoch (1)" in caplog.text
    assert "other data" not in caplog.text  # (the size says it: no second warning)


def test_a_resume_on_resized_data_is_the_same_every_time_and_exact_after(
    paused: tuple[RunConfig, Path, str, dict[str, torch.Tensor]],
) -> None:
    config, _, _, _ = paused
    directory = Path(config.checkpoint.directory)
    again = directory.with_name("again")
    shutil.copytree(directory, again)

    with Trainer(config) as straight:  # resumed on the new data, then 8 steps in one go
        straight.run()
        expected = sha256_state(straight.model.state_dict())

    paused_again = _config(Path(config.data.path or ""), again)
    with Trainer(paused_again) as first:  # the same resume, paused on the way
        first.run(stop_at_step=8)
    torch.manual_seed(12345)
    with Trainer(paused_again) as second:  # a resume of the same data: exact again
        assert second.step == 8
        assert second.run_state.stream.state_dict()["epoch"] == 1
        second.run()
        assert sha256_state(second.model.state_dict()) == expected


def test_another_seed_is_still_refused_when_the_data_changed_size(
    paused: tuple[RunConfig, Path, str, dict[str, torch.Tensor]],
) -> None:
    config, corpus, _, _ = paused
    reseeded = _config(corpus, Path(config.checkpoint.directory), seed=4)
    with pytest.raises(IncompatibleCheckpointError, match=r"other training data.*seed"):
        Trainer(reseeded)
