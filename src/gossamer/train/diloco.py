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
:data:`~gossamer.train.diloco_outer_step.MAX_FAILED_ATTEMPTS` attempts of one round in a row
failed on every member, DiLoCo raises :class:`~gossamer.core.errors.AveragingStalledError` (naming
the round) instead of training on.

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
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from gossamer.obs.trace import nested_span
from gossamer.train.averaging import PendingRound, begin_round
from gossamer.train.diloco_outer_step import DiLoCoOuterStep, averaged_buffers

__all__ = ["DiLoCoStrategy"]


class DiLoCoStrategy(DiLoCoOuterStep):
    """The DiLoCo outer loop as a :class:`~gossamer.train.strategy.TrainingStrategy`.

    Args:
        config: inner steps and outer optimizer settings.
        averager: averages pseudo-gradients with the round's other peers.
        weight: this peer's weight in the average (e.g. its tokens per round).
    """

    name = "diloco"

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
        if self._took_final_state():
            # The others' final state: no round of theirs follows it, and none of this peer's
            # (begun alone, it moved the weights past theirs); the run ends at its step.
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

    def _dropped_last_steps(self) -> None:
        """At the end, the state just taken from the others covers the run's last steps: this
        peer's own went into no round. An in-process swarm never takes state; the swarm
        strategy counts it."""

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

    def _overlapped_boundary(self) -> None:
        """Apply the previous round, restart from the new global weights, launch this round."""
        self._collect()
        weight = self.weight
        stale = self._catch_up()
        if self._took_final_state():
            # The others' state after their last round: none of theirs is left to join. Launched
            # alone, this round moved the peer an outer step past them (its progress was
            # stale: at weight 0, and the outer momentum still moved the weights); its steps
            # go with the state taken, and the run ends at the state's step.
            self._restart_local_from_global()
            return
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

    def _catch_up(self) -> bool:
        """Before a round is launched: a peer behind the others takes their state here.

        An in-process swarm never leaves a peer behind; the swarm strategy overrides this.

        Returns:
            Whether the progress since the last round was made from a state too old to count.
        """
        return False

    def _took_final_state(self) -> bool:
        """Whether the global state this peer stands on is the others' final one, taken from
        them: they published it after their last round, and no round follows it. An
        in-process swarm never takes state; the swarm strategy overrides this."""
        return False

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
        if self._took_final_state():
            # The state it took is the others' final one (marked so where they published it,
            # after their last round): its own steps went with it. Run alone, that round moved
            # it an outer step past theirs (with blocking rounds too, at weight 0: the outer
            # momentum moves the weights with no data behind it), and the peers waited for
            # each other's hashes of the final outer step to the end of the agreement's wait.
            # (A state not marked final, one whose round failed on every member or one whose
            # round was still in flight, still needs that round: the others run it in their
            # finish(), and this peer joins it. The last boundary's state goes out marked final
            # at once where nothing is left to run.)
            if took_state:
                self._dropped_last_steps()
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
        one a boundary makes, bounded by the round's own deadline, which follows its members'
        links (between ``swarm.round_timeout_s`` and ``swarm.max_round_timeout_s``: minutes on
        thin links); a round that left this peer out lands as one that did at a step end. A
        round still forming is not waited for (that waits on the slowest peer's steps): the
        checkpoint records it, and the resumed peer begins it again.

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
