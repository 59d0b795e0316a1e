"""DiLoCo's outer step: the global weights and outer optimizer a peer keeps, how a round's
average moves them (or, where the round failed on every member or its average is unusable,
leaves them), where the local model restarts from, and the checkpoint of all that.

The base of :class:`~gossamer.train.diloco.DiLoCoStrategy`, which decides when rounds run
(its module docstring describes the whole outer loop).
"""

from __future__ import annotations

import logging
import statistics
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from gossamer.core.errors import AveragingStalledError
from gossamer.core.hashing import sha256_state
from gossamer.train.averaging import AverageOutcome, PendingRound, TensorAverager, all_finite
from gossamer.train.diloco_config import DiLoCoConfig

__all__ = ["MAX_FAILED_ATTEMPTS", "DiLoCoOuterStep", "averaged_buffers", "hashed_global_state"]

logger = logging.getLogger(__name__)

MAX_FAILED_ATTEMPTS = 3
"""Attempts of one outer step's round, in a row, that may fail on every member before DiLoCo
raises :class:`~gossamer.core.errors.AveragingStalledError`. Each such attempt moves nobody's
global weights; a cause that stays (a peer that sends NaN over the torch backend, which cannot
drop it; a deadline too short for the model) would otherwise make every later round fail too,
and each peer train on alone and throw its work away at the end."""


