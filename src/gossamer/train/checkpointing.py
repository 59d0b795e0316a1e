"""Everything a run needs to resume exactly, captured into and restored from a checkpoint.

A checkpoint of a training run holds the model weights, the optimizer state, the strategy's own
state, the data stream's position and every random generator's state, so that N steps, a resume,
then N more steps give bit-identical weights to 2N steps in one go (on CPU).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gossamer.core.config import RunConfig
from gossamer.core.config_loader import config_to_dict
from gossamer.core.errors import IncompatibleCheckpointError
from gossamer.data import TokenStream
from gossamer.store import (
    CheckpointState,
    flatten_optimizer_state,
    rng_state_capture,
    rng_state_restore,
    unflatten_optimizer_state,
)
from gossamer.train.optim import ScheduleRefit, apply_optim_config
from gossamer.train.strategy import TrainingStrategy

__all__ = [
    "RunState",
    "capture_run_state",
    "check_model_signature",
    "estimate_checkpoint_num_bytes",
    "restore_run_state",
]

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class RunState:
    """The live objects of a run that a checkpoint captures."""

    config: RunConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    stream: TokenStream
    strategy: TrainingStrategy
    custom_model: bool
    step: int = 0
    tokens_trained: int = 0
    schedule_steps: int | None = None
    """The learning-rate schedule's length where a time budget fitted it (None: max_steps)."""
    schedule_fitted_at: int | None = None
    """The first step that followed the fitted length (where ``schedule_steps`` is set)."""
    schedule_rate: float | None = None
    """The steps per second the schedule's fitted length assumes (None: not fitted, or a
    checkpoint from before it was kept)."""
    schedule_spent_s: float = 0.0
    """Seconds of the time budget the run had spent when it was checkpointed (its sessions
    together; also before the budget fitted the schedule)."""
    schedule_refit: ScheduleRefit | None = None
    """Where the budget's schedule was fitted again, to the step rate measured since (None: it
    was not)."""
    data_sha256: str | None = None
    """The sha256 of the training tokens (the corpus manifest's), where known."""


def _schedule_limits(config: RunConfig) -> dict[str, float]:
    """The limits a schedule fitted to a time budget holds under."""
    return {"max_steps": config.train.max_steps, "max_seconds": config.train.max_seconds}


def _data_changes(meta: dict[str, Any], run: RunState) -> frozenset[str]:
    """What a resume goes on past between the saved data position's stream and this run's:
    ``"seed"`` where either seed is a swarm peer's (from its peer id, not ``train.seed``), and
    ``"num_tokens"`` where the training data changed size (a file appended to, the standard
    library of a patched Python). Empty where the position loads as it is, or where something
    else differs: another ``train.seed``, sequence length or peer layout is still refused (by
    :meth:`TokenStream.load_state_dict`, which says why)."""
    saved, current = meta.get("data_position"), run.stream.state_dict()
    if not isinstance(saved, dict):
        return frozenset()
    try:
        if any(int(saved[k]) != current[k] for k in ("peer_index", "num_peers", "seq_len")):
            return frozenset()
        changes = set()
        if int(saved["seed"]) != current["seed"]:
            saved_train_seed = int(meta["config"]["train"]["seed"])
            if int(saved["seed"]) == saved_train_seed and current["seed"] == run.config.train.seed:
                return frozenset()
            changes.add("seed")
        if int(saved["num_tokens"]) != current["num_tokens"] and int(saved["epoch"]) >= 0:
            changes.add("num_tokens")
        return frozenset(changes)
    except (KeyError, TypeError, ValueError):
        return frozenset()


def _non_negative(value: object) -> float | None:
    """``value`` where it is a finite number >= 0 (a checkpoint's meta), else None."""
    if isinstance(value, int | float) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def _refit_to_meta(refit: ScheduleRefit | None) -> dict[str, float] | None:
    if refit is None:
        return None
    return {
        "at_step": refit.at_step,
        "position": refit.position,
        "first_steps": refit.first_steps,
    }


