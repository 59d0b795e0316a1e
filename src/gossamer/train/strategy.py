"""The seam between the training loop and how peers cooperate.

The loop (:mod:`gossamer.train.loop`) does forward, backward and the inner optimizer step; a
:class:`TrainingStrategy` decides what happens around them. One peer alone needs nothing
(:class:`LocalStrategy`); synchronous data parallel averages gradients in
:meth:`~TrainingStrategy.on_gradients`; DiLoCo averages pseudo-gradients every H steps in
:meth:`~TrainingStrategy.on_step_end`. A strategy's own state (DiLoCo's global weights and outer
optimizer, say) goes into the checkpoint through :meth:`~TrainingStrategy.state_for_checkpoint`.

Optional hooks, looked up by name (a strategy without one has nothing to do there):
``resume_at(step)``, told the step a resume restored before :meth:`~TrainingStrategy.setup`, and
``land_before_pause(model, step, announce)``, called when a stop pauses the run, before its
checkpoint, to land work under way (a round averaging in the background) so the checkpoint holds
it (see :meth:`LocalStrategy.land_before_pause`), and ``abandon()``, called when the run ends on a
KeyboardInterrupt (a second stop), before :meth:`~TrainingStrategy.close`, which then waits for
nothing under way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol

import torch
from torch import nn

__all__ = ["LocalStrategy", "TrainingStrategy", "optional_hook"]

OptionalHook = Literal["resume_at", "land_before_pause", "abandon"]
"""The hooks a strategy may leave out (see the module's docstring)."""


def optional_hook(strategy: TrainingStrategy, name: OptionalHook) -> Callable[..., Any] | None:
    """The strategy's optional hook ``name``, or None where it has none (nothing to do there)."""
    hook = getattr(strategy, name, None)
    return hook if callable(hook) else None


class TrainingStrategy(Protocol):
    """How a peer cooperates with others around each training step."""

    name: str
    """Short name, recorded in checkpoints and summaries."""

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int | None:
        """Called once before the first step, after any resume.

        Returns:
            The step to continue from when the strategy brought the state from other peers (a
            newcomer synced from donors), else None.
        """
        ...

    def on_gradients(self, model: nn.Module, step: int) -> None:
        """Called after backward (all micro-batches accumulated), before clipping and stepping."""
        ...

    def on_step_end(self, model: nn.Module, step: int) -> int | None:
        """Called after the optimizer step ``step`` (0-based) has been applied.

        Returns:
            The step to continue from when the strategy replaced the model's state with the
            swarm's (a peer that fell behind), else None (continue from ``step + 1``).
        """
        ...

    def finish(self, model: nn.Module, step: int) -> bool:
        """Called once after the last training step, before the final evaluation and checkpoint.

        Returns:
            Whether it replaced the model's state (the final checkpoint is then written again).
        """
        ...

    def state_for_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The strategy's tensors and JSON-serializable state, to be checkpointed."""
        ...

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`state_for_checkpoint` returned."""
        ...

    def close(self) -> None:
        """Release whatever the strategy holds (connections, threads)."""
        ...


class LocalStrategy:
    """One peer, training alone: every hook does nothing."""

    name = "local"

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int | None:
        del model, optimizer
        return None

    def on_gradients(self, model: nn.Module, step: int) -> None:
        del model, step

    def on_step_end(self, model: nn.Module, step: int) -> int | None:
        del model, step
        return None

    def finish(self, model: nn.Module, step: int) -> bool:
        del model, step
        return False

    def land_before_pause(
        self, model: nn.Module, step: int, announce: Callable[[str], None]
    ) -> int | None:
        """(optional hook) A stop pauses the run: land what is under way before the checkpoint.

        Args:
            model: the model being trained.
            step: the step the run pauses at.
            announce: to be told, before any wait, what is waited for (it is logged).

        Returns:
            None where nothing was under way (alone, never); else the step the run stands at
            after it landed.
        """
        del model, step, announce
        return None

    def state_for_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {}

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        del tensors, meta

    def close(self) -> None:
        pass
