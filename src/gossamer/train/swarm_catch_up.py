"""How a swarm DiLoCo peer that is behind the others catches up with their state.

:class:`SwarmCatchUp` (a layer of :class:`~gossamer.train.swarm_diloco.SwarmDiLoCoStrategy`)
decides when to take the others' state and waits for it: after a round this peer missed (unless
the round failed on every member), when the others publish a newer version than this peer's
(it restarted from an older checkpoint, say), when it joined with a round in flight that it is
not in, and, with ``train_while_forming``, between boundaries where the others wait for it at a
round of a newer state; and whether a peer placed by a state it took joins the round of its
outer step before its own boundary.
"""

from __future__ import annotations

import logging
import time

from gossamer.core.errors import GossamerError
from gossamer.obs.trace import nested_span
from gossamer.train.state_sync import StateSnapshot
from gossamer.train.swarm_state_exchange import SwarmStateExchange

__all__ = ["SwarmCatchUp"]

logger = logging.getLogger(__name__)
_NEWER_STATE_WAIT_S = 30.0
_NEWER_STATE_POLL_S = 0.2
"""How often a peer waiting for a newer state reads the round's fate and the run's versions."""
_EARLY_CATCH_UP_EVERY_S = 2.0
"""Least time between two downloads tried between boundaries (see
``_catch_up_between_boundaries``): nudges come from any peer."""
_JOIN_CHECK_EVERY_S = 0.5
"""Least time between two reads of a round's entries by a peer nudged for its own round
between boundaries (see ``_joins_running_round``)."""