def _refit_from_meta(value: object, *, where: str) -> ScheduleRefit | None:
    """The refit a checkpoint records (None in checkpoints from before refits were kept)."""
    if value is None:
        return None
    malformed = IncompatibleCheckpointError(
        f"{where}: its learning-rate schedule (schedule_refit = {value!r}) is malformed; "
        "resume from another checkpoint"
    )
    if not isinstance(value, dict):
        raise malformed
    try:
        return ScheduleRefit(
            at_step=int(value["at_step"]),
            position=float(value["position"]),
            first_steps=int(value["first_steps"]),
        )
    except (KeyError, TypeError, ValueError):
        raise malformed from None


def _model_signature(model: nn.Module) -> dict[str, list[int]]:
    return {name: list(t.shape) for name, t in model.state_dict().items()}


_RESUME_FIX = "use the model it was written with, or point checkpoint.directory at a fresh folder"


def check_model_signature(
    meta: dict[str, Any], model: nn.Module, *, where: str, fix: str = _RESUME_FIX
) -> None:
    """Raise :class:`IncompatibleCheckpointError` unless the parameter names and shapes a
    checkpoint's ``meta`` records (``model_signature``) are ``model``'s.

    Args:
        meta: the loaded checkpoint's meta.
        model: the model its weights are about to be loaded into.
        where: the checkpoint's location, for the message.
        fix: what the user can do about it, for the message.
    """
    saved_signature = meta.get("model_signature")
    if saved_signature is None:
        raise IncompatibleCheckpointError(
            f"checkpoint {where} records no model signature (its parameters' names and "
            f"shapes): not a checkpoint a Gossamer training run wrote; {fix}"
        )
    if saved_signature != _model_signature(model):
        raise IncompatibleCheckpointError(
            f"checkpoint {where} holds weights of another shape than this model "
            f"(parameter names or shapes differ); {fix}"
        )


def _num_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def estimate_checkpoint_num_bytes(run: RunState) -> int:
    """About the bytes a checkpoint of ``run`` takes on disk: the model's tensors, the
    optimizer's state, as AdamW keeps it (two moments per trained parameter) where no step has
    made it yet, and DiLoCo's global weights and outer momentum (its strategy is set up after
    the check: left out, a DiLoCo run's checkpoint was about 40% over the estimate). A lower
    bound: the random states, the files' headers and the estimate a DiLoCo peer killed while a
    round averaged keeps come on top."""
    model_bytes = sum(_num_bytes(t) for t in run.model.state_dict().values())
    trained_bytes = sum(
        _num_bytes(param)
        for group in run.optimizer.param_groups
        for param in group["params"]
        if param.requires_grad
    )
    state_tensors = [
        value
        for param_state in run.optimizer.state.values()
        for value in param_state.values()
        if isinstance(value, torch.Tensor)
    ]
    if state_tensors:
        optimizer_bytes = sum(_num_bytes(t) for t in state_tensors)
    else:
        optimizer_bytes = 2 * trained_bytes
    strategy_bytes = 0
    if run.config.swarm.strategy == "diloco":  # global weights, and a momentum buffer for each
        strategy_bytes = trained_bytes * (2 if run.config.swarm.outer_momentum > 0 else 1)
    return model_bytes + optimizer_bytes + strategy_bytes


