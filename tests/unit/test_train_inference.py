"""Loading a trained model for eval and sample: what a checkpoint's metadata claims is checked
against the model it builds, and a damaged checkpoint folder says what is wrong with it."""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from gossamer.core.config import ModelConfig, RunConfig
from gossamer.core.config_loader import config_to_dict
from gossamer.core.errors import (
    CheckpointCorruptedError,
    CheckpointReadError,
    GossamerError,
    IncompatibleCheckpointError,
)
from gossamer.models import GPT
from gossamer.store import CheckpointState, CheckpointStore, durable_files
from gossamer.store.checkpoint_manifest import MANIFEST_NAME
from gossamer.train.inference import load_model

_MODEL = ModelConfig(num_layers=1, num_heads=2, width=16, context=16)


def _signature(model: torch.nn.Module) -> dict[str, list[int]]:
    return {name: list(t.shape) for name, t in model.state_dict().items()}


def _trained_state(
    step: int = 4, *, model_config: ModelConfig = _MODEL, **meta_changes: Any
) -> CheckpointState:
    """A checkpoint as `gossamer train` writes it (the parts load_model reads)."""
    torch.manual_seed(0)
    model = GPT(model_config)
    meta: dict[str, Any] = {
        "config": config_to_dict(RunConfig(model=model_config)),
        "custom_model": False,
        "model_signature": _signature(model),
    }
    meta.update(meta_changes)
    tensors = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": {"m": torch.zeros(2)},
    }
    return CheckpointState(step=step, tensors=tensors, meta=meta)


def test_a_checkpoint_as_training_writes_it_loads(tmp_path: Path) -> None:
    folder = CheckpointStore(tmp_path).save(_trained_state())
    loaded = load_model(folder)
    assert loaded.step == 4
    assert loaded.config.model == _MODEL
    assert loaded.path == folder


def test_a_checkpoint_without_a_run_config_is_refused_as_incompatible(tmp_path: Path) -> None:
    # Written through the store's public API with the caller's own meta: a KeyError's traceback.
    CheckpointStore(tmp_path).save(
        CheckpointState(step=5, tensors={"model": {"w": torch.zeros(3)}}, meta={"note": "mine"})
    )
    with pytest.raises(IncompatibleCheckpointError, match=r"holds no run config \(meta 'config'\)"):
        load_model(tmp_path)


def test_a_checkpoint_without_model_weights_is_refused_as_incompatible(tmp_path: Path) -> None:
    state = _trained_state()
    state = dataclasses.replace(state, tensors={"optimizer": state.tensors["optimizer"]})
    folder = CheckpointStore(tmp_path).save(state)
    with pytest.raises(IncompatibleCheckpointError, match="holds no model weights"):
        load_model(folder)


def test_a_config_that_does_not_match_the_weights_is_refused_as_incompatible(
    tmp_path: Path,
) -> None:
    # Its config says width 48; its weights and signature are of width 16: a RuntimeError from
    # load_state_dict, with a traceback, before.
    state = _trained_state()
    config = state.meta["config"]
    config["model"]["width"] = 48
    folder = CheckpointStore(tmp_path).save(state)
    with pytest.raises(IncompatibleCheckpointError, match="holds weights of another shape"):
        load_model(folder)


def test_a_signature_made_to_match_the_config_is_refused_by_the_weights_themselves(
    tmp_path: Path,
) -> None:
    wide = dataclasses.replace(_MODEL, width=48)
    state = _trained_state()
    state.meta["config"]["model"]["width"] = 48
    state.meta["model_signature"] = _signature(GPT(wide))
    folder = CheckpointStore(tmp_path).save(state)
    with pytest.raises(
        IncompatibleCheckpointError, match="its metadata does not match its tensors"
    ):
        load_model(folder)


def test_a_checkpoint_without_a_model_signature_is_refused_as_incompatible(
    tmp_path: Path,
) -> None:
    state = _trained_state()
    del state.meta["model_signature"]
    folder = CheckpointStore(tmp_path).save(state)
    with pytest.raises(IncompatibleCheckpointError, match="records no model signature"):
        load_model(folder)


@pytest.mark.parametrize("damage", ["missing", "a folder"])
def test_a_step_folder_without_its_manifest_says_so(tmp_path: Path, damage: str) -> None:
    # Taken for a run's directory, it was said to hold "no valid checkpoint; train first".
    folder = CheckpointStore(tmp_path).save(_trained_state())
    (folder / MANIFEST_NAME).unlink()
    if damage == "a folder":
        (folder / MANIFEST_NAME).mkdir()
    expected = "missing" if damage == "missing" else "not a regular file"
    with pytest.raises(CheckpointCorruptedError, match=rf"manifest\.json: {expected}"):
        load_model(folder)


def test_a_folder_of_tensor_files_without_a_manifest_says_so(tmp_path: Path) -> None:
    folder = CheckpointStore(tmp_path / "run").save(_trained_state())
    renamed = folder.rename(tmp_path / "best")  # not named for a step
    (renamed / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointCorruptedError, match=r"manifest\.json: missing"):
        load_model(renamed)


def test_a_run_directory_with_a_stray_tensor_file_loads_its_newest_checkpoint(
    tmp_path: Path,
) -> None:
    # An exported weights file beside the step folders made the run's directory pass for one
    # damaged checkpoint folder ("manifest.json: missing").
    store = CheckpointStore(tmp_path)
    store.save(_trained_state(step=2))
    newest = store.save(_trained_state(step=4))
    (tmp_path / "exported.safetensors").write_bytes(b"not a checkpoint")
    loaded = load_model(tmp_path)
    assert loaded.step == 4
    assert loaded.path == newest


def test_a_run_directory_without_a_valid_checkpoint_is_still_told_to_train_first(
    tmp_path: Path,
) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(FileNotFoundError, match="holds no valid checkpoint; train first"):
        load_model(tmp_path)


def test_a_checkpoint_folder_with_a_file_it_cannot_read_is_a_read_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # eval and sample, run as a user who cannot read one file: a PermissionError's traceback.
    folder = CheckpointStore(tmp_path).save(_trained_state())
    real_open = durable_files.open_for_reading

    def open_for_reading(name: str, *, folder_fd: int) -> int:
        if name == "optimizer.safetensors":  # (root reads any file: the error is made here)
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)
        return real_open(name, folder_fd=folder_fd)

    monkeypatch.setattr(durable_files, "open_for_reading", open_for_reading)
    with pytest.raises(CheckpointReadError) as excinfo:
        load_model(folder)
    assert isinstance(excinfo.value, GossamerError)
    assert str(folder / "optimizer.safetensors") in str(excinfo.value)
    assert "Permission denied" in str(excinfo.value)