class SwarmCatchUp(SwarmStateExchange):
    """Takes the others' state where this peer is behind them (see the module docstring)."""

    _missed_before_catch_up = False
    """The last :meth:`_catch_up` took a state after a round that closed without this peer
    (the progress it gave that round went into no average)."""

    def _wait_for_newer_state(self) -> StateSnapshot | None:
        """After a missed round: the state the others publish once it is done.

        Stops early when no other peer of the run is active any more (they finished or are
        gone): nobody is left to publish a newer state; and when this peer's last round failed
        on every member (nobody's state moved): it keeps its progress for the next attempt
        (see :meth:`_keep_failed_round`; it waited for a state nobody would publish, and the
        next round it formed reused the failed one's key, closed: no averaging for the rest
        of the run).

        Waits ``_NEWER_STATE_WAIT_S``, and where this peer missed the round, for as long as a
        member that said neither that the round failed on it nor left may still be in it
        (see :meth:`SwarmAverager.round_fate`), and ``_NEWER_STATE_WAIT_S`` after: given up
        sooner, this peer came back to the failed round's closed key at its next boundary
        while such a member, whose all-reduce failed later, formed the next attempt there;
        the two went on a boundary apart and ended an outer step apart. On every path (a
        missed round or not), a download is tried where the run's versions (those of peers
        of this peer's settings) say a newer state is out than the last try found, and every
        ``_EARLY_CATCH_UP_EVERY_S`` besides (a version not announced yet, or not read), not at
        every poll: each took a whole state, and a peer behind only by an odd peer's versions
        (another H) downloaded its refused state every 0.2 s for the whole wait. A try that
        brought no state (no donor answered, or a donor's circuit breaker was open) does not
        count as one for the version: it is tried again after ``_NEWER_STATE_POLL_S``, then
        twice as long each time up to ``_EARLY_CATCH_UP_EVERY_S`` (counted, it waited for
        the 2 s timer after a failure that a retry a moment later would have got past).
        """
        deadline = time.monotonic() + _NEWER_STATE_WAIT_S
        key = self._round_key()
        missed = self.last_round_excluded
        next_download_s = 0.0
        tried_newest = self.outer_step  # (the newest version a state came for at the last try)
        retry_at_s = 0.0  # (when a version no state came for yet may be tried again)
        retry_after_s = _NEWER_STATE_POLL_S
        told_undecided: tuple[str, ...] = ()
        with nested_span("waiting", what="newer_state"):  # its downloads nest as "sync"
            while time.monotonic() < deadline:
                fate = self.swarm_averager.round_fate(key) if missed else None
                newest = (
                    fate.newest_version
                    if fate is not None
                    else self.swarm_averager.newest_version()
                )
                newer = newest is not None and newest > tried_newest
                if time.monotonic() >= (retry_at_s if newer else next_download_s):
                    next_download_s = time.monotonic() + _EARLY_CATCH_UP_EVERY_S
                    received_before = self._states_received
                    snapshot = self._download(version=None)
                    if snapshot is not None and snapshot.version > self.outer_step:
                        return snapshot
                    if self._states_received > received_before:  # a state came (refused, or
                        # an older one most donors still hold): not again for this version
                        tried_newest = max(tried_newest, newest if newest is not None else -1)
                        retry_after_s = _NEWER_STATE_POLL_S
                    else:
                        retry_at_s = time.monotonic() + retry_after_s
                        retry_after_s = min(2 * retry_after_s, _EARLY_CATCH_UP_EVERY_S)
                if fate is not None and fate.undecided_for_s > 0:
                    wait_until = time.monotonic() + fate.undecided_for_s + _NEWER_STATE_WAIT_S
                    if wait_until > deadline and fate.undecided != told_undecided:
                        told_undecided = fate.undecided
                        logger.info(
                            "peer %s missed round %s; %s said neither that it failed there nor "
                            "left: waiting up to %.0f s for its state or its word",
                            self._short(),
                            key,
                            ", ".join(p[:8] for p in fate.undecided),
                            wait_until - time.monotonic(),
                        )
                    deadline = max(deadline, wait_until)
                if fate is not None and fate.failed_everywhere:
                    self._keep_failed_round()
                    logger.warning(
                        "peer %s: round %s failed on every member (nobody's state moved); it is "
                        "formed again as %s, with this peer's progress in it",
                        self._short(),
                        key,
                        self._round_key(),
                    )
                    return None
                if not self._others_active():
                    logger.warning(
                        "peer %s: no other peer of the run is active; it goes on alone",
                        self._short(),
                    )
                    return None
                time.sleep(_NEWER_STATE_POLL_S)
        return None

    def _others_active(self) -> bool:
        """Whether another peer of the run is active, not known to use other settings (True
        when the DHT cannot be read): one that may publish a state this peer takes."""
        try:
            states = self.swarm_averager.run_states()
        except GossamerError:
            return True
        odd = self.swarm_averager.other_settings_peers
        return any(state == "active" and p not in odd for p, (state, _) in states.items())

    def _catch_up_before_round(self) -> int | None:
        """(train while forming) Take the swarm's newer state first if this peer is behind (it
        restarted from an older checkpoint, say), so it forms the round the others form; and
        one standing on a state marked final forms it after all where that marker is outvoted
        now (see :meth:`_recheck_final_state`)."""
        self._recheck_final_state()
        snapshot = self._take_newer_state()
        if snapshot is None:
            return None
        return int(snapshot.meta["step"])

    def _catch_up_between_boundaries(self, step: int) -> int | None:
        """(train while forming) Take the swarm's newer state now if the others wait for this
        peer at a round of a newer state (their nudges say so, and their published versions,
        read on the node's loop after each such nudge, agree): a newcomer that synced to the
        state one version before the others made the next would otherwise train a whole round
        from the old state before it learned, at its boundary, while they waited for it at
        theirs. One download per round key at most; nothing here reads the DHT."""
        newest = self.swarm_averager.newest_seen_version
        if newest is None or newest <= self.outer_step:
            return None
        if time.monotonic() < self._next_early_catch_up_s:
            return None
        key = self._awaited_ahead()
        if key is None:
            return None
        self._tried_ahead.add(key)
        self._next_early_catch_up_s = time.monotonic() + _EARLY_CATCH_UP_EVERY_S
        snapshot = self._take_newer_state(version=newest)
        if snapshot is None:
            return None
        return int(snapshot.meta["step"])

    def _joins_running_round(self, step: int) -> bool:
        """Whether to join the round of this peer's outer step now, before its boundary.

        A peer that took the others' state (a newcomer, or one that missed a round) goes on
        from the step after their boundary, as the state says; they are past it by the steps
        they took since (while the round that made it formed and averaged, and since it was
        published). It reached its next boundary that many steps after them; past their join
        window, their round closed without it, it took their next state, and stood as far
        behind again: a newcomer 6 steps of 2 s behind a swarm whose join window was 8 s
        never averaged with it. Nudged for the round of its own outer step (the others began it and
        wait for it there), such a peer joins it now, with its steps since the state weighted
        by their number, and goes on from their boundary's next step: it skips the steps it is
        behind, and the rounds after meet the others at theirs.

        A nudge comes from any peer: this peer joins early only once more than half of the
        run's other active peers of its settings have entered that round (their entries are
        on the DHT), so one identity alone cannot move it, and then by fewer than H steps, once
        per state taken. (Identities cost nothing: several on one host, a majority of them
        counted, can move it that far, that often.)

        Not where its boundary lies past the end of the run (``max_steps`` not a multiple of
        H): the others never reach that boundary, their last round is the one after their last
        step (see :meth:`DiLoCoStrategy.finish`), applied without the outer momentum. Joined
        early, this peer averaged it as a boundary's round, with the momentum, and went on
        from that boundary's next step, past the budget: it ended on other weights (resynced,
        its steps thrown away), at another step than the others (its checkpoint, status and a
        resumed longer run a boundary off theirs). It trains on to the last step instead and
        runs that round after it, as the others do.
        """
        if not self._placed_by_state or self._took_final_state():
            return False
        h = self.config.inner_steps
        skipped = h - 1 - step % h
        if self.max_steps is not None and step + skipped + 1 > self.max_steps:
            return False
        key = self._round_key()
        if key not in self.swarm_averager.rounds_awaiting():
            return False
        now_s = time.monotonic()
        if now_s < self._next_join_check_s:
            return False
        self._next_join_check_s = now_s + _JOIN_CHECK_EVERY_S
        try:
            active, entered = self.swarm_averager.round_entrants(key)
        except GossamerError as exc:
            logger.debug("peer %s: cannot read round %s's entries: %s", self._short(), key, exc)
            return False
        if 2 * len(entered) <= len(active):
            return False
        self._skipped_steps = skipped
        self._placed_by_state = False
        logger.info(
            "peer %s joins round %s at step %d, %d steps before its boundary: %d of the run's "
            "%d other peers are in it",
            self._short(),
            key,
            step + 1,
            self._skipped_steps,
            len(entered),
            len(active),
        )
        return True

    def _awaited_ahead(self) -> str | None:
        """A round key of a later outer step than this peer's that the others' nudges say
        waits for it, and that no download was tried for yet."""
        prefix = f"{self.config.run_id}/outer/"
        awaiting = self.swarm_averager.rounds_awaiting()
        self._tried_ahead &= set(awaiting)  # (the averager keeps the latest few)
        for key in awaiting:
            # (``N#A``: the A-th attempt of outer step N's round)
            number = key[len(prefix) :].partition("#")[0] if key.startswith(prefix) else ""
            if not (number.isascii() and number.isdigit()) or key in self._tried_ahead:
                continue
            if int(number) > self.outer_step:
                return key
        return None

    def _take_newer_state(self, *, version: int | None = None) -> StateSnapshot | None:
        """If the others publish a newer version than this peer's, take their state.

        Args:
            version: the version to take (read by the caller), instead of the newest most
                donors hold where the last round's formation read a newer one than this peer's.

        Returns:
            The state taken, or None when this peer is not behind or no donor served it.
        """
        if version is None and self._newest_version() <= self.outer_step:
            return None
        snapshot = self._download(version=version)
        if snapshot is None or snapshot.version <= self.outer_step:
            return None
        self._apply_snapshot(snapshot)
        self._resynced()
        logger.warning(
            "peer %s was behind the swarm; took its state at outer step %d",
            self._short(),
            self.outer_step,
        )
        return snapshot

    def _catch_up(self) -> bool:
        """Take the others' newer state before launching a round (overlap) or at the end, if behind.

        A peer is behind when its last round closed without it, when it joined with a round in
        flight that it is not in, or when the others publish a newer version (it restarted from
        an older checkpoint, say). Progress made from a state more than one round old does not
        count. (First, a state marked final that this peer stands on is weighed again: see
        :meth:`_recheck_final_state`. Outvoted, it has this peer run the round after it.)
        """
        self._recheck_final_state()
        self._missed_before_catch_up = False
        behind = (
            self.last_round_excluded
            or self._joined_mid_round
            or self._newest_version() > self.outer_step
        )
        if not behind:
            return False
        was = self.outer_step
        missed = self.last_round_excluded
        self._joined_mid_round = False
        snapshot = self._wait_for_newer_state()
        if snapshot is None:
            if missed and not self.last_round_excluded:  # failed on every member: not behind
                return False
            logger.warning("peer %s is behind but no newer state came; goes on", self._short())
            return False
        self._apply_snapshot(snapshot)
        self.last_round_excluded = False
        self._continue_from = int(snapshot.meta["step"])
        stale = snapshot.version > was + 1
        self._missed_before_catch_up = missed
        # (taken at a boundary, the others' final state leaves no round for this peer's
        # progress: see DiLoCoStrategy._overlapped_boundary)
        self._work_lost = missed or stale or self._took_final_state()
        # (without overlap, only finish() calls this: the local model restarted from the state
        # taken, its steps since the last round gone, as where _take_newer_state takes one)
        if self._work_lost or not self.config.overlap:
            self._resynced()
        logger.warning(
            "peer %s was behind; took the swarm's state at outer step %d (from %d)",
            self._short(),
            self.outer_step,
            was,
        )
        return stale

    def _took_final_state(self) -> bool:
        """Whether the global state this peer stands on is the others' final one: a state its
        donors marked final (published from their finish(), after their last round; see
        :meth:`_snapshot`), with no round of this peer's applied since and none owed (a round
        that failed on every member is run again, and this peer's progress goes into it), and
        whose marker is not outvoted by the other peers going on past it (see
        :meth:`_final_marker_outvoted`).

        Not inferred from the state's step: a state as of ``max_steps`` may still have a
        round after it (with overlap, the last boundary's, in flight; one that failed on
        every member, run again in the others' finish()), and a run that ends before
        ``max_steps`` (a time budget) or knows none ends on a state as of an earlier step.
        """
        return (
            self._final_version is not None
            and self._final_version == self.outer_step
            and not self._round_failed
        )

    def _dropped_last_steps(self) -> None:
        """(at the end) The others' final state taken in finish() covers the run's last steps:
        this peer's own go into no round, a resync (counted in :meth:`_catch_up`). With
        overlap, those steps are not goodput either: the steps since its last boundary, and
        the last round's H where that round closed without it (at a boundary,
        :meth:`_discard_round` counts these; finish() has none after it). Without overlap,
        :meth:`_apply_snapshot` discarded them."""
        if not self.config.overlap or self.metrics is None:
            return
        lost = self._steps_since_round
        if self._missed_before_catch_up:
            lost += self.config.inner_steps
        self.metrics.goodput.discard(lost * self.tokens_per_step)

    def _newest_version(self) -> int:
        """The newest state version among the run's other active peers.

        The last round's formation read every peer's membership (and version) already; only
        before this peer's first round is a separate read needed.
        """
        seen = self.swarm_averager.newest_seen_version
        return self.swarm_averager.newest_version() if seen is None else seen
