"""A training peer in a swarm: DiLoCo or synchronous data parallel across machines.

:func:`run_swarm_peer` starts this peer's node, joins the swarm through the bootstrap peers, and
trains with the configured strategy. With DiLoCo the peer also

- serves its global state to newcomers (:class:`~gossamer.train.state_sync.StateDonor`), and as a
  newcomer downloads it from several donors at once before its first step;
- after every outer step publishes a sha256 of its global weights, and compares the previous
  round's hashes with the other peers': a peer that differs from the majority resyncs from the
  peers that hold the majority's state;
- after its last step waits until every live peer of the run has published its hash of the final
  outer step and every published hash agrees, and resyncs if its own differs, so the peers end
  with the same weights;
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
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gossamer.comm.codecs import CodecPolicy
from gossamer.core.config import RunConfig
from gossamer.core.config_loader import read_secret_file
from gossamer.core.errors import ConfigError, GossamerError, PeerUnavailableError
from gossamer.core.hashing import sha256_state
from gossamer.core.stop import StopRequest
from gossamer.net.bridge import NodeThread
from gossamer.net.config import DhtConfig, HeartbeatConfig, NodeConfig
from gossamer.net.identity import held_identity, short_peer_id
from gossamer.net.metrics import register_net_metrics
from gossamer.net.node import Node
from gossamer.obs.goodput import GoodputTracker
from gossamer.obs.metrics import PeerMetrics, SwarmMetrics
from gossamer.obs.trace import SpanRecorder, nested_span
from gossamer.store.lease import directory_lease
from gossamer.train.averaging import AverageOutcome, PendingRound
from gossamer.train.diloco import DiLoCoConfig, DiLoCoStrategy, hashed_global_state
from gossamer.train.loop import (
    ModelFactory,
    ProgressEvent,
    Trainer,
    TrainingListener,
    TrainResult,
)
from gossamer.train.state_sync import StateSnapshot
from gossamer.train.state_sync_donor import StateDonor
from gossamer.train.strategy import TrainingStrategy
from gossamer.train.swarm_averager import SwarmAverager
from gossamer.train.swarm_averager_config import SwarmAveragerConfig
from gossamer.train.swarm_round_records import read_json_records, settings_difference
from gossamer.train.swarm_sync import (
    SwarmSyncStrategy,
    download_from_donors,
    meta_bytes_bound,
    state_bytes_bound,
)

__all__ = [
    "ListenerGroup",
    "ObservedAverager",
    "StatusFileListener",
    "SwarmDiLoCoStrategy",
    "SwarmPeerResult",
    "run_swarm_peer",
    "stream_seed_of",
    "swarm_averager_config",
    "swarm_node_config",
]

logger = logging.getLogger(__name__)
_BOOTSTRAP_WAIT_S = 30.0
"""How long a swarm peer given bootstrap peers tries them before it gives up (and trains
nothing)."""

_HASH_TTL_S = 600.0
_NEWER_STATE_WAIT_S = 30.0
_NEWER_STATE_POLL_S = 0.2
"""How often a peer waiting for a newer state reads the round's fate and the run's versions."""
_FINAL_AGREEMENT_S = 20.0
"""How long a peer that finished waits for the others' hashes of the final outer step."""
_FINAL_POLL_S = 0.2
_EARLY_CATCH_UP_EVERY_S = 2.0
"""Least time between two downloads tried between boundaries (see
``_catch_up_between_boundaries``): nudges come from any peer."""
_JOIN_CHECK_EVERY_S = 0.5
"""Least time between two reads of a round's entries by a peer nudged for its own round
between boundaries (see ``_joins_running_round``)."""


def _hash_key(run_id: str, outer_step: int) -> bytes:
    return hashlib.sha256(f"gossamer.train.hash/{run_id}/{outer_step}".encode()).digest()


class ObservedAverager:
    """A :class:`SwarmAverager` whose rounds are counted in a peer's metrics (observation only).

    Args:
        averager: does the averaging.
        metrics: where each round is recorded.
    """

    def __init__(self, averager: SwarmAverager, metrics: SwarmMetrics) -> None:
        self.averager = averager
        self.metrics = metrics
        self._policy = CodecPolicy(codec=averager.config.codec)
        self._ratios: dict[tuple[int, ...], float] = {}

    def compression_ratio(self, tensors: Sequence[torch.Tensor]) -> float:
        """float32 bytes over the codec's encoded bytes for these tensors' sizes (cached)."""
        sizes = tuple(t.numel() for t in tensors)
        ratio = self._ratios.get(sizes)
        if ratio is None:
            encoded = 0
            for numel in sizes:
                choice = self._policy.choose(numel)
                encoded += choice.codec.encoded_nbytes(numel, choice.block_size)
            ratio = 4 * sum(sizes) / encoded if encoded else 1.0
            self._ratios = {sizes: ratio}  # one shape set per run; never grows
        return ratio

    def average(
        self, tensors: list[torch.Tensor], *, round_key: str, weight: float
    ) -> AverageOutcome:
        outcome = self.averager.average(tensors, round_key=round_key, weight=weight)
        self.record(outcome, tensors)
        return outcome

    def begin(self, round_key: str) -> PendingRound:
        """Start forming ``round_key``'s group (see :meth:`SwarmAverager.begin`)."""
        return _ObservedPendingRound(self, self.averager.begin(round_key))

    def record(self, outcome: AverageOutcome, tensors: Sequence[torch.Tensor]) -> None:
        """Count a round of ``tensors`` in the metrics."""
        if outcome.excluded:
            kind = "excluded"
        elif outcome.group_size < 2:
            kind = "alone"
        elif outcome.failed_peers or outcome.missing_peers:
            kind = "shrunk"
        else:
            kind = "complete"
        self.metrics.record_round(
            seconds=outcome.seconds,
            group_size=outcome.group_size,
            outcome=kind,
            bytes_sent=outcome.bytes_sent,
            bytes_received=outcome.bytes_received,
            compression_ratio=self.compression_ratio(tensors),
            num_dropped=len(outcome.failed_peers),
            num_missing=len(outcome.missing_peers),
            backend=outcome.backend,
        )


