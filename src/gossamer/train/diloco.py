"""DiLoCo: H local steps with the inner optimizer, then average pseudo-gradients across peers.

Each peer keeps a copy of the global weights. After every ``inner_steps`` inner steps it sends the
pseudo-gradient (global minus local weights) to the round's averager; the outer optimizer (SGD
with Nesterov momentum, learning rate 0.7 and momentum 0.9 as in the DiLoCo paper, Douillard et al.
2023, arXiv:2311.08105) applies the averaged pseudo-gradient to the global weights, and the local
model restarts from them. The inner optimizer's state is kept across rounds, as in the paper.

The outer momentum is warmed up (``outer_momentum_warmup``, on by default): outer step ``t``
(0-based) uses ``min(outer_momentum, t / (t + 3))``, the momentum sequence of Nesterov's
accelerated gradient method (Nesterov 1983; in this form Su, Boyd and Candes 2016,
arXiv:1503.01243), so the first outer step applies the average alone and 0.9 is reached at outer
step 27. The first pseudo-gradients of a model trained from scratch are by far the largest (the
loss falls off its initial plateau) and say little about where to go next; at full momentum they
are replayed over the next ~10 rounds (7 times the first one in all, at lr 0.7 and momentum 0.9).
The paper starts most runs from a pretrained model and runs over a hundred outer steps, where
this hardly shows; a short run from scratch loses whole rounds to it (4 peers, H = 50, small GPT:
validation loss 2.47 instead of 2.27 after 8 outer steps, 1.88 instead of 1.71 after 40).

The outer learning rate stays the paper's 0.7 by default. For 4 peers at H = 50 trained from
scratch, 1.0 did better or as well (2026-12-03, ``gossamer bench diloco``): small GPT, 2000
steps, validation loss 1.676 against 1.712 at 0.7 and 1.811 at 1.3 (sync 1.656, so +1.2% instead
of +3.4%); default GPT, 400 steps, 1.817 against 1.896 (sync 1.679); default GPT, 2000 steps,
1.213 against 1.215 (sync 1.135). Decaying the outer learning rate along the inner cosine
schedule did worse (small GPT, 1.807). Set it with ``swarm.outer_lr``.

Communication is once every H steps instead of every step: H = 500 sends about 500 times fewer
bytes than synchronous data parallel for the same model.

With ``train_while_forming`` (the swarm's default), a peer that reaches the H-th step does not
stop there: it begins the round (announces itself to the round's group) and keeps taking inner
steps until the group has formed, that is until the slowest awaited peer has reached its own
H-th step; then it averages the pseudo-gradient of every step it took, weighted by their number
(a peer that took more steps moved further and counts for more), and restarts from the new
global weights. A round not formed by the next boundary is waited for there, so a fast peer is
never more than H steps ahead. The steps taken while waiting are taken from the next round's H:
every peer still runs the same number of steps in all, and the run ends when the step budget
does. Instead of idling until the slowest peer arrives (on the thin-link benchmark, 4 peer
processes sharing 2 cores, up to a fifth of the wall time), the faster peers train; only the
all-reduce itself is waited for. This is how a swarm of unequal machines keeps all of them busy
(the idea behind the hivemind library's optimizer, whose peers accumulate gradients until the
swarm together reaches a target batch size: Diskin et al. 2021, Distributed Deep Learning in
Open Collaborations, arXiv:2106.10207).
The pseudo-gradients are weighted averages of progress over unequal numbers of steps; the outer
optimizer is unchanged.

With ``train_while_averaging`` as well (the swarm's default), the formed round's all-reduce runs
in the background too: the peer takes its pseudo-gradient where the group formed, hands it to a
round thread, restarts from an eager estimate of the next global weights (the outer step taken
with its own pseudo-gradient standing in for the average, as in the overlapped mode below) and
keeps taking inner steps. When the average lands (at the first step end after it is done) the
outer step is applied and the local model moves by the estimate's error, so the few steps taken
meanwhile are kept and go into the next round: like the overlapped mode, but only the steps of
one all-reduce run from the estimate, not a whole round's. A boundary waits for a round still
averaging, so rounds never overlap: training waits for the network only when one all-reduce
takes longer than the rest of the round's H steps.

With ``overlap``, a round's averaging runs in the background while the next H inner steps
compute (the idea of overlapping DiLoCo's outer step with the next inner steps: Douillard et al.
2025, Streaming DiLoCo, arXiv:2501.18512; Kale et al. 2025, eager updates, arXiv:2502.12996). At
every boundary the peer

1. takes the progress of the round that just ended (start minus local weights),
2. applies the previous round's average if it has not landed yet (waiting for it, which happens
   only when a round takes longer than H inner steps),
3. restarts the local model from an eager estimate of the next global weights: the outer step
   taken with its own progress standing in for the average that has not arrived (the eager
   update of Kale et al.; the agreed global weights move only by real averages), and
4. launches the round averaging that progress.

A round lands as soon as it is done: at the first inner step after it, the outer step is applied
to the global weights and the local model (and the start its progress is measured from) moves by
the estimate's error, the real global weights minus the estimate, so the rest of the round's
inner steps run from where the real average put the model, not from the estimate.
Training never waits for the network unless a round takes longer than H inner steps. After the
last step (:meth:`DiLoCoStrategy.finish`), a round still in flight is applied and the progress
since the last boundary is averaged in one more round, so every peer ends on the global weights.

A round that failed on every member (every all-reduce ran past its deadline, members dropped
each other, or the average was unusable, below) moved nobody's global weights: each peer takes
its progress back into the local model (with an eager estimate, the local model moves back by
the estimate, so it stands where it would have without the round) and the next round averages
it together with the steps since, formed under a key of its own (``RUN/outer/N#1``: the failed
attempt's records keep its key closed); the run's last steps are averaged by one more round
after the last step even where the step budget is a multiple of H. Across machines (see
:mod:`gossamer.train.swarm`) the swarm says whether a round failed on every member. After
:data:`MAX_FAILED_ATTEMPTS` attempts of one round in a row failed on every member, DiLoCo raises
:class:`~gossamer.core.errors.AveragingStalledError` (naming the round) instead of training on.

The average a round returns is checked before it is applied: one that holds NaN or infinite
values (a peer that sent them as they were: another build, a bug, a hostile peer; each peer
withholds its own, see :func:`~gossamer.train.averaging.withhold_if_not_finite`) is not
applied, whichever part holds them: the global weights stay, and the round counts as failed
here. Every member that received the same average skips it alike.

Floating-point buffers of the model that its ``state_dict`` keeps (BatchNorm's running
statistics) are not trained by the optimizers but change in the inner steps; each round
averages them too, weighted like the pseudo-gradients, and the average replaces the local
buffers and the global copy of them (no outer optimizer: they are statistics, not weights), so
every peer ends with the same model. Steps taken while a round averages in the background
update the local buffers, which the average then replaces. Integer buffers (BatchNorm's batch
count) stay each peer's own. The built-in GPT has no such buffers: its rounds carry exactly
its parameters' pseudo-gradients.
"""

