"""The inner optimizer (AdamW) and its learning-rate schedule (linear warm-up, then cosine)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gossamer.core.config import OptimConfig

__all__ = [
    "ScheduleRefit",
    "apply_optim_config",
    "build_optimizer",
    "learning_rate_at",
    "warmup_steps",
]


@dataclass(frozen=True, slots=True)
class ScheduleRefit:
    """A schedule fitted to a time budget, fitted again part way to a new length.

    From ``at_step`` on, the steps left are mapped linearly onto what was left of the first
    fit's curve (``first_steps`` long, standing at ``position`` at ``at_step``): the rate goes
    on from where it was, with no jump, and reaches its floor at the new end.
    """

    at_step: int
    position: float
    first_steps: int

    def position_at(self, step: int, end: int) -> float:
        """Where step ``step`` of a schedule now ``end`` steps long stands on the first fit's
        curve (``step`` itself before ``at_step``)."""
        if step < self.at_step:
            return float(step)
        span = max(1, end - self.at_step)
        done = min(1.0, (step - self.at_step) / span)
        return self.position + (self.first_steps - self.position) * done


def learning_rate_at(
    step: int,
    *,
    config: OptimConfig,
    max_steps: int,
    planned_steps: int | None = None,
    fitted_at: int | None = None,
    refit: ScheduleRefit | None = None,
) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of a run of ``max_steps``.

    Linear warm-up from 0 to ``config.lr`` over ``warmup_steps`` (at most half of
    ``planned_steps``, ``max_steps`` if None: a 10-step run with the default 20 warm-up steps
    would never reach its peak nor decay), then cosine decay to ``config.lr *
    config.min_lr_ratio`` at ``max_steps``. A pure function of the step, so a resumed run
    follows exactly the same schedule. A schedule whose length changes as it runs (fitted to a
    time budget) passes the length it had from the start as ``planned_steps``, so that its
    warm-up does not change part way, and the step from which the new length holds as
    ``fitted_at``: fitted while still warming up, the rest of the warm-up takes at most half of
    the steps left, from the rate reached then (a warm-up longer than the fitted run never
    decayed, and never reached its peak). Fitted again part way (``refit``), ``max_steps`` is
    the newest length, and the steps from the refit follow the rest of the first fit's curve.
    """
    if refit is not None:
        position = refit.position_at(step, max_steps)
        return _rate_on_curve(position, config, refit.first_steps, planned_steps, fitted_at)
    return _rate_on_curve(step, config, max_steps, planned_steps, fitted_at)


def _rate_on_curve(
    step: float,
    config: OptimConfig,
    max_steps: int,
    planned_steps: int | None,
    fitted_at: int | None,
) -> float:
    peak = config.lr
    floor = peak * config.min_lr_ratio
    warmup = warmup_steps(config, max_steps if planned_steps is None else planned_steps)
    top, decay_from = peak, warmup
    if fitted_at is not None and fitted_at < warmup:
        if step < fitted_at:
            return peak * (step + 1) / warmup
        reached = peak * fitted_at / warmup  # (the rate of the step before)
        decay_from = min(warmup, fitted_at + max(0, max_steps - fitted_at) // 2)
        if step < decay_from:
            return reached + (peak - reached) * (step + 1 - fitted_at) / (decay_from - fitted_at)
        top = peak if decay_from > fitted_at else reached
    elif warmup and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, max_steps - decay_from)
    progress = min(1.0, (step - decay_from) / span)
    return floor + 0.5 * (top - floor) * (1.0 + math.cos(math.pi * progress))


def warmup_steps(config: OptimConfig, max_steps: int) -> int:
    """The warm-up steps of a ``max_steps``-step schedule: ``config.warmup_steps``, at most half
    of the run."""
    return min(config.warmup_steps, max(0, max_steps) // 2)


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms or other vectors).

    Parameters shared between modules (tied embeddings) appear once.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def apply_optim_config(optimizer: torch.optim.Optimizer, config: OptimConfig) -> list[str]:
    """Set ``config``'s betas and weight decay on an optimizer made by :func:`build_optimizer`
    (whose state, loaded from a checkpoint, carries the values it was saved with).

    A resumed run then follows its config now, as it does for the learning rate (set every
    step). Returns what changed, e.g. ``["optim.weight_decay 0.1 -> 0.5"]``.
    """
    betas = (config.beta1, config.beta2)
    matrices = optimizer.param_groups[0]  # then the rest, which never decays
    was = {"beta1": matrices["betas"][0], "beta2": matrices["betas"][1]}
    was["weight_decay"] = matrices["weight_decay"]
    now = {"beta1": config.beta1, "beta2": config.beta2, "weight_decay": config.weight_decay}
    for index, group in enumerate(optimizer.param_groups):
        group["betas"] = betas
        group["weight_decay"] = config.weight_decay if index == 0 else 0.0
    return [f"optim.{key} {was[key]} -> {now[key]}" for key in now if was[key] != now[key]]