class _ObservedPendingRound:
    """A pending round whose outcome an :class:`ObservedAverager` counts."""

    def __init__(self, observer: ObservedAverager, pending: PendingRound) -> None:
        self._observer = observer
        self._pending = pending

    def ready(self) -> bool:
        return self._pending.ready()

    def average(self, tensors: list[torch.Tensor], *, weight: float) -> AverageOutcome:
        outcome = self._pending.average(tensors, weight=weight)
        self._observer.record(outcome, tensors)
        return outcome

    def cancel(self) -> None:
        self._pending.cancel()


class SwarmDiLoCoStrategy(DiLoCoStrategy):
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

    def __init__(
        self,
        config: DiLoCoConfig,
        averager: SwarmAverager,
        node_thread: NodeThread,
        donor: StateDonor,
        *,
        join_existing: bool,
        metrics: PeerMetrics | None = None,
        tokens_per_step: int = 0,
        max_steps: int | None = None,
    ) -> None:
        swarm_metrics = metrics.enable_swarm() if metrics is not None else None
        super().__init__(
            config,
            ObservedAverager(averager, swarm_metrics) if swarm_metrics else averager,
            # Contributions count by tokens: a peer with twice the batch weighs twice as much.
            weight=float(tokens_per_step) if tokens_per_step > 0 else 1.0,
        )
        self.metrics = metrics
        self.swarm_metrics = swarm_metrics
        self.tokens_per_step = tokens_per_step
        self.swarm_averager = averager
        self.node_thread = node_thread
        self.donor = donor
        self.join_existing = join_existing
        self.max_steps = max_steps
        """The run's step budget (None: not known; see :meth:`_joins_running_round`)."""
        self.resyncs = 0
        """Times this peer found itself out of agreement and resynced."""
        self.time_to_productive_s: float | None = None
        """Seconds from start to the newcomer's state being in place (None: not a newcomer)."""
        self.state_download_bytes = 0
        """Bytes downloaded from donors."""
        self._states_received = 0
        """States donors served this peer (taken or not)."""
        self._model: nn.Module | None = None
        self._started = time.monotonic()
        self._hashes: dict[int, str] = {}
        self._publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gossamer-publish")
        """Publishes each outer step's state off the training thread, one at a time."""
        self._publishing: Future[None] | None = None
        """The last publication handed to the publisher (at most one is ever outstanding)."""
        self._tried_ahead: set[str] = set()
        """Round keys nudged ahead of this peer that it tried to catch up for (once each)."""
        self._next_early_catch_up_s = 0.0
        """Monotonic time before which no download is tried between boundaries."""
        self._joined_mid_round = False
        """(overlap) The state taken from donors has a round in flight that this peer is not in:
        before its first round it must take the state that round produces."""
        self._continue_from: int | None = None
        self._work_lost = False
        self._placed_by_state = False
        """(train while forming) This peer's place on the step grid came with a state it took
        from the others (as of the step after their boundary, which they are past by the steps
        they took since), and no round of its own was averaged since: it may join the others'
        round before its own boundary (see :meth:`_joins_running_round`)."""
        self._next_join_check_s = 0.0
        """Monotonic time before which no round's entries are read for an early join."""
        self._state_as_of = -1
        """The step the last state taken from the others was as of (-1: none taken)."""
        self._skipped_steps = 0
        """Steps of the budget skipped at this step end to join the others' round (not done:
        neither committed nor lost)."""
        # Goodput without overlap: the steps a replaced state throws away are those since the
        # last round that took this peer's progress (counted, they did not match: 10 for the
        # 17 lost after a missed background round, 10 for 7 when behind at a boundary).
        self._steps_done = 0
        """Inner steps done by the end of the step the hooks run after."""
        self._committed: int | None = None
        """Steps done up to which this peer's progress is in the swarm's state (None: set at the
        first step, after any resume or sync)."""
        self._launched_at = 0
        """Steps done when the pseudo-gradient of the last round was taken."""
        self._handed_over = False
        """The last round's progress was handed to it in the background (the local model moved
        on from an estimate): excluded, that progress is gone even with no state taken."""
        self._of_the_run = False
        """This peer has averaged with another peer of the run, taken (or compared) a state of
        the run, resumed at an outer step, or ran a round alone with no peer of other settings
        known: the run's only peer (see :meth:`_new_to_run`)."""
        averager.settings = config.agreed_settings()

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
            step=start_step if start_step is not None else boundaries * self.config.inner_steps
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

    def _short(self) -> str:
        return self.node_thread.node.peer_id[:8]

    def _others(self) -> list[str]:
        """The run's other active peers: the donors of its state (empty when the DHT cannot
        be read). Every peer a node knows also serves state, of its own run: peers of other
        runs in the same swarm would outvote this run's (a newcomer took another run's
        weights of the same shapes)."""
        try:
            states = self.swarm_averager.run_states()
        except GossamerError as exc:
            logger.warning("peer %s: cannot read the run's members: %s", self._short(), exc)
            return []
        return [peer for peer, (state, _) in states.items() if state == "active"]

    def _download(
        self, version: int | None, donors: Sequence[str] | None = None, *, joining: bool = False
    ) -> StateSnapshot | None:
        """The state most ``donors`` (the run's active peers if None) hold, or None if none
        serves it.

        A state of other DiLoCo settings that is not of the run itself (see
        :func:`_state_of_the_run`: a peer that started at the same moment as this one, and has
        neither averaged with another peer nor taken the run's state) is no authority on the
        run's settings: it is not taken, and nobody is refused for it here; the settings their
        round entries carry decide at the first rounds, where the peers that share settings
        average together and become the run, and a peer left alone with other ones stops.
        Before, whichever peer published its first state first was "the run": one peer with
        another H refused an honest majority started with it. Peers known to use other
        settings (:attr:`SwarmAverager.other_settings_peers`) are no donors where ``donors``
        is None, but at a newcomer's first download (``joining``): an odd peer's state is
        refused, and of two donors the odd one's newer version won the tie at every try.

        Raises:
            ConfigError: the donors train another model (this peer can never be of the run: it
                trained alone, saying so once in a warning, and its rounds never met the
                others'), or their state, of the run, uses other DiLoCo settings (its rounds
                came at other steps, or applied the average otherwise: it ended with other
                weights, or the two resynced each other round after round), and this peer is
                new to the run: it is ``joining`` (a newcomer's first download), or it found no
                donor then and has neither averaged with the run since nor taken its state.
                Otherwise (a donor's bug, or a liar's) the state is refused with a warning.
        """
        if donors is None:
            donors = self._others()
            if not joining:  # (a newcomer's first download: the run's other settings stop it)
                odd = self.swarm_averager.other_settings_peers
                donors = [p for p in donors if p not in odd]
        donors = list(donors)
        if not donors:
            return None

        try:
            with nested_span("sync", what="state_download"):
                snapshot, num_bytes = download_from_donors(
                    self.node_thread,
                    donors,
                    version=version,
                    max_state_bytes=state_bytes_bound(self._state_tensors()),
                    max_meta_bytes=meta_bytes_bound(self._state_tensors()),
                    metrics=self.swarm_metrics,
                )
        except GossamerError as exc:
            logger.warning("peer %s: no state from donors (%s)", self._short(), exc)
            return None
        self.state_download_bytes += num_bytes
        self._states_received += 1
        other_model = self._other_model(snapshot)
        other_settings = self._other_settings(snapshot)
        if other_settings and not other_model and not _state_of_the_run(snapshot):
            logger.warning(
                "peer %s: the donors' state of outer step %d is not taken: %s; its peer is "
                "new to the run too (it started with this one and never averaged with "
                "another), so the settings their rounds carry decide which peers are the run",
                self._short(),
                snapshot.version,
                other_settings,
            )
            return None
        other_model = other_model or other_settings
        if other_model and (joining or self._new_to_run()):
            raise ConfigError(f"swarm: {other_model}")
        unusable = other_model or self._unusable(snapshot)
        if unusable:  # verified bytes, yet not this run's state: a donor's bug, or a liar's
            logger.warning("peer %s: the donors' state is unusable: %s", self._short(), unusable)
            return None
        return snapshot

    def _unusable(self, snapshot: StateSnapshot) -> str:
        """Why ``snapshot`` cannot be taken as this run's state ('' if it can)."""
        for key in ("step", "outer_step"):
            value = snapshot.meta.get(key)
            if type(value) is not int or value < 0:
                return f"meta {key!r} is {value!r}, not a step"
        for key in ("round_in_flight", "of_the_run"):
            if not isinstance(snapshot.meta.get(key, False), bool):
                return f"meta {key!r} is not a boolean"
        attempt = snapshot.meta.get("round_attempt", 0)
        if type(attempt) is not int or attempt < 0:
            return f"meta 'round_attempt' is {attempt!r}, not a count"
        other_model = self._other_model(snapshot) or self._other_settings(snapshot)
        if other_model:
            return other_model
        expected = {
            f"{kind}.{i}"
            for i in range(len(self._global))
            for kind in ("global", "momentum", "estimate")
        } | {f"buffer.{i}" for i in range(len(self._global_buffers))}
        unexpected = sorted(set(snapshot.tensors) - expected)
        if unexpected:
            shown = ", ".join(repr(n) for n in unexpected[:3])
            more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
            return (
                f"the donors' state holds tensors this peer's model of {len(self._global)} "
                f"parameter tensors has no place for ({shown}{more}): the donors train another "
                f"model; {_SAME_MODEL}"
            )
        for i, own in enumerate(self._global):
            for name in (f"global.{i}", f"momentum.{i}", f"estimate.{i}"):
                tensor = snapshot.tensors.get(name)
                if tensor is None and name == f"global.{i}":
                    return f"no tensor {name!r}"
                if tensor is not None and tensor.shape != own.shape:
                    return f"{name!r} has shape {tuple(tensor.shape)}, not {tuple(own.shape)}"
                if tensor is not None and not tensor.is_floating_point():
                    return f"{name!r} is {tensor.dtype}, not floating point"
        for i, own in enumerate(self._global_buffers):  # (none from donors of before)
            tensor = snapshot.tensors.get(f"buffer.{i}")
            if tensor is not None and (tensor.shape != own.shape or tensor.dtype != own.dtype):
                return (
                    f"'buffer.{i}' is {tensor.dtype} of shape {tuple(tensor.shape)}, not "
                    f"{own.dtype} of shape {tuple(own.shape)}"
                )
        return ""

    def _other_model(self, snapshot: StateSnapshot) -> str:
        """How the model the donors of ``snapshot`` train differs from this peer's ('' where
        it does not, or where they did not say: donors of before the signature send none)."""
        theirs = snapshot.meta.get("model_signature")
        if theirs is None:
            return ""
        differs = _signature_difference(theirs, self._model_signature())
        if not differs:
            return ""
        return f"the donors train another model than this peer ({differs}); {_SAME_MODEL}"

    def _other_settings(self, snapshot: StateSnapshot) -> str:
        """How the DiLoCo settings of the donors of ``snapshot`` differ from this peer's (''
        where they do not, or where they did not say: donors of before they travelled)."""
        theirs = snapshot.meta.get("diloco")
        if theirs is None:
            return ""
        differs = settings_difference(theirs, self.config.agreed_settings())
        if not differs:
            return ""
        return f"the donors use other DiLoCo settings than this peer ({differs}); {_SAME_SETTINGS}"

    def _state_tensors(self) -> list[torch.Tensor]:
        """The tensors whose size bounds a donor's state: the trained parameters and the
        averaged buffers (see :func:`state_bytes_bound`)."""
        return [*self._params, *self._global_buffers]

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

    def _apply_snapshot(self, snapshot: StateSnapshot) -> None:
        """Take the swarm's global state; the local model restarts from it.

        With overlap the local model moves by as much as the global weights did, so the progress
        it holds that is not averaged yet is kept.
        """
        if not self.config.overlap:  # (the local progress not in the swarm's state is gone)
            self._discard_uncommitted(self._steps_done)
        self._placed_by_state = True
        self._state_as_of = int(snapshot.meta.get("step", -1))
        if _state_of_the_run(snapshot):  # (its settings were checked: see _unusable)
            self._of_the_run = True
        before = [t.clone() for t in self._global] if self.config.overlap else []
        self._apply_state(
            snapshot.tensors,
            {k: snapshot.meta.get(k, 0) for k in ("outer_step", "round_attempt")}
            | {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received},
        )
        if not self.config.overlap:
            self._restart_local_from_global()
            return
        with torch.no_grad():
            for param, start, tensor, old in zip(
                self._params, self._start, self._global, before, strict=True
            ):
                param.add_(tensor - old)
                start.add_(tensor - old)
            for buffer, averaged in zip(self._buffers, self._global_buffers, strict=True):
                buffer.copy_(averaged)

    def _snapshot(self, step: int) -> StateSnapshot:
        tensors, _ = self.state_for_checkpoint()
        return StateSnapshot(
            version=self.outer_step,
            tensors=tensors,
            meta={
                "outer_step": self.outer_step,
                "step": step,
                "round_in_flight": self.round_in_flight,
                "model_signature": self._model_signature(),
                "diloco": self.config.agreed_settings(),
                # (a newcomer comes to the round the others form again, not to a failed one)
                "round_attempt": self.round_attempt,
                # (a state of a peer new to the run is no authority on its settings: _download)
                "of_the_run": self._of_the_run,
            },
        )

    def _model_signature(self) -> list[list[Any]]:
        """The trained parameters' names and shapes, in the order of the ``global.{i}`` tensors:
        a newcomer compares them with its own model's before it takes a state (shapes alone
        let a shallower model take a deeper one's weights, where its last ones lined up)."""
        assert self._model is not None
        return [
            [name, list(param.shape)]
            for name, param in self._model.named_parameters()
            if param.requires_grad
        ]

    def _publish(self, step: int) -> None:
        self.donor.publish(
            self._snapshot(step), max_meta_bytes=meta_bytes_bound(self._state_tensors())
        )

    def _wait_for_publication(self) -> None:
        """Wait for the outstanding publication (its errors, other than the network's, raise)."""
        if self._publishing is not None:
            publishing, self._publishing = self._publishing, None
            publishing.result()

    def _publish_outer_step(self, step: int) -> None:
        """Publish this outer step's state, version and hash from the publisher thread.

        The snapshot is taken (cloned) here, on the training thread; serializing and hashing it
        and the DHT puts run on the publisher while training goes on. The previous publication is
        waited for first, so they stay in order and at most one is outstanding.
        """
        self._wait_for_publication()
        snapshot = self._snapshot(step)
        self._publishing = self._publisher.submit(self._publish_snapshot, snapshot)

    def _publish_snapshot(self, snapshot: StateSnapshot) -> None:
        """(Publisher thread.) Serve ``snapshot``, then announce its version and hash."""
        outer_step = snapshot.version
        digest = sha256_state(
            hashed_global_state(
                [snapshot.tensors[f"global.{i}"] for i in range(len(self._global))],
                [snapshot.tensors[f"buffer.{i}"] for i in range(len(self._global_buffers))],
            )
        )
        self._hashes[outer_step] = digest
        # (refused here where newcomers, sizing their limit from the same model, would refuse it)
        self.donor.publish(snapshot, max_meta_bytes=meta_bytes_bound(self._state_tensors()))
        self.swarm_averager.join_run(outer_step)
        self._put_hash(outer_step, digest)

    def _resynced(self) -> None:
        self.resyncs += 1
        if self.swarm_metrics is not None:
            self.swarm_metrics.resyncs.inc()

    def _discard_round(self) -> None:
        """(overlap) This peer's inner steps of the last round went into no average: not
        goodput."""
        if self.metrics is not None:
            self.metrics.goodput.discard(self.config.inner_steps * self.tokens_per_step)

    def _discard_uncommitted(self, until: int) -> None:
        """(no overlap) The steps done since the last round that took this peer's progress, up
        to ``until``, went into no average: not goodput."""
        if self._committed is None or until <= self._committed:
            return
        if self.metrics is not None:
            self.metrics.goodput.discard((until - self._committed) * self.tokens_per_step)
        self._committed = until

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
        # Behind the swarm (restarted from an older checkpoint, say): take its state and join
        # this round with a zero pseudo-gradient and no weight, so the round's result is the
        # others' and everyone applies the same outer step.
        snapshot = self._take_newer_state()
        if snapshot is not None:
            self.weight = 0.0
            work_lost = True
            # After this round the others stand at the step after it: so will this peer.
            continue_from = int(snapshot.meta["step"]) + self.config.inner_steps
        try:
            super().on_step_end(model, step)
        finally:
            self.weight = weight
        return self._after_round(step, continue_from, work_lost=work_lost)

    def _catch_up_before_round(self) -> int | None:
        """(train while forming) Take the swarm's newer state first if this peer is behind (it
        restarted from an older checkpoint, say), so it forms the round the others form."""
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
        if not self._placed_by_state:
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

    def _took_state_as_of(self, step: int) -> bool:
        """Whether the state last taken from the others is as of ``step`` or later: at the
        end, the state they publish after their last round (a peer behind at the end, or one
        that joined as they finished, takes it)."""
        return self._state_as_of >= step

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

    def _new_to_run(self) -> bool:
        """Whether this peer holds no state of the run yet: it never averaged with another
        peer, took (or compared) no state of the run, did not resume at an outer step, and ran
        no round alone while no peer of other settings was known. Such a peer (one that
        started with others and found no donor) may be the odd one where other settings show
        up: see :meth:`_refuse_other_settings`. A peer of the run leaves the other out and
        warns. (An outer step a new peer took alone beside peers of other settings does not
        make it one of the run: it may be the odd one still.)"""
        return not self._of_the_run

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
        self._publish_outer_step(step=continue_from if continue_from is not None else boundary + 1)
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
                self._publish_outer_step(step=continue_from)
        return continue_from

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
        self._publish_outer_step(step=continue_from if continue_from is not None else step + 1)
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
                self._publish_outer_step(step=int(snapshot.meta["step"]))
        return continue_from

    def _catch_up(self) -> bool:
        """Take the others' newer state before launching a round (overlap) or at the end, if behind.

        A peer is behind when its last round closed without it, when it joined with a round in
        flight that it is not in, or when the others publish a newer version (it restarted from
        an older checkpoint, say). Progress made from a state more than one round old does not
        count.
        """
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
        self._work_lost = missed or stale
        if missed or stale:
            self._resynced()
        logger.warning(
            "peer %s was behind; took the swarm's state at outer step %d (from %d)",
            self._short(),
            self.outer_step,
            was,
        )
        return stale

    def _newest_version(self) -> int:
        """The newest state version among the run's other active peers.

        The last round's formation read every peer's membership (and version) already; only
        before this peer's first round is a separate read needed.
        """
        seen = self.swarm_averager.newest_seen_version
        return self.swarm_averager.newest_version() if seen is None else seen

    def _put_hash(self, outer_step: int, digest: str) -> None:
        key = _hash_key(self.config.run_id, outer_step)
        value = json.dumps({"hash": digest}).encode()

        async def put(node: Node) -> None:
            await node.dht.put(key, value, _HASH_TTL_S, renew=False)

        try:
            self.node_thread.run(put, timeout_s=10)
        except GossamerError as exc:
            logger.warning("peer %s could not publish its hash: %s", self._short(), exc)

    def _published_hashes(self, outer_step: int) -> dict[str, str]:
        """The other peers' hashes of their global weights after ``outer_step``, by peer; not
        those of peers that left the run before this one joined it (an earlier run of the same
        name: see :attr:`SwarmAverager.left_before_joining`).

        Raises:
            GossamerError: the DHT could not be read.
        """
        key = _hash_key(self.config.run_id, outer_step)
        me = self.node_thread.node.peer_id
        earlier = self.swarm_averager.left_before_joining

        async def get(node: Node) -> dict[str, str]:
            found = {}
            for publisher, value in await read_json_records(node, key):
                if publisher in earlier:
                    continue
                if publisher != me and isinstance(value.get("hash"), str):
                    found[publisher] = value["hash"]
            return found

        return self.node_thread.run(get, timeout_s=10)

    def _out_of_agreement(self, outer_step: int) -> list[str]:
        """The peers to resync from if this peer's hash after ``outer_step`` is not the majority's.

        Empty when this peer agrees, or when it cannot tell (no hash of its own or of others).
        """
        if outer_step < 1:
            return []
        mine = self._hashes.get(outer_step)  # published a round ago: its publication is done
        try:
            others = self._published_hashes(outer_step)
        except GossamerError:
            return []
        if mine is None or not others:
            return []
        return _majority_holders(mine, others)

    def finish(self, model: nn.Module, step: int) -> bool:
        """End with the swarm's weights: wait for every live peer's hash of the final outer step.

        Mid-run, a divergence found after one outer step is repaired after the next; after the
        last there is no next. So each peer waits, up to ``_FINAL_AGREEMENT_S``, until every live
        peer of the run has published its hash of this final outer step and every hash published
        for it agrees (a peer the failure detector lost for a moment included). A peer whose
        hash is not the majority's downloads that state from the peers holding it and publishes
        again; the others keep serving until they see it agree. A peer that missed the
        last round is waited for too: it is fetching the others' state meanwhile.
        """
        replaced = super().finish(model, step)
        self._wait_for_publication()
        if replaced or self.outer_step not in self._hashes:
            self._publish_outer_step(step=step)
            self._wait_for_publication()
        final = self.outer_step
        deadline = time.monotonic() + _FINAL_AGREEMENT_S
        while True:
            try:
                states = self.swarm_averager.run_states()
                live = {p for p, (state, _) in states.items() if state == "active"}
                others = self._published_hashes(final)
            except GossamerError:
                live, others = None, {}
            mine = self._hashes.get(final)
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
                    self._publish_outer_step(step=step)
                    self._wait_for_publication()
                    continue
            if time.monotonic() >= deadline:
                logger.warning(
                    "peer %s: no agreement on the final weights within %.0f s; ending with its own",
                    self._short(),
                    _FINAL_AGREEMENT_S,
                )
                return replaced
            time.sleep(_FINAL_POLL_S)