from __future__ import annotations

import concurrent.futures
import logging
import statistics
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gossamer.core.config import SwarmConfig
from gossamer.core.errors import AveragingStalledError
from gossamer.core.hashing import sha256_state
from gossamer.obs.trace import nested_span
from gossamer.train.averaging import (
    AverageOutcome,
    PendingRound,
    TensorAverager,
    all_finite,
    begin_round,
)

__all__ = ["DiLoCoConfig", "DiLoCoStrategy", "averaged_buffers", "hashed_global_state"]

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
    overlap: bool = False
    """Average each round in the background during the next H inner steps, applied a round late."""
    outer_momentum_warmup: bool = True
    """Ramp the outer momentum up along Nesterov's sequence t / (t + 3) (capped at
    ``outer_momentum``) instead of using it from the first outer step."""
    train_while_forming: bool = False
    """Keep taking inner steps while a round's group forms; average once it has formed, each
    peer's pseudo-gradient weighted by the inner steps behind it."""
    train_while_averaging: bool = False
    """(with ``train_while_forming``) Keep taking inner steps while the formed round averages
    too; the steps taken meanwhile are kept and go into the next round."""

    def __post_init__(self) -> None:
        if self.inner_steps < 1:
            raise ValueError(f"diloco.inner_steps must be at least 1, got {self.inner_steps}")
        if self.outer_lr <= 0:
            raise ValueError(f"diloco.outer_lr must be positive, got {self.outer_lr}")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise ValueError(f"diloco.outer_momentum must be in [0, 1), got {self.outer_momentum}")
        if self.overlap and self.train_while_forming:
            raise ValueError(
                "diloco.overlap and diloco.train_while_forming exclude each other: an "
                "overlapped round never waits for its group; choose one"
            )
        if self.train_while_averaging and not self.train_while_forming:
            raise ValueError(
                "diloco.train_while_averaging needs diloco.train_while_forming: the round "
                "averages in the background only once its group has formed in the background"
            )

    def agreed_settings(self) -> dict[str, Any]:
        """The settings every peer of a run must share, by their ``swarm.`` name: those that
        change the global weights the rounds make (when rounds are due, how their averages
        are weighed and applied). Training while the round averages changes only the local
        model's path between rounds, the run name is the rounds' key already."""
        return {
            "inner_steps": self.inner_steps,
            "outer_lr": self.outer_lr,
            "outer_momentum": self.outer_momentum,
            "outer_momentum_warmup": self.outer_momentum_warmup,
            "overlap": self.overlap,
            "train_while_forming": self.train_while_forming,
        }

    @classmethod
    def from_swarm(
        cls, swarm: SwarmConfig, *, run_id: str, inner_steps: int | None = None
    ) -> DiLoCoConfig:
        """The DiLoCo settings a run's ``[swarm]`` section asks for.

        Training while the group forms and while it averages are each effective only where
        their prerequisites hold (an overlapped round never waits for its group; averaging in
        the background needs the group formed in the background), so a config that turns one
        of them off never makes the other invalid.

        Args:
            swarm: the run's swarm settings.
            run_id: names the rounds.
            inner_steps: H, when it differs from ``swarm.inner_steps`` (the bench's flag).
        """
        forming = swarm.train_while_forming and not swarm.overlap
        return cls(
            inner_steps=swarm.inner_steps if inner_steps is None else inner_steps,
            outer_lr=swarm.outer_lr,
            outer_momentum=swarm.outer_momentum,
            outer_momentum_warmup=swarm.outer_momentum_warmup,
            run_id=run_id,
            overlap=swarm.overlap,
            train_while_forming=forming,
            train_while_averaging=swarm.train_while_averaging and forming,
        )


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

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int | None:
        del optimizer
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._global = [p.detach().clone() for p in self._params]
        self._buffers = averaged_buffers(model)
        self._global_buffers = [b.detach().clone() for b in self._buffers]
        for tensor in self._global:
            tensor.requires_grad_(True)
        self._outer = torch.optim.SGD(
            self._global,
            lr=self.config.outer_lr,
            momentum=self.config.outer_momentum,
            nesterov=self.config.outer_momentum > 0,  # torch refuses Nesterov without momentum
        )
        if self._pending_state is not None:
            self._apply_state(*self._pending_state)
            self._pending_state = None
        # Progress is measured from the global weights; with overlap, from where the local model
        # stands if the peer was restored with a round in flight (lost with its process). With
        # none in flight the last round had landed and its steps since count from the global
        # weights (before, they were left out of the next round and erased from the model).
        in_flight = self._restored_in_flight
        origin = self._params if self.config.overlap and in_flight else self._global
        self._start = [t.detach().clone() for t in origin]
        return None

    def on_gradients(self, model: nn.Module, step: int) -> None:
        del model, step

    def on_step_end(self, model: nn.Module, step: int) -> int | None:
        del model
        self._steps_since_round += 1
        self._local_steps += 1
        self._finished_at = None  # (the run went on past where it finished)
        if self.config.train_while_forming:
            return self._step_end_while_forming(step)
        if (step + 1) % self.config.inner_steps != 0:
            if self._inflight is not None and self._inflight.done():
                self._land()
            return None
        assert self._outer is not None, "setup() must run before training"
        self._steps_since_round = 0
        if self.config.overlap:
            self._overlapped_boundary()
            return None
        return self._round(step, None)

    def _step_end_while_forming(self, step: int) -> int | None:
        """(train while forming) Average a formed round; at a boundary, begin the next one.

        A round's group forms while the inner steps go on; the round is averaged at the first
        step end after it has formed, or at the next boundary at the latest (waiting for it
        there), so at most one round is ever forming.
        """
        h = self.config.inner_steps
        boundary = (step + 1) % h == 0
        continue_from = None
        if self._resume_forming_at is not None and self._forming is None:
            # The round that formed when the checkpoint was taken, lost with the process: the
            # others (and any peer that took this peer's state, published as of that round's
            # boundary) form it now; begun at the next boundary instead, this peer stayed a
            # round behind them to the end of the run.
            self._forming = begin_round(self.averager, self._round_key())
            self.round_began_at = self._resume_forming_at
            self._resume_forming_at = None
        if self._averaging is not None and (boundary or self._averaging.done()):
            continue_from = self._land_averaging()
        if self._forming is not None and (boundary or self._forming.ready()):
            forming, self._forming = self._forming, None
            if self.config.train_while_averaging and not boundary:
                self._launch_formed(forming)
            else:
                continue_from = self._round(step, forming)
        if boundary:
            resynced_to = self._catch_up_before_round()
            continue_from = resynced_to if resynced_to is not None else continue_from
        elif self._forming is None and self._averaging is None and continue_from is None:
            continue_from = self._catch_up_between_boundaries(step)
            if continue_from is None and self._joins_running_round(step):
                # The others began this peer's round at their boundary, which its own steps
                # have not reached (its place on the step grid came with a state it took): it
                # forms the round now with the steps it took, and goes on from the step after
                # that boundary, as they do. Waiting for its own boundary, it came as late
                # as it was behind, after their join window, round after round.
                boundary_at = step + h - 1 - step % h
                self._forming = begin_round(self.averager, self._round_key())
                self.round_began_at = boundary_at
                return boundary_at + 1
        if self._forming is not None:
            return continue_from
        if continue_from is None:
            due_at = step if boundary else None
        else:
            # State taken from others is that of the step after the boundary where they began
            # the round that made it; they begin the next round H steps later. A peer not there
            # yet begins it at that boundary (not at this one: it would be a boundary ahead of
            # them); a peer already past it (it waited for the state) begins it now, late.
            due_at = continue_from - 1 + h
            if step < due_at:
                due_at = None
        if due_at is not None:
            self._forming = begin_round(self.averager, self._round_key())
            self.round_began_at = due_at
        return continue_from

    def _catch_up_between_boundaries(self, step: int) -> int | None:
        """(train while forming) Between boundaries, in no round: a peer that learns it is
        behind (the others wait for it at a round of a newer state than its own) takes their
        state now instead of at its boundary, so it trains no more steps from a state they
        left and comes to their round sooner. An in-process swarm never leaves a peer behind;
        the swarm strategy overrides this.

        Returns:
            The step to continue from if the peer took the others' state, else None.
        """
        del step
        return None

    def _joins_running_round(self, step: int) -> bool:
        """(train while forming) Between boundaries, in no round: whether the others of the
        run are forming this peer's round (the one of its outer step) already, at a boundary
        its steps have not reached, so that it joins that round now with the steps it took.
        An in-process swarm never leaves a peer off the others' step grid; the swarm strategy
        overrides this.

        Args:
            step: the inner step just taken.
        """
        del step
        return False

    def _took_state_as_of(self, step: int) -> bool:
        """Whether the global state this peer stands on was taken from the others as of step
        ``step`` or later (so their rounds up to that step are in it, and the local model
        restarted from it after). An in-process swarm never takes state; the swarm strategy
        overrides this.

        Args:
            step: the step the run ends at.
        """
        del step
        return False

    def _catch_up_before_round(self) -> int | None:
        """(train while forming) Before a round begins: a peer behind the others takes their
        state here. An in-process swarm never leaves a peer behind; the swarm strategy
        overrides this.

        Returns:
            The step to continue from if the peer took the others' state, else None.
        """
        return None

    def _round(self, step: int, forming: PendingRound | None) -> int | None:
        """Average the pseudo-gradient (global minus local weights), apply the outer step and
        restart the local model from the new global weights.

        Args:
            step: the inner step just taken.
            forming: the round, if its group formed while training went on; else the round is
                formed and averaged now.

        Returns:
            The step to continue from if the swarm's state replaced this peer's, else None.
        """
        del step
        self._handed = None  # (averaged in the foreground: the local model holds its progress)
        pseudo = self._pseudo_gradient()
        version = self.outer_step
        if forming is None:
            outcome = self._average(pseudo)
        else:  # peers took different numbers of steps while the group formed: weigh by them
            weight = self.weight * self._local_steps
            outcome = forming.average(self._contribution(pseudo), weight=weight)
        self._apply_outcome(outcome, waited_s=None)
        if self.outer_step != version:  # (not applied: the local model keeps its progress)
            self._restart_local_from_global()
        return None

    def _launch_formed(self, forming: PendingRound) -> None:
        """(train while averaging) Average the formed round in the background.

        The pseudo-gradient is taken now and the local model restarts from an eager estimate of
        the next global weights (this peer's pseudo-gradient standing in for the average, as
        with ``overlap``), so the steps taken while the round averages start near where the
        average will put the model; when it lands, the model moves by the estimate's error.
        """
        pseudo = self._pseudo_gradient()
        contribution = self._contribution(pseudo)
        self._restart_with_progress(pseudo)
        self._handed, self._handed_steps = pseudo, self._local_steps
        weight, self._local_steps = self.weight * self._local_steps, 0
        self._averaging = self._round_thread().submit(forming.average, contribution, weight=weight)

    def _land_averaging(self) -> int | None:
        """(train while averaging) Apply the round averaging in the background (waiting for
        it if it is not done) and move the local model by the new global weights minus the
        estimate it restarted from, keeping the steps taken since.

        Returns:
            The step to continue from if the swarm's state replaced this peer's, else None.
        """
        averaging, self._averaging = self._averaging, None
        assert averaging is not None
        started = time.monotonic()
        with nested_span("waiting", what="round_in_flight"):
            outcome = averaging.result()
        self._apply_outcome(outcome, waited_s=time.monotonic() - started)
        # Excluded, the global weights did not move and the progress handed over went into no
        # average (the swarm strategy takes the others' state next): the steps since are kept
        # on the global weights alike.
        self._move_by_start_error()
        return self._after_averaging()

    def _after_averaging(self) -> int | None:
        """(train while averaging) After a round landed; the swarm strategy publishes its state
        and checks agreement here.

        Returns:
            The step to continue from if the swarm's state replaced this peer's, else None.
        """
        return None

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

    def _overlapped_boundary(self) -> None:
        """Apply the previous round, restart from the new global weights, launch this round."""
        self._collect()
        weight = self.weight
        stale = self._catch_up()
        # (taken after: a state taken moves the local model and its start alike, and a round
        # that failed on every member gave its progress back to the local model)
        progress = self._progress()
        if stale:  # progress made from a state too old to count: restart without it
            progress = [torch.zeros_like(t) for t in progress]
            weight = 0.0
        self._restart_with_progress(progress)
        self._launch(progress, weight)

    def _collect(self) -> None:
        """Wait for the round in flight, if any, and apply its outer step."""
        if self._inflight is None:
            return
        inflight, self._inflight = self._inflight, None
        started = time.monotonic()
        with nested_span("waiting", what="round_in_flight"):
            outcome = inflight.result()
        self._apply_outcome(outcome, waited_s=time.monotonic() - started)

    def _land(self, waited_s: float = 0.0) -> None:
        """(overlap) Apply the round in flight as soon as it is done, before the next boundary.

        The local model restarted from an eager estimate of these global weights; it is moved by
        the estimate's error (the real global weights minus the estimate), so the rest of the
        round's inner steps run from where the real average put the model. Its progress is still
        measured from the same start, moved alike. An excluded round moves nothing: the boundary
        takes the others' state.
        """
        inflight, self._inflight = self._inflight, None
        assert inflight is not None
        version = self.outer_step
        self._apply_outcome(inflight.result(), waited_s=waited_s)
        if self.outer_step != version:
            self._move_by_start_error()

    def _move_by_start_error(self) -> None:
        """Move the local model, and the start its progress is measured from, by the global
        weights minus that start (the error of the estimate it restarted from), keeping the
        steps taken since."""
        with torch.no_grad():
            for param, start, tensor in zip(self._params, self._start, self._global, strict=True):
                param.add_(tensor - start)
                start.copy_(tensor)

    def _catch_up(self) -> bool:
        """Before a round is launched: a peer behind the others takes their state here.

        An in-process swarm never leaves a peer behind; the swarm strategy overrides this.

        Returns:
            Whether the progress since the last round was made from a state too old to count.
        """
        return False

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

    def _round_thread(self) -> ThreadPoolExecutor:
        """The thread background rounds run on (made at the first)."""
        if self._rounds is None:
            self._rounds = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gossamer-round")
        return self._rounds

    def _launch(self, progress: list[torch.Tensor], weight: float) -> None:
        key = self._round_key()
        self._handed, self._handed_steps = progress, 0  # (overlap weighs no steps)
        self._inflight = self._round_thread().submit(
            self.averager.average, self._contribution(progress), round_key=key, weight=weight
        )

    @property
    def round_in_flight(self) -> bool:
        """(overlap) Whether a round launched by this peer has not been applied yet."""
        return self._inflight is not None

    def finish(self, model: nn.Module, step: int) -> bool:
        """Average what is not averaged yet, so the peer ends on the global weights.

        A round still in flight is applied; progress since the last round (the last steps when
        the step budget is not a multiple of H, or the last round's with ``overlap``) goes
        through one more round. Every peer of a run ends at the same step, so all of them run
        that round or none.

        Returns:
            Whether the model's weights changed.
        """
        del model
        if self._outer is None:
            return False
        forming_mode = self.config.train_while_forming
        if self._resume_forming_at is not None and self._forming is None:
            # Restored from a checkpoint taken while a round formed, at the end (no step end
            # left to begin it again): it is the last round, the one the others run in their
            # finish(). Skipped, this peer's last steps were dropped and it ended a round behind.
            self._forming = begin_round(self.averager, self._round_key())
            self.round_began_at = self._resume_forming_at
            self._resume_forming_at = None
        # While forming, a peer may have jumped over a boundary (it took the swarm's state of a
        # later step), so the step grid, the same for every peer, says whether a last round
        # is due (unless this step's finish() ran already: a finished run run again); else the
        # steps counted since the last boundary do.
        if forming_mode:
            tail = step % self.config.inner_steps != 0 and self._finished_at != step
        else:
            tail = self._steps_since_round > 0
        replaced = (
            self._inflight is not None
            or self._forming is not None
            or self._averaging is not None
            or tail
        )
        version = self.outer_step
        if self._averaging is not None:
            self._land_averaging()
        if self._forming is not None:
            forming, self._forming = self._forming, None
            self._round(step, forming)
        self._collect()
        caught_up_from = self.outer_step
        stale = self._catch_up()
        took_state = self.outer_step != caught_up_from
        # A round that failed on every member left its progress to average: every member
        # knows it alike, and runs one more round for it (on a grid step too).
        tail = tail or (self._round_failed and self._finished_at != step)
        if forming_mode and tail and self._took_state_as_of(step):
            # The state it took is the others' after their last round, the one after their
            # last step (this one): its own steps went with it. Run alone, that round moved
            # it an outer step past theirs, and the peers waited for each other's hashes of
            # the final outer step to the end of the agreement's wait.
            tail = False
        replaced = replaced or tail or self.outer_step != version
        if tail:
            self._steps_since_round = 0
            weight = self.weight
            if forming_mode:  # peers ended the last round at different steps: weigh by them
                weight *= self._local_steps
            elif took_state and (stale or not self.config.overlap):
                # Its progress went with the state it took (blocking: the local model restarted
                # from it), or was made from a state too old to count: it joins the round with
                # nothing to add (a zero pseudo-gradient at full weight halved the others' last
                # outer step with two peers).
                weight = 0.0
            # While forming, the last round may have taken in every step already (it formed
            # after the last one), so this one may carry nothing: it is applied without the
            # outer momentum, which would otherwise move the weights with no data behind it.
            self._apply_outcome(
                self._average(self._progress(), weight), waited_s=None, plain=forming_mode
            )
            if self.last_round_excluded:
                self._catch_up()
        self._restart_local_from_global()
        self._finished_at = step
        return replaced

    def land_before_pause(
        self, model: nn.Module, step: int, announce: Callable[[str], None]
    ) -> int | None:
        """A stop pauses the run: land the round averaging in the background first, so the
        checkpoint written next holds it.

        Checkpointed in flight, the round was lost: the resumed peer came back onto the old
        global weights (its H steps gone) although it was paused, not killed. The wait is the
        one a boundary makes, bounded by the averager's round timeout; a round that left this
        peer out lands as one that did at a step end. A round still forming is not waited
        for (that waits on the slowest peer's steps): the checkpoint records it, and the
        resumed peer begins it again.

        Args:
            model: the model being trained.
            step: the step the run pauses at.
            announce: told what is waited for, before the wait.

        Returns:
            None where no round was in flight; else the step the run stands at after it
            landed (a later one where the peer took the swarm's state).
        """
        del model
        if self._averaging is None and self._inflight is None:
            return None
        announce(f"the DiLoCo round of outer step {self.outer_step + 1}, averaging")
        continue_from: int | None = None
        if self._averaging is not None:
            continue_from = self._land_averaging()
        if self._inflight is not None:
            started = time.monotonic()
            with nested_span("waiting", what="round_in_flight"):
                concurrent.futures.wait([self._inflight])
            self._land(waited_s=time.monotonic() - started)
        return step if continue_from is None else max(step, continue_from)

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

    def abandon(self) -> None:
        """(optional hook) A second stop: :meth:`close` leaves the round under way instead of
        waiting for it (it waited out the round, up to minutes, after the user asked to stop
        at once; the node's closing, next, ends the round's work)."""
        self._abandoned = True

    def close(self) -> None:
        if self._forming is not None:
            self._forming.cancel()
            self._forming = None
        if self._rounds is not None:
            self._rounds.shutdown(wait=not self._abandoned, cancel_futures=self._abandoned)
