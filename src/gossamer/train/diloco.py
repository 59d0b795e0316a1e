"""DiLoCo: H local steps with the inner optimizer, then average pseudo-gradients across peers.

Each peer keeps a copy of the global weights. After every ``inner_steps`` inner steps it sends the
pseudo-gradient (global minus local weights) to the round's averager; the outer optimizer (SGD
with Nesterov momentum, learning rate 0.7 and momentum 0.9 as in the DiLoCo paper, Douillard et al.
2023, arXiv:2311.08105) applies the averaged pseudo-gradient to the global weights, and the local
model restarts from them. The inner optimizer's state is kept across rounds, as in the paper.

Communication is once every H steps instead of every step: H = 500 sends about 500 times fewer
bytes than synchronous data parallel for the same model.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gossamer.core.hashing import sha256_state
from gossamer.train.averaging import TensorAverager

__all__ = ["DiLoCoConfig", "DiLoCoStrategy"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class DiLoCoConfig:
    """The outer loop of DiLoCo."""

    inner_steps: int = 50
    """Inner steps (H) between two averaging rounds."""
    outer_lr: float = 0.7
    """Outer SGD learning rate (DiLoCo paper: 0.7)."""
    outer_momentum: float = 0.9
    """Outer Nesterov momentum (DiLoCo paper: 0.9)."""
    run_id: str = "gossamer"
    """Names the rounds, so peers of different runs never average together."""

    def __post_init__(self) -> None:
        if self.inner_steps < 1:
            raise ValueError(f"diloco.inner_steps must be at least 1, got {self.inner_steps}")
        if self.outer_lr <= 0:
            raise ValueError(f"diloco.outer_lr must be positive, got {self.outer_lr}")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise ValueError(f"diloco.outer_momentum must be in [0, 1), got {self.outer_momentum}")


class DiLoCoStrategy:
    """The DiLoCo outer loop as a :class:`~gossamer.train.strategy.TrainingStrategy`.

    Args:
        config: inner steps and outer optimizer settings.
        averager: averages pseudo-gradients with the round's other peers.
        weight: this peer's weight in the average (e.g. its tokens per round).
    """

    name = "diloco"

    def __init__(
        self, config: DiLoCoConfig, averager: TensorAverager, *, weight: float = 1.0
    ) -> None:
        self.config = config
        self.averager = averager
        self.weight = weight
        self._params: list[nn.Parameter] = []
        self._global: list[torch.Tensor] = []
        self._outer: torch.optim.SGD | None = None
        self._pending_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
        self.outer_step = 0
        """Completed averaging rounds."""
        self.bytes_sent = 0
        """Bytes sent in averaging rounds so far."""
        self.bytes_received = 0
        """Bytes received in averaging rounds so far."""
        self.last_group_size = 0
        """Peers in the last round."""
        self.round_seconds: list[float] = []
        """Wall time of every averaging round."""
        self.seconds_lost_to_failures = 0.0
        """Time rounds that lost a peer took beyond the median round."""
        self.last_round_excluded = False
        """Whether the last round closed before this peer came (its state is now behind)."""

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int | None:
        del optimizer
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._global = [p.detach().clone() for p in self._params]
        for tensor in self._global:
            tensor.requires_grad_(True)
        self._outer = torch.optim.SGD(
            self._global,
            lr=self.config.outer_lr,
            momentum=self.config.outer_momentum,
            nesterov=True,
        )
        if self._pending_state is not None:
            self._apply_state(*self._pending_state)
            self._pending_state = None
        return None

    def on_gradients(self, model: nn.Module, step: int) -> None:
        del model, step

    def on_step_end(self, model: nn.Module, step: int) -> int | None:
        del model
        if (step + 1) % self.config.inner_steps != 0:
            return None
        assert self._outer is not None, "setup() must run before training"
        with torch.no_grad():
            pseudo = [
                g.detach() - p.detach() for g, p in zip(self._global, self._params, strict=True)
            ]
        outcome = self.averager.average(
            pseudo, round_key=f"{self.config.run_id}/outer/{self.outer_step}", weight=self.weight
        )
        self.bytes_sent += outcome.bytes_sent
        self.bytes_received += outcome.bytes_received
        self.last_group_size = outcome.group_size
        self.last_round_excluded = outcome.excluded
        if outcome.excluded:  # the others moved on without us; the caller must fetch their state
            return None
        if (outcome.failed_peers or outcome.missing_peers) and self.round_seconds:
            typical = statistics.median(self.round_seconds)
            self.seconds_lost_to_failures += max(0.0, outcome.seconds - typical)
        self.round_seconds.append(outcome.seconds)
        for tensor, averaged in zip(self._global, outcome.tensors, strict=True):
            tensor.grad = averaged.to(tensor.dtype)
        self._outer.step()
        self._outer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for param, tensor in zip(self._params, self._global, strict=True):
                param.copy_(tensor)
        self.outer_step += 1
        logger.info("outer step %d: averaged over %d peers", self.outer_step, outcome.group_size)
        return None

    def finish(self, model: nn.Module, step: int) -> bool:
        del model, step
        return False

    def global_weights_hash(self) -> str:
        """sha256 of the global weights, to compare with other peers after an outer step."""
        return sha256_state({str(i): t.detach() for i, t in enumerate(self._global)})

    def state_for_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"global.{i}": t.detach().clone() for i, t in enumerate(self._global)}
        if self._outer is not None:
            for i, tensor in enumerate(self._global):
                buffer = self._outer.state.get(tensor, {}).get("momentum_buffer")
                if buffer is not None:
                    tensors[f"momentum.{i}"] = buffer.detach().clone()
        meta = {
            "outer_step": self.outer_step,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
        }
        return tensors, meta

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if self._outer is None:  # restored before setup(): apply once the parameters are known
            self._pending_state = (tensors, meta)
            return
        self._apply_state(tensors, meta)

    def _apply_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        assert self._outer is not None
        with torch.no_grad():
            for i, tensor in enumerate(self._global):
                saved = tensors.get(f"global.{i}")
                if saved is not None:
                    tensor.copy_(saved)
                momentum = tensors.get(f"momentum.{i}")
                if momentum is not None:
                    self._outer.state[tensor]["momentum_buffer"] = momentum.clone()
        self.outer_step = int(meta.get("outer_step", 0))
        self.bytes_sent = int(meta.get("bytes_sent", 0))
        self.bytes_received = int(meta.get("bytes_received", 0))

    def close(self) -> None:
        pass