_SAME_MODEL = (
    "every peer of a run must train the same model: set this peer's model config (or model "
    "factory) to the run's, or give it another run name"
)
_SAME_SETTINGS = (
    "every peer of a run must use the same swarm.inner_steps, swarm.outer_lr, "
    "swarm.outer_momentum, swarm.outer_momentum_warmup, swarm.overlap and "
    "swarm.train_while_forming: set this peer's to the run's, or give it another run name"
)


def _signature_difference(theirs: object, mine: list[list[Any]]) -> str:
    """How the model signature ``theirs`` (from a snapshot's meta) differs from ``mine`` ('' if
    it does not): the first parameter that differs, and the counts."""
    if not isinstance(theirs, list) or not all(
        isinstance(entry, list)
        and len(entry) == 2
        and isinstance(entry[0], str)
        and isinstance(entry[1], list)
        for entry in theirs
    ):
        return "their model signature is malformed"
    for index, (their, own) in enumerate(zip(theirs, mine, strict=False)):
        if their != own:
            return (
                f"parameter {index} is {their[0][:80]} of shape {tuple(their[1][:8])} there, "
                f"{own[0]} of shape {tuple(own[1])} here"
            )
    if len(theirs) != len(mine):
        extra = theirs[len(mine)] if len(theirs) > len(mine) else mine[len(theirs)]
        where = "there only" if len(theirs) > len(mine) else "here only"
        return (
            f"{len(theirs)} parameter tensors there, {len(mine)} here; the first of "
            f"{where} is {extra[0][:80]}"
        )
    return ""