def averaged_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The buffers of ``model`` that rounds average: floating point, and kept by its
    ``state_dict`` (a buffer registered as not persistent is derived, not state), in the
    order of ``named_buffers``."""
    kept = model.state_dict(keep_vars=True)
    return [b for name, b in model.named_buffers() if name in kept and b.is_floating_point()]


def hashed_global_state(
    global_weights: list[torch.Tensor], buffers: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """What the peers' agreement hash covers: the global weights, named ``0``, ``1``, ..., and
    the averaged buffers, named ``buffer.0``, ... (a model without such buffers hashes as it
    did before they were averaged, so peers of both versions agree on it)."""
    state = {str(i): t.detach() for i, t in enumerate(global_weights)}
    state.update({f"buffer.{i}": b.detach() for i, b in enumerate(buffers)})
    return state


class DiLoCoOuterStep:
    """The global weights of a DiLoCo peer, the outer optimizer that moves them, and the state
    of its rounds: the base of :class:`~gossamer.train.diloco.DiLoCoStrategy`.

    Args:
        config: inner steps and outer optimizer settings.
        averager: averages pseudo-gradients with the round's other peers.
        weight: this peer's weight in the average (e.g. its tokens per round).
    """

    def __init__(
        self, config: DiLoCoConfig, averager: TensorAverager, *, weight: float = 1.0
    ) -> None:
        self.config = config
        self.averager = averager
        self.weight = weight
        self._params: list[nn.Parameter] = []
        self._global: list[torch.Tensor] = []
        self._buffers: list[torch.Tensor] = []
        """The model's buffers that rounds average (see :func:`averaged_buffers`)."""
        self._global_buffers: list[torch.Tensor] = []
        """Their average as of the last outer step (the global copy, as ``_global`` is of
        the weights)."""
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
        self._start: list[torch.Tensor] = []
        """(overlap) The local weights this round's inner steps started from."""
        self._inflight: Future[AverageOutcome] | None = None
        """(overlap) The round averaging the previous round's progress."""
        self._rounds: ThreadPoolExecutor | None = None
        self._steps_since_round = 0
        """Inner steps since the last round was launched (or the state was taken from others)."""
        self._restored_in_flight = False
        """(overlap) The checkpoint this peer was restored from had a round in flight."""
        self._forming: PendingRound | None = None
        """(train while forming) The round whose group is forming while training goes on."""
        self._local_steps = 0
        """Inner steps since the local model last restarted from the global weights."""
        self.round_began_at = -1
        """(train while forming) The step at whose end the last round began (-1: none yet)."""
        self._resume_forming_at: int | None = None
        """(train while forming) Restored from a checkpoint taken while a round formed: the
        step at whose end it began, begun again at the first step end."""
        self._averaging: Future[AverageOutcome] | None = None
        """(train while averaging) The formed round, averaging in the background."""
        self._finished_at: int | None = None
        """The step :meth:`finish` last ended the run at (saved, so that a finished run run
        again finds nothing left to average there)."""
        self._abandoned = False
        """A second stop came: closing leaves the round under way (see :meth:`abandon`)."""
        self._handed: list[torch.Tensor] | None = None
        """(background rounds) The progress handed to the round under way or last landed,
        while the local model stands on an estimate made from it: taken back where that round
        failed on every member (see :meth:`_keep_failed_round`)."""
        self._handed_steps = 0
        """The inner steps behind ``_handed``."""
        self._round_failed = False
        """The last round failed on every member: its progress is still to be averaged (by
        the next round, or by one more after the last step)."""
        self.round_attempt = 0
        """Rounds of this outer step that failed on every member: the next one is formed
        under a key of its own (see :meth:`_round_key`)."""

    def outer_momentum_at(self, outer_step: int) -> float:
        """The outer momentum of outer step ``outer_step`` (0-based): the configured one, warmed
        up along Nesterov's sequence ``t / (t + 3)`` unless ``outer_momentum_warmup`` is off.

        A function of the agreed outer step only, so every peer of a round applies the same one.
        """
        momentum = self.config.outer_momentum
        if self.config.outer_momentum_warmup:
            momentum = min(momentum, outer_step / (outer_step + 3))
        return momentum

    def _round_key(self) -> str:
        """The key of this outer step's round: ``RUN/outer/N``, then ``RUN/outer/N#A`` for its
        A-th attempt after attempts that failed on every member. A failed attempt's records
        (its members, its close) stay on the DHT: formed again under the same key, every
        member found it closed before it came, missed it, and no peer averaged again for the
        rest of the run. Every member of a failed attempt learns alike that it failed (see
        :meth:`_keep_failed_round`), so they all come to the next attempt's key."""
        key = f"{self.config.run_id}/outer/{self.outer_step}"
        return key if self.round_attempt == 0 else f"{key}#{self.round_attempt}"

    def _average(self, pseudo: list[torch.Tensor], weight: float | None = None) -> AverageOutcome:
        weight = self.weight if weight is None else weight
        return self.averager.average(
            self._contribution(pseudo), round_key=self._round_key(), weight=weight
        )

    def _contribution(self, pseudo: list[torch.Tensor]) -> list[torch.Tensor]:
        """What this peer puts into a round: ``pseudo`` (one tensor per trained parameter),
        then copies of the buffers rounds average (copies: training goes on meanwhile with a
        round in the background, and updates them in place)."""
        return [*pseudo, *(b.detach().clone() for b in self._buffers)]

    def _restart_local_from_global(self) -> None:
        self._local_steps = 0
        with torch.no_grad():
            for param, start, tensor in zip(self._params, self._start, self._global, strict=True):
                param.copy_(tensor)
                start.copy_(tensor)
            for buffer, averaged in zip(self._buffers, self._global_buffers, strict=True):
                buffer.copy_(averaged)

    def _pseudo_gradient(self) -> list[torch.Tensor]:
        """The global weights minus the local model's."""
        with torch.no_grad():
            return [
                g.detach() - p.detach() for g, p in zip(self._global, self._params, strict=True)
            ]

    def _progress(self) -> list[torch.Tensor]:
        """This round's local progress: where its inner steps started minus where they are."""
        with torch.no_grad():
            return [s - p.detach() for s, p in zip(self._start, self._params, strict=True)]

    def _move_by_start_error(self) -> None:
        """Move the local model, and the start its progress is measured from, by the global
        weights minus that start (the error of the estimate it restarted from), keeping the
        steps taken since."""
        with torch.no_grad():
            for param, start, tensor in zip(self._params, self._start, self._global, strict=True):
                param.add_(tensor - start)
                start.copy_(tensor)

    def _restart_with_progress(self, progress: list[torch.Tensor]) -> None:
        """Restart the local model from an eager estimate of the next global weights.

        The round averaging ``progress`` has not landed yet, so this peer's own progress stands
        in for the average: the outer optimizer's step (Nesterov momentum included) is taken on
        copies, with ``progress`` as the pseudo-gradient, from the current global weights. The
        agreed global weights and momentum are not touched; they move only by real averages.
        """
        assert self._outer is not None
        lr = float(self._outer.param_groups[0]["lr"])
        momentum = self.outer_momentum_at(self.outer_step)  # the step this estimate stands in for
        with torch.no_grad():
            for param, start, tensor, mine in zip(
                self._params, self._start, self._global, progress, strict=True
            ):
                step = mine
                if momentum > 0:
                    buffer = self._outer.state.get(tensor, {}).get("momentum_buffer")
                    velocity = mine if buffer is None else buffer * momentum + mine
                    step = mine + momentum * velocity  # Nesterov, as torch.optim.SGD
                param.copy_(tensor - lr * step)
                start.copy_(param)

    def _apply_outcome(
        self, outcome: AverageOutcome, *, waited_s: float | None, plain: bool = False
    ) -> None:
        """Record a round and apply its averaged pseudo-gradient to the global weights, and
        its averaged buffers to the model's.

        An average that holds NaN or infinite values is not applied (see
        :meth:`_skip_unusable_round`).

        Args:
            outcome: the round's result.
            plain: apply it with the outer learning rate alone, no momentum (the buffer is
                left as it was).
            waited_s: how long training waited for it (None: it ran in the foreground).
        """
        assert self._outer is not None
        self.bytes_sent += outcome.bytes_sent
        self.bytes_received += outcome.bytes_received
        self.last_group_size = outcome.group_size
        self.last_round_excluded = outcome.excluded
        if outcome.excluded:  # the others moved on without us; the caller must fetch their state
            return
        if not all_finite(outcome.tensors):
            self._skip_unusable_round(outcome)
            return
        self._handed = None
        self._round_failed = False
        self.round_attempt = 0  # (the next outer step's first)
        if (outcome.failed_peers or outcome.missing_peers) and self.round_seconds:
            if waited_s is None:
                typical = statistics.median(self.round_seconds)
                self.seconds_lost_to_failures += max(0.0, outcome.seconds - typical)
            else:  # in the background: training lost only the time it waited for the round
                self.seconds_lost_to_failures += waited_s
        self.round_seconds.append(outcome.seconds)
        num_params = len(self._global)
        with torch.no_grad():
            for buffer, kept, averaged in zip(
                self._buffers, self._global_buffers, outcome.tensors[num_params:], strict=True
            ):
                kept.copy_(averaged)
                buffer.copy_(averaged)
        for tensor, averaged in zip(self._global, outcome.tensors[:num_params], strict=True):
            tensor.grad = averaged.to(tensor.dtype)
        momentum = 0.0 if plain else self.outer_momentum_at(self.outer_step)
        for group in self._outer.param_groups:
            group["momentum"] = momentum
            group["nesterov"] = momentum > 0  # with none, torch keeps no buffer: a plain step
        self._outer.step()
        self._outer.zero_grad(set_to_none=True)
        self.outer_step += 1
        logger.info("outer step %d: averaged over %d peers", self.outer_step, outcome.group_size)

    def _skip_unusable_round(self, outcome: AverageOutcome) -> None:
        """The round's average holds NaN or infinite values: it is not applied, and the global
        weights stay. In process, every peer of the round received that same average and skips
        it alike: the round failed on every member (see :meth:`_keep_failed_round`). The swarm
        strategy overrides this: there, the swarm says whether it failed everywhere.

        Args:
            outcome: the round's result.
        """
        logger.warning(
            "round %s (outer step %d, %d peers): the average holds NaN or infinite values (a "
            "peer sent them as they were); it is not applied, the global weights stay",
            self._round_key(),
            self.outer_step + 1,
            outcome.group_size,
        )
        self._keep_failed_round()

    def _keep_failed_round(self) -> None:
        """The last round failed on every member: nobody's global weights moved, and its
        progress is in no average. The local model keeps it for the next round to average.

        The next round of this outer step is the next attempt, under a key of its own (after
        :data:`MAX_FAILED_ATTEMPTS` such attempts in a row, it raises instead). Averaged
        in the foreground, the local model never left its progress. Handed to a round in the
        background, it restarted from an eager estimate made from that progress (and
        landed on the global weights where the round failed): it moves back by the estimate,
        to the global weights minus the progress handed over plus the steps since, and counts
        those steps again, so the next round's pseudo-gradient holds both.

        Raises:
            AveragingStalledError: :data:`MAX_FAILED_ATTEMPTS` attempts of this outer step's
                round in a row failed on every member.
        """
        failed_key = self._round_key()
        self._round_failed = True
        self.round_attempt += 1
        self.last_round_excluded = False
        if self.round_attempt >= MAX_FAILED_ATTEMPTS:
            raise AveragingStalledError(
                f"round {failed_key} (outer step {self.outer_step + 1}) and the "
                f"{self.round_attempt - 1} attempt(s) before it failed on every member: the "
                "global weights have not moved since, and training on would throw every peer's "
                "work away at the end. Check the peers' logs for the cause: a peer whose values "
                "are NaN or infinite (with the torch backend nobody can be dropped for it: every "
                "member's average is NaN), rounds that run past their deadline (raise "
                "swarm.round-timeout-s), or peers that cannot reach each other"
            )
        handed, self._handed = self._handed, None
        if handed is None:
            return
        with torch.no_grad():
            for param, start, tensor, progress in zip(
                self._params, self._start, self._global, handed, strict=True
            ):
                param.add_(tensor - progress - start)
                start.copy_(tensor)
        self._local_steps += self._handed_steps

    def global_weights_hash(self) -> str:
        """sha256 of the global weights (and averaged buffers), to compare with other peers
        after an outer step."""
        return sha256_state(hashed_global_state(self._global, self._global_buffers))

    def state_for_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"global.{i}": t.detach().clone() for i, t in enumerate(self._global)}
        for i, buffer in enumerate(self._global_buffers):
            tensors[f"buffer.{i}"] = buffer.detach().clone()
        if self._outer is not None:
            for i, tensor in enumerate(self._global):
                buffer = self._outer.state.get(tensor, {}).get("momentum_buffer")
                if buffer is not None:
                    tensors[f"momentum.{i}"] = buffer.detach().clone()
        if self._averaging is not None:
            # The local model restarted from an estimate of a round still averaging, which a
            # peer restored from here never sees land: it comes back onto the global weights,
            # as from an excluded round (that round's progress lost, the steps since kept).
            # Only where it was killed: a pause lands the round first (land_before_pause).
            for i, start in enumerate(self._start):
                tensors[f"estimate.{i}"] = start.detach().clone()
        meta = {
            "outer_step": self.outer_step,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "local_steps": self._local_steps,  # the local model's progress is saved with it
            # A peer killed after the last step but before finish() needs both to run the
            # tail round its steps since the last one are owed (they were dropped).
            "steps_since_round": self._steps_since_round,
            # (overlap) Also after a round that left this peer out landed: the local model still
            # stands on the estimate it restarted from, and measured from the global weights on
            # resume its next contribution sent that round's progress again.
            "round_in_flight": self._inflight is not None
            or (
                self.config.overlap
                and any(
                    not torch.equal(s, g) for s, g in zip(self._start, self._global, strict=True)
                )
            ),
            "round_forming_began_at": self.round_began_at
            if self._forming is not None
            else self._resume_forming_at,
            "finished_at_step": self._finished_at,
            # Its progress is still to be averaged: a peer killed before the next round still
            # owes it one after its last step.
            "round_failed": self._round_failed,
            "round_attempt": self.round_attempt,
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
                estimate = tensors.get(f"estimate.{i}")
                if estimate is not None:
                    self._params[i].add_(tensor - estimate)
            # (the model's own buffers are its checkpoint's; a state taken from others restarts
            # the local model from this global copy)
            for i, kept in enumerate(self._global_buffers):
                saved = tensors.get(f"buffer.{i}")  # (none from a peer of before they were)
                if saved is not None:
                    kept.copy_(saved)
        self._handed = None  # (the state's own progress is the one that counts now)
        self._round_failed = meta.get("round_failed") is True
        attempt = meta.get("round_attempt", 0)
        self.round_attempt = attempt if type(attempt) is int and attempt >= 0 else 0
        self.outer_step = int(meta.get("outer_step", 0))
        self.bytes_sent = int(meta.get("bytes_sent", 0))
        self.bytes_received = int(meta.get("bytes_received", 0))
        self._local_steps = int(meta.get("local_steps", self._local_steps))
        self._steps_since_round = int(meta.get("steps_since_round", self._steps_since_round))
        self._restored_in_flight = bool(meta.get("round_in_flight", True))
        forming_at = meta.get("round_forming_began_at")
        self._resume_forming_at = (
            forming_at if type(forming_at) is int and self.config.train_while_forming else None
        )
        finished_at = meta.get("finished_at_step", self._finished_at)
        self._finished_at = finished_at if type(finished_at) is int else None
