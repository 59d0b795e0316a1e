"""Using a trained model: load it from a checkpoint, sample text from it, evaluate it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gossamer.core.config import RunConfig
from gossamer.core.config_loader import config_from_dict
from gossamer.core.errors import IncompatibleCheckpointError
from gossamer.data import decode, encode
from gossamer.models import GPT
from gossamer.store import CheckpointState, CheckpointStore
from gossamer.train.checkpointing import check_model_signature

__all__ = ["LoadedModel", "load_model", "mean_validation_loss", "sample_text"]

_MANIFEST = "manifest.json"
_STEP_FOLDER_RE = re.compile(r"^step-\d+$")
_FIX = "pass a checkpoint folder a training run wrote, unaltered"


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadedModel:
    """A built-in model restored from a checkpoint, with the config it was trained with."""

    model: GPT
    """The model, in eval mode."""
    config: RunConfig
    """The run config stored in the checkpoint."""
    step: int
    """The step at which the checkpoint was written."""
    path: Path
    """The checkpoint folder (or checkpoint directory) it came from."""
    data_sha256: str | None = None
    """The sha256 of the tokens it trained on, where the checkpoint records it."""


def load_model(path: Path | str) -> LoadedModel:
    """Load the built-in GPT from a checkpoint folder, or the newest valid one in a directory.

    Args:
        path: a checkpoint folder (holding ``manifest.json``) or a run's checkpoint directory.

    Raises:
        FileNotFoundError: nothing is at ``path``, or the directory holds no valid checkpoint.
        CheckpointCorruptedError: the checkpoint folder fails verification (its manifest missing
            too: a folder named ``step-N``, or holding ``*.safetensors`` files and no step
            folders, is one checkpoint).
        CheckpointReadError: a file of the checkpoint folder cannot be read.
        IncompatibleCheckpointError: the checkpoint holds a custom model, not the built-in GPT,
            or no run config, or weights that do not fit the model its config describes.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; pass a checkpoint folder or directory")
    if _is_checkpoint_folder(path):
        state = CheckpointStore(path.parent).load(path)
    else:
        store = CheckpointStore(path)
        latest = store.load_latest()
        if latest is None or store.loaded_from is None:
            raise FileNotFoundError(
                f"{path} holds no valid checkpoint; train first, or pass another folder"
            )
        state, path = latest, store.loaded_from  # (the folder it is: a run's directory holds many)
    if state.meta.get("custom_model", False):
        raise IncompatibleCheckpointError(
            f"the checkpoint at {path} holds a custom model; load it with your own model class"
        )
    model, config = _built_model(state, path)
    model.eval()
    digest = state.meta.get("data_sha256")
    return LoadedModel(
        model=model,
        config=config,
        step=state.step,
        path=path,
        data_sha256=digest if isinstance(digest, str) else None,
    )


def _is_checkpoint_folder(path: Path) -> bool:
    """Whether ``path`` is one checkpoint's folder rather than a run's directory of them: it
    holds a manifest, or is named for a step, or holds tensor files and no step folders. Taken
    for a directory, one whose manifest is missing was said to hold "no valid checkpoint; train
    first"; taken for a folder, a run's directory with a stray ``.safetensors`` file in it (an
    export) was said to be a damaged checkpoint."""
    if (path / _MANIFEST).is_file() or _STEP_FOLDER_RE.match(path.name):
        return True
    if not path.is_dir():
        return False
    if (path / _MANIFEST).exists():
        return True
    if any(_STEP_FOLDER_RE.match(child.name) for child in path.iterdir() if child.is_dir()):
        return False
    return any(path.glob("*.safetensors"))


def _built_model(state: CheckpointState, path: Path) -> tuple[GPT, RunConfig]:
    """The GPT the checkpoint's run config describes, its weights loaded, after checking the
    checkpoint holds a run config and weights of that model's names and shapes.

    Raises:
        IncompatibleCheckpointError: it does not (a checkpoint written through the store's API
            with other meta, or one whose meta was altered and its hash made anew).
    """
    saved_config = state.meta.get("config")
    weights = state.tensors.get("model")
    missing = [
        what
        for what, absent in (
            ("no run config (meta 'config')", not isinstance(saved_config, dict)),
            ("no model weights (a 'model' tensor group)", weights is None),
        )
        if absent
    ]
    if not isinstance(saved_config, dict) or weights is None:
        raise IncompatibleCheckpointError(
            f"the checkpoint at {path} holds {' and '.join(missing)}: not a checkpoint "
            f"`gossamer train` wrote; {_FIX}"
        )
    config = config_from_dict(RunConfig, saved_config, origin=f"checkpoint {path}")
    model = GPT(config.model)
    check_model_signature(state.meta, model, where=str(path), fix=_FIX)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    held = {name: tuple(t.shape) for name, t in weights.items()}
    if held != expected:
        differ = sorted(
            name for name in expected.keys() | held.keys() if held.get(name) != expected.get(name)
        )
        raise IncompatibleCheckpointError(
            f"the checkpoint at {path} holds weights that do not fit the model its config "
            f"describes ({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''} differ): "
            f"its metadata does not match its tensors; {_FIX}"
        )
    model.load_state_dict(weights)
    return model, config


def sample_text(
    model: GPT,
    prompt: str,
    *,
    num_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
) -> str:
    """Continue ``prompt`` with ``num_tokens`` byte tokens and return the continuation only.

    Raises:
        ValueError: ``num_tokens`` is negative, ``temperature`` is negative, or the model's
            tokens are not bytes (its vocabulary is not 256).
    """
    if model.config.vocab_size != 256:
        raise ValueError(
            f"sample_text needs a byte-level model (vocab_size 256), this one has "
            f"{model.config.vocab_size}: it was trained on token ids"
        )
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if not temperature >= 0:  # (0: greedy, the likeliest token every time)
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    tokens = encode(prompt) or [ord("\n")]
    prompt_tensor = torch.tensor([tokens], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    out = model.generate(
        prompt_tensor,
        num_tokens,
        temperature=temperature,
        top_k=top_k,
        generator=generator,
    )
    return decode(out[0, len(tokens) :].tolist())


@torch.no_grad()
def mean_validation_loss(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> float:
    """Mean cross-entropy of ``model`` over ``batches`` of (inputs, targets), in eval mode."""
    was_training = model.training
    model.eval()
    try:
        losses = []
        for inputs, targets in batches:
            logits = model(inputs)
            losses.append(
                F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1)).item()
            )
    finally:
        model.train(was_training)
    return sum(losses) / len(losses)