def _state_of_the_run(snapshot: StateSnapshot) -> bool:
    """Whether ``snapshot`` is a state of the run, an authority on its DiLoCo settings: that of
    a peer of the run (see :meth:`SwarmDiLoCoStrategy._new_to_run`; its meta says so, and a
    donor of before that said nothing counts, as it did then). A new peer's state, before
    any of that, is only its own."""
    return snapshot.meta.get("of_the_run", True) is not False


def _majority_holders(mine: str, others: dict[str, str]) -> list[str]:
    """The peers to take the state from if ``mine`` is not the majority's hash, else [].

    The majority is the hash most peers published, the larger hash on a tie: every peer computes
    the same one, so of two equal camps exactly one gives way.
    """
    hashes = [*others.values(), mine]
    majority = max(set(hashes), key=lambda h: (hashes.count(h), h))
    if mine == majority:
        return []
    return sorted(p for p, h in others.items() if h == majority)


_NOTED_PAUSE_S = 1.0
"""Pauses between steps at least this long are listed in the status file (``pauses``)."""
_NOTED_PAUSES = 32
"""How many of the latest such pauses the status file lists."""


class StatusFileListener(TrainingListener):
    """Keeps a small JSON status of this peer in a file (written atomically), for live tables.

    Args:
        path: the status file.
        peer_id: this peer's id.
        strategy: read for bytes sent, rounds and resyncs.
        goodput: read for kept and processed tokens, compute and wall time.
        min_interval_s: write at most this often (the last step is always written).
    """

    def __init__(
        self,
        path: Path,
        *,
        peer_id: str,
        strategy: TrainingStrategy,
        goodput: GoodputTracker | None = None,
        min_interval_s: float = 0.5,
    ) -> None:
        self.path = path
        self.peer_id = peer_id
        self.strategy = strategy
        self.goodput = goodput
        self.min_interval_s = min_interval_s
        self._last_write = 0.0
        self._last_step_at: float | None = None
        self.status: dict[str, Any] = {
            "peer_id": peer_id,
            "state": "starting",
            "pid": os.getpid(),
            "longest_pause_s": 0.0,
            "longest_pause_step": None,
            "pauses": [],
        }
        self._write()

    def publish(self, **fields: Any) -> None:
        """Add ``fields`` (the peer's address, say) and write them at once: others may wait
        for them before training starts here."""
        self.status.update(fields)
        self._write()

    def _write(self) -> None:
        self.status["updated_unix_s"] = time.time()
        self.status["bytes_sent"] = int(getattr(self.strategy, "bytes_sent", 0))
        self.status["bytes_received"] = int(getattr(self.strategy, "bytes_received", 0))
        self.status["outer_step"] = int(getattr(self.strategy, "outer_step", 0))
        self.status["group_size"] = int(getattr(self.strategy, "last_group_size", 0))
        self.status["resyncs"] = int(getattr(self.strategy, "resyncs", 0))
        self.status["stall_s"] = float(getattr(self.strategy, "seconds_lost_to_failures", 0.0))
        ttp = getattr(self.strategy, "time_to_productive_s", None)
        self.status["time_to_productive_s"] = ttp
        averager = getattr(self.strategy, "swarm_averager", None)
        if isinstance(averager, SwarmAverager):
            self.status["rounds_by_backend"] = dict(averager.rounds_by_backend)
            self.status["torch_failures"] = averager.torch_failures
        if self.goodput is not None:
            snap = self.goodput.snapshot()
            self.status["goodput"] = {
                "wall_s": snap.wall_s,
                "compute_s": snap.compute_s,
                "tokens_processed": snap.tokens_processed,
                "tokens_kept": snap.tokens_kept,
                "tokens_per_s": snap.goodput_tokens_per_s,
                "compute_tokens_per_s": snap.compute_tokens_per_s,
                "ratio": snap.goodput_ratio,
            }
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.status))
        os.replace(tmp, self.path)
        self._last_write = time.monotonic()

    def on_start(self, *, start_step: int, max_steps: int, num_parameters: int) -> None:
        self.status.update(state="training", step=start_step, max_steps=max_steps)
        self._write()

    def on_eval(self, *, step: int, val_loss: float) -> None:
        self.status.setdefault("val_loss_first", val_loss)
        self.status["val_loss"] = val_loss
        self._write()

    def on_step(self, event: ProgressEvent) -> None:
        # The longest wall time between two step ends: what a failure (or anything else) cost
        # training at worst, rounds and state downloads included, start-up not.
        now = time.monotonic()
        if self._last_step_at is not None:
            pause = now - self._last_step_at
            if pause > self.status["longest_pause_s"]:
                self.status["longest_pause_s"] = pause
                self.status["longest_pause_step"] = event.step
            if pause >= _NOTED_PAUSE_S:  # when, how long, at which step (the last few)
                pauses = self.status["pauses"]
                pauses.append([time.time(), round(pause, 3), event.step])
                del pauses[:-_NOTED_PAUSES]
        self._last_step_at = now
        self.status.update(
            step=event.step,
            max_steps=event.max_steps,
            loss=event.loss,
            tokens_per_s=event.tokens_per_s,
        )
        if time.monotonic() - self._last_write >= self.min_interval_s:
            self._write()

    def on_checkpoint(self, *, step: int, path: Path) -> None:
        self.status["checkpoint"] = str(path)
        self._write()

    def finish(self, result: TrainResult | None, error: str | None = None) -> None:
        """Record the end of the run (or its pause: Ctrl-C, SIGTERM)."""
        interrupted = result is not None and result.interrupted
        self.status["state"] = "failed" if error else "interrupted" if interrupted else "done"
        if error:
            self.status["error"] = error
        if result is not None:
            after = result.val_loss_after
            self.status.update(
                step=result.steps_done,
                tokens_trained=result.tokens_trained,
                val_loss=after if math.isfinite(after) else None,  # (not measured at a pause)
                val_loss_first=result.val_loss_before,
                checkpoint=str(result.checkpoint_path),
            )
        self._write()


