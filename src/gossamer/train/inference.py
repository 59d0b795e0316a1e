"""Using a trained model: load it from a checkpoint, sample text from it, evaluate it."""

from __future__ import annotations

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
from gossamer.store import CheckpointStore

__all__ = ["LoadedModel", "load_model", "mean_validation_loss", "sample_text"]

_MANIFEST = "manifest.json"


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
        CheckpointCorruptedError: the checkpoint folder fails verification.
        IncompatibleCheckpointError: the checkpoint holds a custom model, not the built-in GPT.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; pass a checkpoint folder or directory")
    if (path / _MANIFEST).is_file():
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
    config = config_from_dict(RunConfig, state.meta["config"], origin=f"checkpoint {path}")
    model = GPT(config.model)
    model.load_state_dict(state.tensors["model"])
    model.eval()
    digest = state.meta.get("data_sha256")
    return LoadedModel(
        model=model,
        config=config,
        step=state.step,
        path=path,
        data_sha256=digest if isinstance(digest, str) else None,
    )


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