def capture_run_state(run: RunState) -> CheckpointState:
    """Snapshot ``run``: the model's tensors are cloned, the optimizer's and the strategy's are
    the live ones (write it before the next step changes them)."""
    optimizer_tensors, optimizer_meta = flatten_optimizer_state(run.optimizer.state_dict())
    rng_tensors, rng_meta = rng_state_capture()
    strategy_tensors, strategy_meta = run.strategy.state_for_checkpoint()
    model_tensors = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    return CheckpointState(
        step=run.step,
        tensors={
            "model": model_tensors,
            "optimizer": optimizer_tensors,
            "rng": rng_tensors,
            "strategy": strategy_tensors,
        },
        meta={
            "config": config_to_dict(run.config),
            "custom_model": run.custom_model,
            "model_signature": _model_signature(run.model),
            "optimizer": optimizer_meta,
            "rng": rng_meta,
            "data_position": run.stream.state_dict(),
            "strategy": {"name": run.strategy.name, "state": strategy_meta},
            "tokens_trained": run.tokens_trained,
            "schedule_steps": run.schedule_steps,
            "schedule_fitted_at": run.schedule_fitted_at,
            "schedule_refit": _refit_to_meta(run.schedule_refit),
            "schedule_rate": run.schedule_rate,
            "schedule_spent_s": run.schedule_spent_s,
            # What the schedule was fitted (or the budget spent) under: a resume with other
            # limits fits it anew, with the budget given now.
            "schedule_fit": _schedule_limits(run.config),
            "data_sha256": run.data_sha256,
        },
    )


def check_compatible(state: CheckpointState, run: RunState, *, where: str) -> None:
    """Raise :class:`IncompatibleCheckpointError` unless ``state`` fits ``run``'s model.

    Args:
        state: the loaded checkpoint.
        run: the run about to be resumed.
        where: the checkpoint's location, for the message.
    """
    meta = state.meta
    if not run.custom_model and not meta.get("custom_model", False):
        # (dropout is no part of the model's shape: a resume may change it, as eval does)
        saved = {k: v for k, v in meta.get("config", {}).get("model", {}).items() if k != "dropout"}
        current = {k: v for k, v in config_to_dict(run.config.model).items() if k != "dropout"}
        if saved != current:
            diffs = ", ".join(
                f"model.{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}"
                for k in sorted(set(saved) | set(current))
                if saved.get(k) != current.get(k)
            )
            raise IncompatibleCheckpointError(
                f"checkpoint {where} was written for another model ({diffs}); set the model "
                "config back to match it, or point checkpoint.directory at a fresh folder"
            )
    check_model_signature(meta, run.model, where=where)


def _restore_data_position(
    meta: dict[str, Any], run: RunState, changes: frozenset[str], *, where: str
) -> None:
    """Put ``run``'s stream where the checkpoint's was, or where it goes on from past
    ``changes`` (see :func:`_data_changes`).

    Raises:
        ValueError: the saved position does not fit this run's stream.
    """
    saved: dict[str, int] = meta["data_position"]
    current = run.stream.state_dict()
    resized = (
        f"the training data held {saved['num_tokens']} tokens, and holds {current['num_tokens']} "
        "now (a file changed, or the Python whose standard library is the corpus)"
    )
    if "seed" in changes:
        # A local run going on as a swarm peer (or back, or a peer with a new key): a
        # peer's stream is seeded by its peer id. The data is the same; its order is new.
        logger.warning(
            "checkpoint %s: its data position is of a stream seeded %s, and this run's is "
            "seeded %s (a swarm peer's seed comes from its peer id, a local run's is "
            "train.seed)%s: the data stream starts afresh, in a new order",
            where,
            saved.get("seed"),
            current["seed"],
            f", and {resized}" if "num_tokens" in changes else "",
        )
    elif "num_tokens" in changes:
        # A position in other data means nothing; the weights and the optimizer still do. The
        # stream goes on at the next epoch of the data as it is now: a new order, and the same
        # one on every resume from this checkpoint (a later checkpoint resumes exactly).
        epoch = int(saved["epoch"]) + 1
        logger.warning(
            "checkpoint %s: %s; weights and optimizer go on, and the data stream starts a new "
            "epoch (%d) of this data, in a new order",
            where,
            resized,
            epoch,
        )
        run.stream.load_state_dict({**current, "epoch": epoch, "position": 0})
    else:
        run.stream.load_state_dict(meta["data_position"])