class ListenerGroup(TrainingListener):
    """Hands every event to several listeners."""

    def __init__(self, listeners: Sequence[TrainingListener]) -> None:
        self.listeners = list(listeners)

    def on_start(self, *, start_step: int, max_steps: int, num_parameters: int) -> None:
        for listener in self.listeners:
            listener.on_start(
                start_step=start_step, max_steps=max_steps, num_parameters=num_parameters
            )

    def on_eval(self, *, step: int, val_loss: float) -> None:
        for listener in self.listeners:
            listener.on_eval(step=step, val_loss=val_loss)

    def on_step(self, event: ProgressEvent) -> None:
        for listener in self.listeners:
            listener.on_step(event)

    def on_checkpoint(self, *, step: int, path: Path) -> None:
        for listener in self.listeners:
            listener.on_checkpoint(step=step, path=path)


@dataclass(frozen=True, kw_only=True, slots=True)
class SwarmPeerResult:
    """What a swarm peer did."""

    peer_id: str
    result: TrainResult
    bytes_sent: int
    bytes_received: int
    resyncs: int
    time_to_productive_s: float | None


def swarm_node_config(config: RunConfig) -> NodeConfig:
    """The node settings of a swarm peer of ``config``: its listen address, bootstrap peers,
    swarm secret, and the DHT and heartbeat timings training rounds rely on."""
    swarm = config.swarm
    secret = None
    if swarm.swarm_secret_file:  # (a regular file, a few KiB at most: not /dev/zero, a fifo)
        secret = read_secret_file(swarm.swarm_secret_file, setting="swarm.swarm_secret_file")
    return NodeConfig(
        listen_address=swarm.listen,
        bootstrap=swarm.bootstrap_addresses,
        swarm_secret=secret,
        dht=DhtConfig(record_ttl_s=30.0, republish_interval_s=10.0, refresh_interval_s=5.0),
        heartbeat=HeartbeatConfig(interval_s=0.5, timeout_s=2.5),
    )


