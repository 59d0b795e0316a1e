"""The state a swarm DiLoCo peer exchanges with the others, and the checks on it.

:class:`SwarmStateExchange` is the base of
:class:`~gossamer.train.swarm_diloco.SwarmDiLoCoStrategy` (whose docstring lists the
constructor's arguments): it holds the strategy's state, and

- serves this peer's global state to newcomers and, after every outer step, publishes it with
  a sha256 of its global weights, off the training thread;
- downloads the state most of the run's donors hold, and refuses one of another model or of
  other DiLoCo settings (stopping a peer new to the run with a :class:`ConfigError`), or one
  that does not fit this peer's model;
- takes a downloaded state, and finds the peers holding the majority's state where this
  peer's hash of an outer step is not the majority's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from gossamer.core.errors import ConfigError, GossamerError
from gossamer.core.hashing import sha256_state
from gossamer.net.bridge import NodeThread
from gossamer.net.node import Node
from gossamer.obs.metrics import PeerMetrics
from gossamer.obs.trace import nested_span
from gossamer.train.diloco import DiLoCoStrategy
from gossamer.train.diloco_config import DiLoCoConfig
from gossamer.train.diloco_outer_step import hashed_global_state
from gossamer.train.state_sync import StateSnapshot
from gossamer.train.state_sync_donor import StateDonor
from gossamer.train.swarm_averager import SwarmAverager
from gossamer.train.swarm_observed_averager import ObservedAverager
from gossamer.train.swarm_round_records import read_json_records, settings_difference
from gossamer.train.swarm_sync import download_from_donors, meta_bytes_bound, state_bytes_bound

__all__ = ["SwarmStateExchange"]

logger = logging.getLogger(__name__)
_HASH_TTL_S = 600.0


def _hash_key(run_id: str, outer_step: int) -> bytes:
    return hashlib.sha256(f"gossamer.train.hash/{run_id}/{outer_step}".encode()).digest()


class SwarmStateExchange(DiLoCoStrategy):
    """A swarm DiLoCo peer's state: served, published with its hash, downloaded and checked.

    The base of :class:`~gossamer.train.swarm_diloco.SwarmDiLoCoStrategy`, which lists the
    arguments.
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
        self._final_version: int | None = None
        """The version of the others' final state this peer took (see :func:`_final_state`;
        None: none taken, or its marker was outvoted: see :meth:`_final_marker_outvoted`).
        While it stands on that version, it runs no round of its own."""
        self._final_attempt = 0
        """The ``round_attempt`` of that state: a retry owed after it where its marker is
        outvoted later (see :meth:`_recheck_final_state`)."""
        self._published_final = False
        """The last state this peer published was marked final (see :meth:`_snapshot`)."""
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
        for key in ("round_in_flight", "of_the_run", "final"):
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

    def _apply_snapshot(self, snapshot: StateSnapshot) -> None:
        """Take the swarm's global state; the local model restarts from it.

        With overlap the local model moves by as much as the global weights did, so the progress
        it holds that is not averaged yet is kept.
        """
        if not self.config.overlap:  # (the local progress not in the swarm's state is gone)
            self._discard_uncommitted(self._steps_done)
        self._placed_by_state = True
        # (the others' records are read only for a state that says it is final: rare)
        final = _final_state(snapshot, self.max_steps) and not self._final_marker_outvoted(
            snapshot.version
        )
        self._final_version = snapshot.version if final else None
        attempt = snapshot.meta.get("round_attempt", 0)
        self._final_attempt = attempt if type(attempt) is int else 0
        if _state_of_the_run(snapshot):  # (its settings were checked: see _unusable)
            self._of_the_run = True
        before = [t.clone() for t in self._global] if self.config.overlap else []
        # A state published after a round that failed on every member (round_attempt > 0)
        # owes that round's next attempt: its donors run it at their next boundary, or in
        # their finish() where the run ended, and this peer joins it there too (see
        # DiLoCoStrategy.finish). Not one marked final: nobody runs a round after it.
        retry_owed = type(attempt) is int and attempt > 0 and not final
        self._apply_state(
            snapshot.tensors,
            {k: snapshot.meta.get(k, 0) for k in ("outer_step", "round_attempt")}
            | {"round_failed": retry_owed}
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

    def _snapshot(self, step: int, *, final: bool = False) -> StateSnapshot:
        """This peer's global state as of ``step``.

        Args:
            step: the step the state is as of.
            final: this peer runs no round after this state (it ran its last one, in
                finish(), or took the others' final state): a peer behind that takes it ends
                on it. Said outright, not inferred from the step: a run may end before
                ``train.max_steps`` (a time budget), and a state as of the last step may still
                have a round owed after it (one that failed on every member is run again in
                finish()).
        """
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
                "final": final,
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

    def _publish(self, step: int, *, final: bool = False) -> None:
        self._published_final = final
        self.donor.publish(
            self._snapshot(step, final=final),
            max_meta_bytes=meta_bytes_bound(self._state_tensors()),
        )

    def _wait_for_publication(self) -> None:
        """Wait for the outstanding publication (its errors, other than the network's, raise)."""
        if self._publishing is not None:
            publishing, self._publishing = self._publishing, None
            publishing.result()

    def _publish_outer_step(self, step: int, *, final: bool = False) -> None:
        """Publish this outer step's state, version and hash from the publisher thread.

        The snapshot is taken (cloned) here, on the training thread; serializing and hashing it
        and the DHT puts run on the publisher while training goes on. The previous publication is
        waited for first, so they stay in order and at most one is outstanding.
        """
        self._wait_for_publication()
        snapshot = self._snapshot(step, final=final)
        self._published_final = final
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
        self._put_hash(outer_step, digest, final=snapshot.meta.get("final") is True)

    def _resynced(self) -> None:
        self.resyncs += 1
        if self.swarm_metrics is not None:
            self.swarm_metrics.resyncs.inc()

    def _discard_uncommitted(self, until: int) -> None:
        """(no overlap) The steps done since the last round that took this peer's progress, up
        to ``until``, went into no average: not goodput."""
        if self._committed is None or until <= self._committed:
            return
        if self.metrics is not None:
            self.metrics.goodput.discard((until - self._committed) * self.tokens_per_step)
        self._committed = until

    def _new_to_run(self) -> bool:
        """Whether this peer holds no state of the run yet: it never averaged with another
        peer, took (or compared) no state of the run, did not resume at an outer step, and ran
        no round alone while no peer of other settings was known. Such a peer (one that
        started with others and found no donor) may be the odd one where other settings show
        up: see :meth:`_refuse_other_settings`. A peer of the run leaves the other out and
        warns. (An outer step a new peer took alone beside peers of other settings does not
        make it one of the run: it may be the odd one still.)"""
        return not self._of_the_run

    def _put_hash(self, outer_step: int, digest: str, *, final: bool) -> None:
        """Announce this peer's hash of its global weights after ``outer_step``, and whether
        it means to run no round after that state (``final``; what a peer did shows in its
        hash of the next outer step, which is what outvotes a state's final marker: see
        :meth:`_final_marker_outvoted`)."""
        key = _hash_key(self.config.run_id, outer_step)
        value = json.dumps({"hash": digest, "final": final}).encode()

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
        return {peer: record["hash"] for peer, record in self._hash_records(outer_step).items()}

    def _hash_records(self, outer_step: int) -> dict[str, dict[str, Any]]:
        """The other peers' hash records of ``outer_step`` (a string ``hash``, and from peers
        since the final marker a boolean ``final`` where well formed), by peer; as
        :meth:`_published_hashes` picks them.

        Raises:
            GossamerError: the DHT could not be read.
        """
        key = _hash_key(self.config.run_id, outer_step)
        me = self.node_thread.node.peer_id
        earlier = self.swarm_averager.left_before_joining

        async def get(node: Node) -> dict[str, dict[str, Any]]:
            found = {}
            for publisher, value in await read_json_records(node, key):
                if publisher in earlier:
                    continue
                if publisher != me and isinstance(value.get("hash"), str):
                    found[publisher] = value
            return found

        return self.node_thread.run(get, timeout_s=10)

    def _final_marker_outvoted(self, version: int) -> bool:
        """Whether a state of outer step ``version`` marked final is no end of the run: at
        least half of the other peers that published their hash of that outer step or of the
        next went on past it (they published the next).

        The marker is one donor's word, in meta nobody checks: taken at its word from a peer
        that marked its states final mid-run (hostile, or buggy), it had a peer that resynced
        from it (or a newcomer) skip the rounds the others went on to run and end an outer
        step or more behind them (3 of 14 runs of a loopback swarm of 3 ended split). The
        step it is as of proves nothing either: a time budget ends a run short of
        ``max_steps``, and a state's step is the donor's word too. What the others did shows
        in the DHT: a peer that ran the round after outer step ``version`` published its hash
        of ``version + 1``. At an honest end nobody did, whatever the records of ``version``
        say: a record put unmarked and not yet put again marked (a time budget that ends the
        run on a boundary), a marked put that failed, or one that said what its peer meant
        to do then, never outvotes it (read as votes, one such record of two did, and a peer
        on the others' final state ran a round alone).

        Not outvoted where the DHT cannot be read, or nobody has gone on yet: the marker
        stands, and is weighed again at the next boundary and in finish()
        (:meth:`_recheck_final_state`). Identities cost nothing: one that publishes a hash of
        the next outer step it never reached, where the other peers that published are no
        more than one, still has a peer run on alone.
        """
        try:
            here = self._hash_records(version)
            went_on = set(self._hash_records(version + 1))
        except GossamerError as exc:
            logger.debug(
                "peer %s: cannot read the hashes of outer step %d: %s", self._short(), version, exc
            )
            return False
        publishers = set(here) | went_on
        if not went_on or 2 * len(went_on) < len(publishers):
            return False
        logger.warning(
            "peer %s: a donor's state of outer step %d is marked final, yet %d of the %d other "
            "peers that published it or the next went on past it: the run has not ended there",
            self._short(),
            version,
            len(went_on),
            len(publishers),
        )
        return True

    def _recheck_final_state(self) -> None:
        """Where this peer stands on a state taken as the others' final one, weigh its marker
        again (at a boundary, and in finish(): where the marker decides whether this peer
        runs a round) and forget it where it is outvoted now (see
        :meth:`_final_marker_outvoted`): this peer then runs the others' rounds from that
        state, as from any state not marked final (the retry of a round that failed on every
        member included, where the state owed one).

        Taken while nobody had gone on yet, the marker went out again with this peer's own
        record of that outer step: that record is put again unmarked, as this peer goes on
        past it (the records' marks say what their peers meant to do; only the next outer
        step's records outvote a marker).
        """
        if not self._took_final_state() or not self._final_marker_outvoted(self.outer_step):
            return
        self._final_version = None
        self._round_failed = self._final_attempt > 0
        self._wait_for_publication()
        digest = self._hashes.get(self.outer_step)
        if self._published_final and digest is not None:
            self._published_final = False
            self._put_hash(self.outer_step, digest, final=False)

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


def _final_state(snapshot: StateSnapshot, max_steps: int | None) -> bool:
    """Whether ``snapshot`` is its peer's final state, after which it runs no round.

    Its meta says so (checked a boolean in :meth:`SwarmStateExchange._unusable`), and the
    other peers that published its outer step do not outvote that (see
    :meth:`SwarmStateExchange._final_marker_outvoted`, which the caller asks). A state
    without the field comes from a peer that predates the marker: its end is inferred as
    those peers inferred it, a state as of the run's last step (``max_steps``, this peer's
    budget) with no round in flight and none owed (``round_attempt`` 0). Read as not final,
    a new peer that took an old peer's end-of-run state ran the last round again alone and
    ended an outer step past the others.

    Args:
        snapshot: the state taken.
        max_steps: this peer's step budget (None: not known, so an unmarked state is not
            final).
    """
    marked = snapshot.meta.get("final")
    if marked is not None:
        return marked is True
    attempt = snapshot.meta.get("round_attempt", 0)
    return (
        max_steps is not None
        and int(snapshot.meta.get("step", -1)) >= max_steps
        and not snapshot.meta.get("round_in_flight", False)
        and attempt == 0
    )


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
