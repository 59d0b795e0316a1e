"""DiLoCo across machines: the strategy of a swarm peer that trains with DiLoCo.

:func:`~gossamer.train.swarm.run_swarm_peer` trains with :class:`SwarmDiLoCoStrategy` where
``swarm.strategy`` is ``diloco``. Besides DiLoCo's rounds, the peer

- serves its global state to newcomers (:class:`~gossamer.train.state_sync.StateDonor`), and as a
  newcomer downloads it from several donors at once before its first step;
- after every outer step publishes a sha256 of its global weights, and compares the previous
  round's hashes with the other peers': a peer that differs from the majority resyncs from the
  peers that hold the majority's state;
- after its last step waits until every live peer of the run has published its hash of the final
  outer step and every published hash agrees, and resyncs if its own differs, so the peers end
  with the same weights (it serves its state past that wait while a peer is still fetching it);
- with ``train_while_forming``, after taking the others' state (as a newcomer, or after a
  round it missed), joins the round of its outer step as soon as they are in it, with the steps
  it took, instead of at its own boundary, which comes as many steps after theirs as they were
  past that state, unless that boundary lies past the run's last step (see
  :meth:`SwarmDiLoCoStrategy._joins_running_round`);
- after a round it missed, waits for the state the others publish, unless the round failed on
  every member (the swarm says so: :meth:`SwarmAverager.failed_everywhere`): nobody's state moved
  then, and its progress goes into the round formed again under the next attempt's key (see
  :mod:`gossamer.train.diloco`). Where one member averaged and others failed, those take its
  state, so no two peers go on from different weights;
- refuses peers whose DiLoCo settings differ (those that change the global weights: see
  :meth:`DiLoCoConfig.agreed_settings`): a newcomer whose donors' state of the run carries
  other settings stops with a :class:`ConfigError` naming the setting and both values, as for
  another model (the state of a peer new to the run, one that started at the same moment and
  never averaged with another, is no authority: that peer may be the odd one);
  the settings travel with round entries too, so peers that started together (the newcomer
  found no donor yet) never average together: a peer that holds no state of the run yet
  (never averaged with another, no such state taken, no round alone as the run's only peer)
  stops the same way at a round or state of the run once it is the odd one out (every other
  active peer uses other settings), and a peer of the run leaves the other out and warns. A
  peer of a version before the settings travelled sends none, and is not refused (nothing
  to compare).

The strategy is built in layers:
:class:`~gossamer.train.swarm_state_exchange.SwarmStateExchange` (its state, served, published,
downloaded and checked), :class:`~gossamer.train.swarm_catch_up.SwarmCatchUp` (taking the
others' state when behind) and, here, the round hooks, start, close and the final agreement.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from gossamer.core.errors import ConfigError, GossamerError
from gossamer.train.averaging import AverageOutcome, PendingRound
from gossamer.train.swarm_catch_up import SwarmCatchUp
from gossamer.train.swarm_state_exchange import (
    _SAME_SETTINGS,
    _majority_holders,
    _state_of_the_run,
)

__all__ = ["SwarmDiLoCoStrategy"]

logger = logging.getLogger(__name__)
_FINAL_AGREEMENT_S = 20.0
"""How long a peer that finished waits for the others' hashes of the final outer step (longer
while a peer fetches its state: see :meth:`SwarmDiLoCoStrategy._serving_final_state`)."""
_FINAL_SERVING_QUIET_S = 10.0
"""A peer that finished and served its final state (its manifest or a chunk) within this long,
or is sending it, stays past ``_FINAL_AGREEMENT_S``: the peer fetching it is still at it (it
asks its next chunks as soon as the last ones come)."""
_FINAL_POLL_S = 0.2
"""How often a peer waiting for the final agreement looks at the run and its hashes (each look
asks the DHT)."""
_FINAL_SERVING_POLL_S = 1.0
"""The same past ``_FINAL_AGREEMENT_S``, while it serves its final state: that can last up to
``swarm.max_round_timeout_s`` (900 s by default) for every peer that finished, and at 0.2 s
each of them asked the DHT some 4,500 times over it."""


class SwarmDiLoCoStrategy(SwarmCatchUp):
    """DiLoCo across machines: donates state, syncs as a newcomer, checks agreement.

    Args:
        config: inner steps and the outer optimizer.
        averager: averages pseudo-gradients over the swarm.
        node_thread: this peer's node.
        donor: serves this peer's global state to newcomers.
        join_existing: download the swarm's state before the first step (a bootstrap was given).
        metrics: records resyncs, state downloads, rounds and goodput (steps thrown away).
        tokens_per_step: training tokens of one inner step: this peer's weight in every average,
            and what thrown-away work is counted in.
        max_steps: the run's step budget (``train.max_steps``; None: not known here): a round
            whose boundary lies past it is the others' last round, which they run after their
            last step (see :meth:`_joins_running_round`).
    """

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int | None:
        super().setup(model, optimizer)
        self._model = model
        start_step: int | None = None
        if self.outer_step > 0:  # resumed from its checkpoint: a state of the run
            self._of_the_run = True
        if self.join_existing:
            snapshot = self._download(version=None, joining=True)
            if snapshot is not None and _state_of_the_run(snapshot):
                self._of_the_run = True  # (the run's settings, checked: whichever state it keeps)
            if snapshot is not None and snapshot.version > self.outer_step:
                self._apply_snapshot(snapshot)
                self._joined_mid_round = bool(snapshot.meta.get("round_in_flight", False))
                start_step = int(snapshot.meta["step"])
                self.time_to_productive_s = time.monotonic() - self._started
                logger.info(
                    "peer %s synced from donors at outer step %d (%.1f s)",
                    self._short(),
                    self.outer_step,
                    self.time_to_productive_s,
                )
        # A peer that resumed from its own checkpoint serves that state as of the step its
        # version begins at (as every published version is: the step after the boundary where
        # its round began); it said step 0, and a newcomer that took it from there started the
        # run over.
        # (with overlap a version is the state at the boundary after the one its round was
        # launched at: v as of step (v + 1) H, as published while training; v H put a peer that
        # took it a boundary off the others)
        boundaries = self.outer_step + (1 if self.config.overlap and self.outer_step > 0 else 0)
        self._publish(
            step=start_step if start_step is not None else boundaries * self.config.inner_steps,
            final=self._took_final_state(),
        )
        if self.swarm_metrics is not None:  # (resumed or synced: not 0 until its first round)
            self.swarm_metrics.outer_step.set(self.outer_step)
        if not self._joined_mid_round:
            self.swarm_averager.join_run(self.outer_step)  # the others' rounds wait for this peer
        # Otherwise the round in flight is not this peer's: were it active, the others would
        # wait for it there to the join window, while it waits for what that round produces.
        # It becomes active when it publishes that state, at its first boundary.
        return start_step

    def close(self) -> None:
        try:
            if not self._abandoned:  # (a second stop: nothing more is waited for)
                self._wait_for_publication()
        except Exception:  # closing on the way out of an error: that one is what counts
            logger.exception("peer %s: the last state publication failed", self._short())
        finally:
            self._publisher.shutdown(wait=not self._abandoned, cancel_futures=self._abandoned)
            super().close()  # a round still in flight ends before the run is left
            self.swarm_averager.leave_run()

    def _discard_round(self) -> None:
        """(overlap) This peer's inner steps of the last round went into no average: not
        goodput."""
        if self.metrics is not None:
            self.metrics.goodput.discard(self.config.inner_steps * self.tokens_per_step)

    def on_step_end(self, model: nn.Module, step: int) -> int | None:
        self._steps_done = step + 1
        if self._committed is None:
            self._committed = step
        self._skipped_steps = 0
        continue_from = self._step_end(model, step)
        if self._skipped_steps:  # (its steps since the state go into the round it joined)
            self._committed = (self._committed or 0) + self._skipped_steps
        elif continue_from is not None:
            self._committed = continue_from  # (the state it goes on from is the swarm's)
        return continue_from

    def _step_end(self, model: nn.Module, step: int) -> int | None:
        if self.config.train_while_forming or (step + 1) % self.config.inner_steps != 0:
            return super().on_step_end(model, step)  # its rounds call the hooks below
        if self.config.overlap:
            return self._overlapped_step_end(model, step)
        weight = self.weight
        continue_from: int | None = None
        work_lost = False
        self._recheck_final_state()  # (a marker outvoted now: this boundary's round is run)
        if self._took_final_state():
            # Trained on past the others' final state (where its own loop did not end at that
            # state's step): no round follows it, and finish() ends on it, unless the others
            # went on past it (a state marked final mid-run, a hostile donor's or one of a
            # shorter budget, that no hash of the next outer step outvoted: where none was
            # out yet, say, or the only one is a liar's). Their versions are read afresh: this
            # peer formed no round since it took that state, and the versions its last
            # formation read are as old as that (it stayed on the marked state to the end
            # while the others went on).
            newest = self.swarm_averager.newest_version()
            logger.debug(
                "peer %s at step %d stands on the others' final state (outer step %d); the "
                "newest version out is %d",
                self._short(),
                step,
                self.outer_step,
                newest,
            )
            if newest <= self.outer_step:
                return None
            snapshot = self._take_newer_state(version=newest)
            if snapshot is None:  # (no donor served it: tried again at the next boundary)
                return None
        else:
            # Behind the swarm (restarted from an older checkpoint, say): take its state and
            # join this round with a zero pseudo-gradient and no weight, so the round's result
            # is the others' and everyone applies the same outer step.
            snapshot = self._take_newer_state()
        if snapshot is not None:
            taken_at = int(snapshot.meta["step"])
            if self._took_final_state():
                # The others' final state (marked so: published from their finish(), after
                # their last round): no round of theirs is left to join. Joined alone at
                # weight 0, it still moved this peer's weights (the outer momentum) an outer
                # step past theirs; and the run went on past their end (from the state's step
                # + H). It ends where they did, at that state's step, while it stands on
                # that state (self.max_steps stays the run's budget: a later state not marked
                # final, a hostile donor's marker outvoted, clamped to a stale one and put
                # this peer a boundary off the others for good). Its steps since its last
                # round went with the state taken, so finish() has none left to average.
                self._steps_since_round = 0
                return self._after_round(step, taken_at, work_lost=True)
            self.weight = 0.0
            work_lost = True
            # After this round the others stand at the step after it: so will this peer. The
            # round after the budget's last boundary is their last round, run after their
            # last step (max_steps not a multiple of H): they end there, and so does this peer.
            # (A state not marked final, as of max_steps, has a round owed after it: one that
            # failed on every member, run again in their finish(). This peer joins it.)
            continue_from = taken_at + self.config.inner_steps
            if self.max_steps is not None:
                continue_from = min(continue_from, self.max_steps)
        try:
            super().on_step_end(model, step)
        finally:
            self.weight = weight
        return self._after_round(step, continue_from, work_lost=work_lost)

    def _launch_formed(self, forming: PendingRound) -> None:
        self._launched_at, self._handed_over = self._steps_done, True
        self._placed_by_state = False  # (taken again where this round goes on without it)
        super()._launch_formed(forming)

    def _apply_outcome(
        self, outcome: AverageOutcome, *, waited_s: float | None, plain: bool = False
    ) -> None:
        if not outcome.excluded and outcome.group_size > 1:
            self._of_the_run = True  # (its members share its settings: the others are left out)
        self._refuse_other_settings()
        if not outcome.excluded and not self.swarm_averager.other_settings:
            self._of_the_run = True  # (alone: the run's only peer so far)
        super()._apply_outcome(outcome, waited_s=waited_s, plain=plain)

    def _refuse_other_settings(self) -> None:
        """Stop where rounds found peers with other DiLoCo settings, this peer is new to the
        run (see :meth:`_new_to_run`), and it is the odd one out: every other active peer of
        the run uses other settings, as a newcomer whose donors' state of the run says so
        stops (the peers started together, and this one found no donor to compare with). Where
        an active peer is not known to use other settings, it may share this one's: their
        rounds pair them next, and they are the run (before, an honest peer whose first round
        did not pair with another of its settings, having come a moment late, stopped for one
        odd peer). A peer of the run leaves the others out (the averager warned); two new ones
        alone with each other both stop.

        Raises:
            ConfigError: the settings differ, this peer is new to the run and the odd one out.
        """
        others = self.swarm_averager.other_settings
        if not others or not self._new_to_run():
            return
        try:
            states = self.swarm_averager.run_states()
        except GossamerError as exc:  # (decided at a later round)
            logger.warning("peer %s: cannot read the run's members: %s", self._short(), exc)
            return
        active = {p for p, (state, _) in states.items() if state == "active"}
        if active - set(others):
            return
        peer, differs = next(iter(others.items()))
        raise ConfigError(
            f"swarm: peer {peer[:8]} of run {self.config.run_id!r} uses other DiLoCo settings "
            f"than this peer ({differs}), and this peer holds no state of the run yet; "
            f"{_SAME_SETTINGS}"
        )

    def _skip_unusable_round(self, outcome: AverageOutcome) -> None:
        """The average holds NaN or infinite values: not applied (the global weights stay),
        and the round counts as failed here, as a failed all-reduce does: this peer waits for
        the state of any member that applied another average, or, where the round failed on
        every member (each that received this average skips it alike), keeps its progress
        for the round formed again."""
        logger.warning(
            "peer %s: round %s (outer step %d, %d peers): the average holds NaN or infinite "
            "values (a peer sent them as they were); it is not applied, the global weights stay",
            self._short(),
            self._round_key(),
            self.outer_step + 1,
            outcome.group_size,
        )
        self.swarm_averager.report_failed(self._round_key())
        self.last_round_excluded = True

    def _round(self, step: int, forming: PendingRound | None) -> int | None:
        self._launched_at, self._handed_over = step + 1, False
        self._placed_by_state = False  # (taken again where this round goes on without it)
        continue_from = super()._round(step, forming)
        if forming is None:  # a blocking boundary: on_step_end does the rest
            return continue_from
        return self._after_round(self.round_began_at, continue_from, work_lost=False)

    def _after_averaging(self) -> int | None:
        return self._after_round(self.round_began_at, None, work_lost=False)

    def _after_round(
        self, boundary: int, continue_from: int | None, *, work_lost: bool
    ) -> int | None:
        """After a round: take the swarm's state if this peer missed it, publish this outer
        step's state and hash, and resync if the last outer step's hash was not the majority's.

        Args:
            boundary: the step at whose end the round began. The state is published as that
                of the step after it, whenever the round ended (while forming, some steps
                later), so a peer that takes it begins its next round at the same boundary as
                the others, not one boundary late.
            continue_from: the step to continue from, if the caller already took the swarm's
                state.
            work_lost: whether this peer's progress went into no average.

        Returns:
            The step to continue from if the swarm's state replaced this peer's, else
            ``continue_from``.
        """
        if not self.last_round_excluded and not work_lost and self.weight > 0:
            self._committed = max(self._committed or 0, self._launched_at)
        if self.last_round_excluded:
            snapshot = self._wait_for_newer_state()
            if snapshot is None and self.last_round_excluded and self._handed_over:
                # (its progress went to the round alone, and the round went on without it; a
                # round that failed on every member gave it back: not discarded)
                self._discard_uncommitted(self._launched_at)
            if snapshot is not None:
                self._apply_snapshot(snapshot)
                self.last_round_excluded = False  # caught up: nothing more to wait for
                self._resynced()
                continue_from = int(snapshot.meta["step"])
                logger.warning(
                    "peer %s missed a round; took the swarm's state at outer step %d",
                    self._short(),
                    self.outer_step,
                )
        if self.swarm_metrics is not None:
            self.swarm_metrics.outer_step.set(self.outer_step)
        as_of = continue_from if continue_from is not None else boundary + 1
        self._publish_outer_step(step=as_of, final=self._ends_run_at(as_of))
        majority_holders = self._out_of_agreement(self.outer_step - 1)
        if majority_holders:
            snapshot = self._download(version=None, donors=majority_holders)
            if snapshot is not None:
                self._apply_snapshot(snapshot)
                self._resynced()
                continue_from = int(snapshot.meta["step"])
                logger.warning(
                    "peer %s differed from the swarm; resynced at outer step %d",
                    self._short(),
                    self.outer_step,
                )
                self._publish_outer_step(step=continue_from, final=self._ends_run_at(continue_from))
        return continue_from

    def _ends_run_at(self, step: int) -> bool:
        """Whether the state this peer publishes after a round, as of ``step``, is its final
        one: it took the others' final state, or the round just landed was its last (the
        state is as of the step budget, and no round is in flight, forming or owed after it).

        Marked final at once, not only where finish() publishes it again: with ``max_steps``
        a multiple of H and blocking rounds, the last boundary's state was published unmarked
        first (the last checkpoint is saved before finish()), and a late peer that took it
        ran the last round again alone at weight 0 and ended an outer step past the others.

        Args:
            step: the step the state is published as of.
        """
        if self._took_final_state():
            return True
        return (
            self.max_steps is not None
            and step >= self.max_steps
            and not self.config.overlap  # (its boundaries publish with the round in flight)
            and not self._round_failed
            and not self.last_round_excluded
            and self._forming is None
            and self._averaging is None
            and self._inflight is None
        )

    def _overlapped_step_end(self, model: nn.Module, step: int) -> int | None:
        """A boundary with overlap: the base class applies and launches; then publish and check."""
        self._continue_from = None
        self._work_lost = False
        super().on_step_end(model, step)  # calls _catch_up() between applying and launching
        if self._work_lost:
            self._discard_round()
        if self.swarm_metrics is not None:
            self.swarm_metrics.outer_step.set(self.outer_step)
        continue_from = self._continue_from
        self._publish_outer_step(
            step=continue_from if continue_from is not None else step + 1,
            final=self._took_final_state(),
        )
        majority_holders = self._out_of_agreement(self.outer_step - 1)
        if majority_holders:
            # The same version only: the round in flight was launched from it.
            snapshot = self._download(version=self.outer_step, donors=majority_holders)
            if snapshot is not None:
                self._apply_snapshot(snapshot)
                self._resynced()
                logger.warning(
                    "peer %s differed from the swarm; resynced at outer step %d",
                    self._short(),
                    self.outer_step,
                )
                self._publish_outer_step(
                    step=int(snapshot.meta["step"]), final=self._took_final_state()
                )
        return continue_from

    def finish(self, model: nn.Module, step: int) -> bool:
        """End with the swarm's weights: wait for every live peer's hash of the final outer step.

        Mid-run, a divergence found after one outer step is repaired after the next; after the
        last there is no next. So each peer waits, up to ``_FINAL_AGREEMENT_S``, until every live
        peer of the run has published its hash of this final outer step and every hash published
        for it agrees (a peer the failure detector lost for a moment included). A peer whose
        hash is not the majority's downloads that state from the peers holding it and publishes
        again; the others keep serving until they see it agree. A peer that missed the
        last round is waited for too: it is fetching the others' state meanwhile.

        Past that wait, a peer stays while a peer is still fetching its final state (see
        :meth:`_serving_final_state`): behind a thin link the download takes longer than the
        wait (a 10 MB state over 2 Mbit/s, 40 s), and its donors left mid-download, their
        state gone with them, so the peer fetching it ended on its own weights. A peer that
        serves nobody leaves at the wait, as before.
        """
        replaced = super().finish(model, step)
        self._wait_for_publication()
        # Marked final: this peer runs no round after it. A peer behind that takes it ends on
        # it, and one that takes a state not so marked joins the round still owed after it
        # (republished where the last publication was of this outer step, but not final:
        # the last boundary's, when max_steps is a multiple of H, where this peer knows no
        # max_steps or a time budget ended the run there; see _ends_run_at).
        if replaced or self.outer_step not in self._hashes or not self._published_final:
            self._publish_outer_step(step=step, final=True)
            self._wait_for_publication()
        final = self.outer_step
        started = time.monotonic()
        deadline = started + _FINAL_AGREEMENT_S
        said_serving = False
        unsettled: set[str] | None = None
        while True:
            try:
                states = self.swarm_averager.run_states()
                live = {p for p, (state, _) in states.items() if state == "active"}
                others = self._published_hashes(final)
            except GossamerError:
                live, others = None, {}
            mine = self._hashes.get(final)
            if live is not None:
                # (only run members still to agree hold this peer past its wait)
                unsettled = {p for p in live if p not in others} | {
                    p for p, theirs in others.items() if theirs != mine
                }
            # Decide only once every live peer has spoken: a partial count can tie the wrong way.
            if live is not None and live <= set(others) and mine is not None:
                holders = _majority_holders(mine, others)
                # Done when every hash published agrees, not only those of the peers the failure
                # detector calls alive now: a peer whose heartbeats were late under load is
                # still to take this state, and a peer that leaves first leaves it no donor.
                if not holders and all(theirs == mine for theirs in others.values()):
                    return replaced
                snapshot = self._download(version=final, donors=holders) if holders else None
                if snapshot is not None:
                    self._apply_snapshot(snapshot)
                    self._resynced()
                    replaced = True
                    logger.warning(
                        "peer %s ended out of agreement; took the majority's state at outer "
                        "step %d",
                        self._short(),
                        final,
                    )
                    self._publish_outer_step(step=step, final=True)
                    self._wait_for_publication()
                    continue
            if time.monotonic() >= deadline:
                serving = self._serving_final_state(final, started, unsettled)
                if serving is None:
                    logger.warning(
                        "peer %s at outer step %d: no agreement on the final weights within "
                        "%.0f s; ending with its own",
                        self._short(),
                        final,
                        time.monotonic() - started,
                    )
                    return replaced
                if not said_serving:
                    said_serving = True
                    logger.info(
                        "peer %s at outer step %d: a peer is still fetching its final state "
                        "(%s); serving it past the %.0f s wait",
                        self._short(),
                        final,
                        serving,
                        _FINAL_AGREEMENT_S,
                    )
            time.sleep(_FINAL_POLL_S if time.monotonic() < deadline else _FINAL_SERVING_POLL_S)

    def _serving_final_state(
        self, final: int, started: float, unsettled: set[str] | None = None
    ) -> str | None:
        """Why this peer, waiting for the final agreement since ``started``, stays past its
        wait: its donor is sending outer step ``final``'s state (its manifest or a chunk), or
        sent some within ``_FINAL_SERVING_QUIET_S`` (None: it served none lately, or it has
        waited ``swarm.max_round_timeout_s``, the longest a round may take over the swarm's
        links).

        What the donor serves says a peer is fetching, and making progress, with no figure for
        the link needed: a peer that stalls holds its donors no longer than the quiet
        allowance, or a reply's own deadline, and the cap holds for all of them.
        """
        idle_s = self.donor.serving_idle_s(final, unsettled if unsettled is not None else set())
        if idle_s is None or idle_s > _FINAL_SERVING_QUIET_S:
            return None
        cap_s = max(_FINAL_AGREEMENT_S, self.swarm_averager.config.max_round_timeout_s)
        if time.monotonic() - started >= cap_s:
            return None
        return "sending it now" if idle_s == 0 else f"some sent {idle_s:.1f} s ago"