def swarm_averager_config(config: RunConfig) -> SwarmAveragerConfig:
    """The round settings of a swarm peer of ``config``."""
    swarm = config.swarm
    return SwarmAveragerConfig(
        run_id=config.name,
        codec=swarm.codec,
        backend=swarm.backend,
        join_window_s=swarm.join_window_s,
        round_timeout_s=swarm.round_timeout_s,
        max_group_size=swarm.max_group_size,
    )


def stream_seed_of(peer_id: str) -> int:
    """The seed of a peer's data stream: peers of a run read different batches."""
    return int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:4], "little")


def run_swarm_peer(
    config: RunConfig,
    *,
    model_factory: ModelFactory | None = None,
    listener: TrainingListener | None = None,
    spans: SpanRecorder | None = None,
    metrics: PeerMetrics | None = None,
    metrics_url: str | None = None,
    on_address: Callable[[str], None] | None = None,
    stop: StopRequest | None = None,
) -> SwarmPeerResult:
    """Train as one peer of a swarm, with ``config.swarm``'s strategy.

    Args:
        config: the run; ``config.swarm`` says how to reach and average with the others.
        model_factory: builds the model; the built-in GPT if None.
        listener: receives progress events.
        spans: records where time goes.
        metrics: Prometheus metrics to keep up to date (the node's network metrics are added to
            its registry while the node runs); goodput is tracked in a private one if None.
        metrics_url: where ``metrics`` are served, written into the status file for scrapers.
        on_address: called with this peer's ``PEER_ID@HOST:PORT`` once it listens.
        stop: set to pause the run after the step under way (see :attr:`Trainer.stop`).

    Returns:
        The training result and the swarm figures (bytes on the wire, resyncs, time to productive).
    """
    checkpoint_dir = Path(config.checkpoint.directory)
    swarm = config.swarm
    # The directory is held before its peer key is read there: a second peer given the same
    # directory took the first's identity, and so its data stream.
    with contextlib.ExitStack() as held:
        held.enter_context(directory_lease(checkpoint_dir))
        key_file = Path(swarm.key_file) if swarm.key_file else checkpoint_dir / "peer.key"
        # (held too: two peers given one key file are one peer id, and read one data stream)
        identity = held.enter_context(
            held_identity(
                key_file,
                setting="swarm.key_file",
                hint="or leave swarm.key_file unset (each checkpoint.directory then holds its "
                "own peer.key)",
            )
        )
        metrics = metrics or PeerMetrics()
        metrics.set_peer_id(identity.peer_id)
        # Its spans and log lines name this peer: the run's name, which every peer of the run
        # shares, put a swarm's traces, exported together, on one process's rows.
        spans = spans or SpanRecorder()
        if spans.peer in ("", config.name):  # (a name the caller chose is kept: a bench's tag)
            spans.peer = short_peer_id(identity.peer_id)
        node_thread = held.enter_context(NodeThread(swarm_node_config(config), identity))
        net_metrics = register_net_metrics(metrics.registry, node_thread)
        try:
            return _train_on_node(
                config,
                node_thread,
                model_factory=model_factory,
                listener=listener,
                spans=spans,
                metrics=metrics,
                metrics_url=metrics_url,
                on_address=on_address,
                stop=stop,
            )
        finally:
            net_metrics.close()  # before the node stops: later scrapes serve the last view