def restore_run_state(state: CheckpointState, run: RunState, *, where: str) -> None:
    """Load ``state`` into ``run`` in place: weights, optimizer, data position, RNGs, strategy."""
    check_compatible(state, run, where=where)
    meta = state.meta
    run.model.load_state_dict(state.tensors["model"])
    run.optimizer.load_state_dict(
        unflatten_optimizer_state(state.tensors.get("optimizer", {}), meta["optimizer"])
    )
    changed = apply_optim_config(run.optimizer, run.config.optim)
    if changed:
        logger.info("resumed with other optimizer settings: %s", ", ".join(changed))
    changes = _data_changes(meta, run)
    try:
        _restore_data_position(meta, run, changes, where=where)
    except ValueError as exc:
        raise IncompatibleCheckpointError(
            f"checkpoint {where} was written for other training data or settings ({exc}); "
            "train with the data, seed and peer layout it was written with, or point "
            "checkpoint.directory at a fresh folder"
        ) from exc
    saved_data = meta.get("data_sha256")
    if (
        saved_data
        and run.data_sha256
        and saved_data != run.data_sha256
        and "num_tokens" not in changes  # (said already)
    ):
        logger.warning(
            "checkpoint %s was written while training on other data (tokens' sha256 %s..., "
            "now %s...); going on from its position in this data",
            where,
            str(saved_data)[:12],
            run.data_sha256[:12],
        )
    rng_state_restore(state.tensors.get("rng", {}), meta["rng"])
    strategy_meta: dict[str, Any] = meta.get("strategy", {})
    saved_strategy = strategy_meta.get("name")
    if saved_strategy is not None and saved_strategy != run.strategy.name:
        logger.warning(
            "checkpoint %s was written by the %r strategy, and this run uses %r: %s state "
            "(global weights, outer momentum, rounds) starts afresh",
            where,
            saved_strategy,
            run.strategy.name,
            run.strategy.name,
        )
    run.strategy.load_checkpoint_state(
        state.tensors.get("strategy", {}), strategy_meta.get("state", {})
    )
    run.step = state.step
    run.tokens_trained = int(meta.get("tokens_trained", 0))
    schedule_steps = meta.get("schedule_steps")
    run.schedule_steps = int(schedule_steps) if schedule_steps is not None else None
    fitted_at = meta.get("schedule_fitted_at")  # (None in checkpoints from before it was kept)
    run.schedule_fitted_at = (
        int(fitted_at) if run.schedule_steps is not None and fitted_at is not None else None
    )
    run.schedule_refit = (
        _refit_from_meta(meta.get("schedule_refit"), where=where)
        if run.schedule_steps is not None
        else None
    )
    fitted = run.schedule_steps is not None
    rate = _non_negative(meta.get("schedule_rate")) if fitted else None
    run.schedule_rate = rate if rate else None  # (None in checkpoints from before it was kept)
    # (spent before the schedule was fitted too: a run paused in its first steps got a whole
    # new budget on resume)
    run.schedule_spent_s = _non_negative(meta.get("schedule_spent_s")) or 0.0
    fit = meta.get("schedule_fit")
    limits = _schedule_limits(run.config)
    if isinstance(fit, dict) and fit != limits:
        run.schedule_spent_s = 0.0  # (another budget: this one starts now)
    if run.schedule_steps is not None and isinstance(fit, dict) and fit != limits:
        logger.info(
            "the learning-rate schedule fitted to the last session's time budget (%d steps, "
            "under %s) does not hold with %s: %s",
            run.schedule_steps,
            fit,
            limits,
            "fitted again to this budget" if limits["max_seconds"] else "max_steps it is",
        )
        run.schedule_steps = None
        run.schedule_fitted_at = None
        run.schedule_refit = None
        run.schedule_rate = None
        run.schedule_spent_s = 0.0
