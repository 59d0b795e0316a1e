"""Synchronous data parallel: average the gradients across peers after every step's backward."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gossamer.train.averaging import TensorAverager

__all__ = ["SyncStrategy"]


class SyncStrategy:
    """Averages gradients every step, so every peer applies the same update.

    Args:
        averager: averages gradients with the round's other peers.
        run_id: names the rounds.
        weight: this peer's weight in the average (e.g. its tokens per step).
    """

    name = "sync"

    def __init__(self, averager: TensorAverager, *, run_id: str = "gossamer", weight: float = 1.0):
        self.averager = averager
        self.run_id = run_id
        self.weight = weight
        self.bytes_sent = 0
        """Bytes sent in averaging rounds so far."""
        self.bytes_received = 0
        """Bytes received in averaging rounds so far."""
        self.last_group_size = 0
        """Peers in the last round."""
        self.last_round_excluded = False
        """Whether the last round went on without this peer (its update was its own)."""

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int | None:
        del model, optimizer
        return None

    def on_gradients(self, model: nn.Module, step: int) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]
        outcome = self.averager.average(
            grads, round_key=f"{self.run_id}/grad/{step}", weight=self.weight
        )
        self.bytes_sent += outcome.bytes_sent
        self.bytes_received += outcome.bytes_received
        self.last_group_size = outcome.group_size
        self.last_round_excluded = outcome.excluded
        for param, averaged in zip(params, outcome.tensors, strict=True):
            param.grad = averaged.to(param.dtype)

    def on_step_end(self, model: nn.Module, step: int) -> int | None:
        del model, step
        return None

    def finish(self, model: nn.Module, step: int) -> bool:
        del model, step
        return False

    def state_for_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received}

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        del tensors
        self.bytes_sent = int(meta.get("bytes_sent", 0))
        self.bytes_received = int(meta.get("bytes_received", 0))

    def close(self) -> None:
        pass