def _on_loopback_only(node: Node) -> bool:
    """Whether every address ``node`` has is a loopback one: the peers that can reach it are on
    its machine, and dial it there (nothing to ask)."""
    hosts = [address.rpartition(":")[0].strip("[]") for address in node.addresses]
    try:
        return bool(hosts) and all(ipaddress.ip_address(h).is_loopback for h in hosts)
    except ValueError:  # (a name)
        return hosts == ["localhost"] * len(hosts)


def _wait_for_a_bootstrap_peer(node_thread: NodeThread, addresses: Sequence[str]) -> None:
    """Return once some peer is known through the bootstrap peers, trying them again for up
    to ``_BOOTSTRAP_WAIT_S`` (a peer started just before this one may not listen yet).

    Raises:
        PeerUnavailableError: none answered: a run asked to join a swarm trained alone and
            ended as a success.
    """

    async def reached(node: Node) -> int:
        return len(node.peers()) or await node.bootstrap(list(addresses))

    deadline = time.monotonic() + _BOOTSTRAP_WAIT_S
    while not node_thread.run(reached, timeout_s=_BOOTSTRAP_WAIT_S + 30):
        if time.monotonic() >= deadline:
            raise PeerUnavailableError(
                f"no bootstrap peer answered within {_BOOTSTRAP_WAIT_S:.0f} s ("
                + ", ".join(addresses)
                + "); check --bootstrap: the address a running peer printed, reachable from "
                "here; leave it out to start a new swarm"
            )
        time.sleep(1.0)


def _train_on_node(
    config: RunConfig,
    node_thread: NodeThread,
    *,
    model_factory: ModelFactory | None,
    listener: TrainingListener | None,
    spans: SpanRecorder | None,
    metrics: PeerMetrics,
    metrics_url: str | None,
    on_address: Callable[[str], None] | None,
    stop: StopRequest | None,
) -> SwarmPeerResult:
    swarm = config.swarm
    node = node_thread.node
    address = f"{node.peer_id}@{node.addresses[0]}"
    logger.info("peer %s listening at %s", node.peer_id[:8], address)
    if on_address is not None:
        on_address(address)
    if swarm.bootstrap_addresses:
        _wait_for_a_bootstrap_peer(node_thread, swarm.bootstrap_addresses)
        if not _on_loopback_only(node):
            # Behind NAT nobody can dial the address it listens on: it takes a relay, and its
            # record says so (it never asked, and every round a peer formed with it failed on
            # the sends to it).
            node_thread.run(lambda n: n.settle_reachability(), timeout_s=20.0)
    averager = SwarmAverager(node_thread, swarm_averager_config(config))

    async def make_donor(n: Node) -> StateDonor:
        return StateDonor(n)

    donor = node_thread.run(make_donor, timeout_s=10)
    tokens_per_step = config.train.grad_accum_steps * config.train.batch_size * config.model.context
    strategy: TrainingStrategy
    if swarm.strategy == "diloco":
        strategy = SwarmDiLoCoStrategy(
            DiLoCoConfig.from_swarm(swarm, run_id=config.name),
            averager,
            node_thread,
            donor,
            join_existing=bool(swarm.bootstrap_addresses),
            metrics=metrics,
            tokens_per_step=tokens_per_step,
            max_steps=config.train.max_steps,
        )
    elif swarm.strategy == "sync":
        swarm_metrics = metrics.enable_swarm()
        strategy = SwarmSyncStrategy(
            ObservedAverager(averager, swarm_metrics),
            averager,
            node_thread,
            donor,
            join_existing=bool(swarm.bootstrap_addresses),
            run_id=config.name,
            weight=float(tokens_per_step),  # gradients count by the tokens behind them
            metrics=swarm_metrics,
            goodput=metrics.goodput,
            tokens_per_step=tokens_per_step,
        )
    else:
        raise ValueError("run_swarm_peer needs swarm.strategy 'sync' or 'diloco'")
    listeners = [listener] if listener is not None else []
    status: StatusFileListener | None = None
    if swarm.status_file:
        status = StatusFileListener(
            Path(swarm.status_file),
            peer_id=node.peer_id,
            strategy=strategy,
            goodput=metrics.goodput,
        )
        published: dict[str, Any] = {"address": address}
        if metrics_url is not None:
            published["metrics_url"] = metrics_url
        status.publish(**published)  # at once: peers joining through this one wait for it
        listeners.append(status)
    stream_seed = stream_seed_of(node.peer_id)
    try:
        with Trainer(
            config,
            model_factory=model_factory,
            strategy=strategy,
            listener=ListenerGroup(listeners),
            stream_seed=stream_seed,
            spans=spans,
            metrics=metrics,
            stop=stop,
        ) as trainer:
            result = trainer.run()
    except BaseException as exc:
        if status is not None:
            status.finish(None, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        donor.close()
        averager.close()
    if status is not None:
        status.finish(result)
    return SwarmPeerResult(
        peer_id=node.peer_id,
        result=result,
        bytes_sent=int(getattr(strategy, "bytes_sent", 0)),
        bytes_received=int(getattr(strategy, "bytes_received", 0)),
        resyncs=int(getattr(strategy, "resyncs", 0)),
        time_to_productive_s=getattr(strategy, "time_to_productive_s", None),
    )
