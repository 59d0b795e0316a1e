"""Synchronous data parallel across machines, elastic: newcomers take the swarm's exact state.

With gradients averaged every step, every peer applies the same update, so the peers' weights and
optimizer states stay identical, and a newcomer must start from exactly that state at exactly one
step. The join goes:

1. the newcomer reads the run's members and the steps they announced (every peer announces its
   step every ``announce_every`` steps) and picks a step ``S`` safely ahead of them;
2. it announces that it joins at ``S`` (membership ``joining``), which no round waits for;
3. every peer, at the end of step ``S - 1``, publishes its weights, optimizer state and step as
   state version ``S``, then waits until the newcomer is a member (or gone, or a deadline);
4. the newcomer downloads version ``S`` from all of them at once (every chunk checked by sha256),
   takes it, becomes a member, and trains from step ``S``: the round of step ``S`` is its first.

If the others passed ``S`` before they saw the announcement, the newcomer picks a new step and
tries again.

A peer's state and its step always go together, and the swarm keeps the newest of them: a peer
that resumed from a checkpoint ahead of every step the run's peers announce (after a swarm-wide
crash, peers come back from checkpoints of different steps) keeps its own state and becomes a
member at its own step, instead of taking an older state under its newer step; a peer that
finds an active peer a whole announcement period or more ahead of it (it reads their steps at
every round) is behind, and joins again at a step past that one, taking that state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from gossamer.core.errors import GossamerError
from gossamer.net.bridge import NodeThread
from gossamer.net.node import Node
from gossamer.obs.goodput import GoodputTracker
from gossamer.obs.metrics import SwarmMetrics
from gossamer.obs.trace import nested_span
from gossamer.store import flatten_optimizer_state, unflatten_optimizer_state
from gossamer.train.averaging import TensorAverager
from gossamer.train.state_sync import StateSnapshot, StateSyncLimits, download_state
from gossamer.train.state_sync_donor import StateDonor
from gossamer.train.swarm_averager import SwarmAverager
from gossamer.train.sync import SyncStrategy

__all__ = ["SwarmSyncStrategy", "download_from_donors", "meta_bytes_bound", "state_bytes_bound"]

logger = logging.getLogger(__name__)

_JOIN_ATTEMPTS = 3
_STATE_WAIT_S = 60.0
"""How long a newcomer waits for the state of the step it joins at, per attempt."""
_MEMBER_WAIT_S = 60.0
"""How long the peers wait, after publishing, for a newcomer to become a member."""
_POLL_S = 0.1
_DOWNLOAD_TIMEOUT_S = 120.0
"""How long a download may take at least; a large state gets longer (see below)."""
_MIN_DOWNLOAD_BYTES_PER_S = float(32 << 10)
"""A download goes on past ``_DOWNLOAD_TIMEOUT_S`` while its chunks keep coming, for at most
the state's size at this rate more (32 KiB/s, about 0.26 Mbit/s: a hard cap, see
:func:`download_state`'s ``min_bytes_per_s``). A fixed deadline made a state of more than that
deadline's transfer impossible to download, each try starting over; so did one of 1 MiB/s for a
newcomer behind a 1 Mbit/s link (a 30 MB state got 8 MiB in each 120 s try)."""
_MEMBER_WAIT_BYTES_PER_S = float(1 << 20)
"""Members wait for a newcomer's download at most as long as the state takes at this rate
(1 MiB/s) more than the download's own timeout: they stop training while they wait, and at the
download's floor (``_MIN_DOWNLOAD_BYTES_PER_S``) every member waited up to 54 minutes for a
newcomer taking a 100 MB state. A newcomer slower than this joins at a later step."""
_META_BYTES_PER_TENSOR = 1024
"""Room in a state's meta per parameter tensor (AdamW's tree takes about 150 bytes of it)."""


def _download_time_bound_s(total_bytes: int) -> float:
    """The longest a download of ``total_bytes`` may take (see :func:`download_from_donors`)."""
    return _DOWNLOAD_TIMEOUT_S + total_bytes / _MIN_DOWNLOAD_BYTES_PER_S


def _snapshot_bytes(snapshot: StateSnapshot) -> int:
    """Bytes of a snapshot's tensors."""
    return sum(t.numel() * t.element_size() for t in snapshot.tensors.values())


def state_bytes_bound(params: Sequence[torch.Tensor]) -> int:
    """The most a donor's state may take for a peer training ``params``: donors run the same
    model, so their state is its weights and what their optimizers keep per weight (Adam's two
    moments, DiLoCo's global copy and momentum): 8 times the weights leaves room to spare, and
    a donor that announces more is refused before a byte of it is kept."""
    return 8 * sum(p.numel() * p.element_size() for p in params) + (64 << 20)


def meta_bytes_bound(params: Sequence[torch.Tensor]) -> int:
    """The largest meta a donor's state may carry for a peer training ``params``: the meta holds
    the optimizer's tree, which grows with the number of parameter tensors (a fixed 1 MiB
    refused the state of a model of more than about 7,000), so each gets 1 KiB of room on top
    of the 1 MiB any state may carry. Donors refuse to publish a larger one."""
    return StateSyncLimits().max_meta_bytes + _META_BYTES_PER_TENSOR * len(params)


def download_from_donors(
    node_thread: NodeThread,
    donors: Sequence[str],
    *,
    version: int | None,
    max_state_bytes: int,
    max_meta_bytes: int | None = None,
    metrics: SwarmMetrics | None = None,
) -> tuple[StateSnapshot, int]:
    """(Training thread.) Download the state from ``donors`` at once; record it in ``metrics``.

    Shared by both swarm strategies. ``max_state_bytes``: see :func:`state_bytes_bound`;
    ``max_meta_bytes``: see :func:`meta_bytes_bound` (None: :class:`StateSyncLimits`' default,
    too small for the optimizer tree of a model of many parameter tensors).

    Returns:
        The snapshot and the bytes downloaded.

    Raises:
        GossamerError: no donor served ``version`` (the most held one if None) in time.
    """
    donor_list = list(donors)

    async def fetch(node: Node) -> tuple[StateSnapshot, Any]:
        return await download_state(
            node,
            donor_list,
            timeout_s=_DOWNLOAD_TIMEOUT_S,
            version=version,
            limits=StateSyncLimits(
                max_state_bytes=max_state_bytes,
                max_meta_bytes=max_meta_bytes or StateSyncLimits().max_meta_bytes,
            ),
            min_bytes_per_s=_MIN_DOWNLOAD_BYTES_PER_S,
        )

    started = time.monotonic()
    # (the download's own deadline decides; this one only bounds the largest state allowed)
    longest_s = _DOWNLOAD_TIMEOUT_S + _download_time_bound_s(max_state_bytes) + 10
    snapshot, report = node_thread.run(fetch, timeout_s=longest_s)
    if metrics is not None:
        metrics.record_state_download(time.monotonic() - started, report.total_bytes)
    return snapshot, report.total_bytes


class SwarmSyncStrategy(SyncStrategy):
    """:class:`SyncStrategy` for a swarm of processes: announces steps, donates and takes state.

    Args:
        averager: averages gradients (the swarm averager, possibly observed for metrics).
        swarm_averager: the run's membership and rounds.
        node_thread: this peer's node.
        donor: serves this peer's state to newcomers.
        join_existing: take the swarm's state before the first step (a bootstrap was given).
        run_id: names the rounds.
        weight: this peer's weight in the average (its tokens per step).
        metrics: records resyncs and state downloads.
        announce_every: steps between announcements of this peer's step.
        goodput: where a step whose gradient went into no average is counted as discarded.
        tokens_per_step: training tokens of one step (what such a step discards).
    """

    def __init__(
        self,
        averager: TensorAverager,
        swarm_averager: SwarmAverager,
        node_thread: NodeThread,
        donor: StateDonor,
        *,
        join_existing: bool,
        run_id: str,
        weight: float = 1.0,
        metrics: SwarmMetrics | None = None,
        announce_every: int = 20,
        goodput: GoodputTracker | None = None,
        tokens_per_step: int = 0,
    ) -> None:
        if announce_every < 1:
            raise ValueError(f"announce_every must be at least 1, got {announce_every}")
        super().__init__(averager, run_id=run_id, weight=weight)
        self.swarm_averager = swarm_averager
        self.node_thread = node_thread
        self.donor = donor
        self.join_existing = join_existing
        self.metrics = metrics
        self.goodput = goodput
        self.tokens_per_step = tokens_per_step
        self.announce_every = announce_every
        self.time_to_productive_s: float | None = None
        """Seconds from start to the newcomer's state being in place (None: not a newcomer)."""
        self.state_download_bytes = 0
        """Bytes downloaded from donors."""
        self.newcomers_served = 0
        """Newcomers this peer published its state for."""
        self.resyncs = 0
        """Times this peer missed a round and took the swarm's state again."""
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._started = time.monotonic()
        self._last_download_error = ""
        """Why the last download of a join failed ('' if none did)."""
        self._step = 0
        """The step the state in place is of (the Trainer tells it the step it resumed at)."""

    def resume_at(self, step: int) -> None:
        """(Called by the Trainer before :meth:`setup`.) The state in place, resumed from a
        checkpoint, is of ``step``: the swarm's state is taken only where it is newer."""
        self._step = step

    def _short(self) -> str:
        return self.node_thread.node.peer_id[:8]

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int | None:
        self._model = model
        self._optimizer = optimizer
        start_step = self._join() if self.join_existing else None
        if start_step is not None:
            self._step = start_step
        self.swarm_averager.join_run(self._step)  # rounds wait for this peer from now on
        return start_step

    def close(self) -> None:
        self.swarm_averager.leave_run()

    def on_step_end(self, model: nn.Module, step: int) -> int | None:
        del model
        following = step + 1
        self._step = following
        why = self._out_of_step(following)
        if why:
            # Its state is no longer the swarm's: it joins again, at a step the others have not
            # reached, and continues from the state and step it takes.
            logger.warning(
                "peer %s step %d: %s; joining the run again", self._short(), following, why
            )
            self.resyncs += 1
            if self.metrics is not None:  # (they went uncounted: 0 on the dashboard)
                self.metrics.resyncs.inc()
            if self.last_round_excluded and self.goodput is not None:
                self.goodput.discard(self.tokens_per_step)  # its own gradient's step: in no average
            rejoined = self._join()
            if rejoined is not None:
                self._step = rejoined
            self.swarm_averager.join_run(self._step)
            return rejoined
        newcomers = [p for p, at in self.swarm_averager.joining.items() if at == following]
        if following % self.announce_every == 0 or newcomers:
            # Newcomers pick their step from these, and take the state once a donor says it is
            # at their step: one resumed at a step off the period served a step it never
            # announced, and sat in _serve while the newcomer's attempt ran out.
            self.swarm_averager.join_run(following)
        if newcomers:
            self._serve(newcomers, following)
        return None

    def _out_of_step(self, following: int) -> str:
        """Why this peer's state, about to train step ``following``, is not the swarm's ('' if
        it is)."""
        if self.last_round_excluded:
            # The round went on without this peer, which applied its own gradient.
            return f"missed the round of step {following - 1}"
        # Peers in step announce the same steps; one a whole period ahead trains another state
        # (this peer resumed from an older checkpoint than it, say). Read at every round.
        seen = self.swarm_averager.newest_seen_version
        if seen is None or seen < following + self.announce_every:
            return ""
        try:  # (what a round read may be of a peer gone since: those alive decide)
            states = self.swarm_averager.run_states()
        except GossamerError:
            return ""
        newest = max((v for state, v in states.values() if state == "active"), default=-1)
        if newest < following + self.announce_every:
            return ""
        return (
            f"behind the run (an active peer announced step {newest}, {newest - following} "
            "steps ahead of this peer)"
        )

    # -- donating --------------------------------------------------------------------------

    def _snapshot(self, step: int) -> StateSnapshot:
        assert self._model is not None
        assert self._optimizer is not None
        # No copies: the donor serializes the snapshot before publish() returns.
        params = [p for p in self._model.parameters() if p.requires_grad]
        tensors = {f"param.{i}": param.detach() for i, param in enumerate(params)}
        optimizer_tensors, optimizer_meta = flatten_optimizer_state(self._optimizer.state_dict())
        tensors |= {f"optim.{name}": tensor for name, tensor in optimizer_tensors.items()}
        return StateSnapshot(
            version=step, tensors=tensors, meta={"step": step, "optimizer": optimizer_meta}
        )

    def _serve(self, newcomers: list[str], step: int) -> None:
        """Publish the state at ``step`` and wait until ``newcomers`` are members (or gone).

        Raises:
            ValueError: the state's meta is larger than newcomers of this model accept (see
                :func:`meta_bytes_bound`).
        """
        snapshot = self._snapshot(step)
        assert self._model is not None
        # Refused here where newcomers, sizing their limit from the same model, would refuse it.
        self.donor.publish(
            snapshot, max_meta_bytes=meta_bytes_bound(list(self._model.parameters()))
        )
        self.newcomers_served += len(newcomers)
        logger.info(
            "peer %s: state of step %d published for %d newcomer(s)",
            self._short(),
            step,
            len(newcomers),
        )
        # As long as a newcomer's download takes at 1 MiB/s, and then the wait: a state larger
        # than the wait alone allowed came after the others had trained on, its first round
        # was closed, and it joined again, and again, each time downloading the whole state.
        wait_s = (
            _MEMBER_WAIT_S
            + _DOWNLOAD_TIMEOUT_S
            + _snapshot_bytes(snapshot) / _MEMBER_WAIT_BYTES_PER_S
        )
        deadline = time.monotonic() + wait_s
        with nested_span("waiting", what="newcomer"):
            while time.monotonic() < deadline:
                try:
                    states = self.swarm_averager.run_states()
                except GossamerError:
                    states = None
                if states is not None and all(
                    p not in states or states[p] != ("joining", step) for p in newcomers
                ):
                    return  # each is a member now, or gone, or joining at another step
                time.sleep(_POLL_S)
        logger.warning(
            "peer %s: newcomers %s did not join at step %d within %.0f s; going on",
            self._short(),
            [p[:8] for p in newcomers],
            step,
            wait_s,
        )

    # -- joining ---------------------------------------------------------------------------

    def _join(self) -> int | None:
        """Take the swarm's state at a step it has not reached yet; None when alone, or when this
        peer's own state is of that step or newer (it keeps its own then)."""
        self._last_download_error = ""
        for attempt in range(1, _JOIN_ATTEMPTS + 1):
            try:
                states = self.swarm_averager.run_states()
            except GossamerError as exc:
                logger.warning("peer %s: cannot read the run's members: %s", self._short(), exc)
                return None
            steps = {p: v for p, (state, v) in states.items() if state == "active"}
            if not steps:
                return None  # the first peer of the run
            step = max(steps.values()) + 2 * self.announce_every
            if step <= self._step:
                # Taking that state would put this peer's own newer one, and the steps it
                # trained, back to it: the run's peers are behind and take this one instead.
                logger.warning(
                    "peer %s step %d: ahead of the run's other peers (the newest announced step "
                    "%d); keeping its own state and step, the peers behind take them once they "
                    "see it",
                    self._short(),
                    self._step,
                    max(steps.values()),
                )
                return None
            self.swarm_averager.announce_joining(step)
            logger.info(
                "peer %s joins the run at step %d (attempt %d)", self._short(), step, attempt
            )
            snapshot = self._wait_for_state(sorted(steps), step)
            if snapshot is not None:
                self._apply(snapshot)
                self.time_to_productive_s = time.monotonic() - self._started
                logger.info(
                    "peer %s synced from donors at step %d (%.1f s)",
                    self._short(),
                    step,
                    self.time_to_productive_s,
                )
                return step
        if self._last_download_error:  # the state was there: its download failed
            raise GossamerError(
                f"could not join the run: the state of the step this peer asked for was not "
                f"downloaded in {_JOIN_ATTEMPTS} attempts; the last one: "
                f"{self._last_download_error}"
            )
        raise GossamerError(
            f"could not join the run: no peer published the state of the step this peer asked "
            f"for in {_JOIN_ATTEMPTS} attempts; check that the others are training"
        )

    def _wait_for_state(self, donors: list[str], step: int) -> StateSnapshot | None:
        """Download the state of ``step`` once the peers have reached it (they announce ``step``
        just before publishing it), from all that have."""
        deadline = time.monotonic() + _STATE_WAIT_S

        with nested_span("sync", what="state_download"):
            while time.monotonic() < deadline:
                try:
                    states = self.swarm_averager.run_states()
                except GossamerError:
                    states = {}
                at_step = [p for p in donors if states.get(p) == ("active", step)]
                past = [p for p in donors if states.get(p, ("", -1))[1] > step]
                ready = at_step or past  # past it: it may have published it all the same
                if not ready:
                    time.sleep(_POLL_S)
                    continue
                snapshot = self._download(ready, step)
                if snapshot is not None:
                    return snapshot
                time.sleep(_POLL_S)
        return None

    def _download(self, donors: list[str], step: int) -> StateSnapshot | None:
        try:
            assert self._model is not None
            params = list(self._model.parameters())
            snapshot, num_bytes = download_from_donors(
                self.node_thread,
                donors,
                version=step,
                max_state_bytes=state_bytes_bound(params),
                max_meta_bytes=meta_bytes_bound(params),
                metrics=self.metrics,
            )
        except GossamerError as exc:
            logger.info("peer %s: state of step %d not there yet (%s)", self._short(), step, exc)
            self._last_download_error = f"{type(exc).__name__}: {exc}"
            return None
        self.state_download_bytes += num_bytes
        return snapshot

    def _apply(self, snapshot: StateSnapshot) -> None:
        """Take ``snapshot`` as this peer's model and optimizer state, all or nothing: every
        tensor and the optimizer's state are checked before anything is written (weights of
        this peer's shapes and dtypes; the optimizer's hyperparameters and per-parameter state
        as this peer's optimizer keeps them, see :func:`_check_optimizer_state`).

        Raises:
            GossamerError: the state does not fit this peer's model or optimizer (the message
                names what differs).
        """
        assert self._model is not None
        assert self._optimizer is not None
        params = [p for p in self._model.parameters() if p.requires_grad]
        sources = []
        for i, param in enumerate(params):
            source = snapshot.tensors.get(f"param.{i}")
            if source is None:
                raise GossamerError(
                    "the swarm's state does not fit this model (different parameters): check "
                    "that every peer runs the same model config"
                )
            if source.shape != param.shape or source.dtype != param.dtype:
                raise GossamerError(
                    f"the swarm's parameter {i} is {source.dtype} of shape "
                    f"{tuple(source.shape)}, this peer's {param.dtype} of {tuple(param.shape)}: "
                    "check that every peer runs the same model config"
                )
            sources.append(source)
        prefix = "optim."
        optimizer_tensors = {
            name[len(prefix) :]: tensor
            for name, tensor in snapshot.tensors.items()
            if name.startswith(prefix)
        }
        # The optimizer first: torch checks its groups before it changes anything, and the
        # weights are copied only once it took the state.
        try:
            state = unflatten_optimizer_state(optimizer_tensors, snapshot.meta.get("optimizer"))
            _check_optimizer_state(self._optimizer, state)
            self._optimizer.load_state_dict(state)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise GossamerError(
                f"the swarm's optimizer state does not fit this peer's ({exc}): check that every "
                "peer runs the same model and optimizer config"
            ) from exc
        with torch.no_grad():
            for param, source in zip(params, sources, strict=True):
                param.copy_(source)


def _check_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Refuse an optimizer ``state`` (a ``state_dict``) that does not fit ``optimizer``: torch's
    ``load_state_dict`` takes it (casting floating tensors to their parameter's dtype), and the
    first step fails, or trains on with hyperparameters of another shape.

    Checked: the groups are as many as this optimizer's, each with its keys and as many
    parameters, and each hyperparameter of the same type as this optimizer's (tuples and
    lists of the same length, item by item; tensors of the same shape and dtype). Each
    parameter's state, where it has any, holds the keys this optimizer keeps for it, each
    tensor of the same shape and dtype: as in this optimizer's own state for the parameter,
    or, where it has none yet, as it builds it (:func:`_built_state`; ``step`` 0-dim).

    Raises:
        ValueError: what does not fit, named (``param_groups[0]['betas']``, ``'exp_avg' of
            parameter 3``). (Malformed trees raise what indexing them does.)
    """
    saved_groups, saved_state = state["param_groups"], state["state"]
    if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
        raise ValueError("its param_groups is not a list, or its state not a dict")
    groups = optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(f"it has {len(saved_groups)} param_groups, this peer's {len(groups)}")
    owners: dict[Any, tuple[int, torch.Tensor]] = {}
    for number, (saved, group) in enumerate(zip(saved_groups, groups, strict=True)):
        if not isinstance(saved, dict) or saved.keys() != group.keys():
            keys = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(f"its param_groups[{number}] has keys {keys}, not {sorted(group)}")
        for key, value in group.items():
            if key != "params":
                _check_like(f"param_groups[{number}][{key!r}]", saved[key], value)
        saved_params = saved["params"]
        if not isinstance(saved_params, list) or len(saved_params) != len(group["params"]):
            raise ValueError(
                f"its param_groups[{number}] holds other parameters than this peer's "
                f"{len(group['params'])}"
            )
        for index, param in zip(saved_params, group["params"], strict=True):
            owners[index] = (number, param)
    built: dict[tuple[int, torch.dtype, torch.device], dict[str, Any] | None] = {}
    for index, entry in saved_state.items():
        if index not in owners:
            raise ValueError(f"it keeps state for parameter {index!r}, of none of its groups")
        if not isinstance(entry, dict):
            raise ValueError(f"its state of parameter {index!r} is not a dict")
        if not entry:
            continue  # (a parameter not trained yet: none on either side)
        number, param = owners[index]
        expected = optimizer.state.get(param)
        if not expected:
            like = (number, param.dtype, param.device)
            if like not in built:
                built[like] = _built_state(optimizer, groups[number], param)
            expected = _like_param(built[like], param)
        if expected is None:  # (not known how it builds state: elementwise, step a scalar)
            for name, value in entry.items():
                if isinstance(value, torch.Tensor):
                    shape = () if name == "step" else tuple(param.shape)
                    dtype = value.dtype if name == "step" else param.dtype
                    own = torch.empty(shape, dtype=dtype, device="meta")
                    _check_like(f"{name!r} of parameter {index!r}", value, own)
            continue
        if entry.keys() != expected.keys():
            raise ValueError(
                f"its state of parameter {index!r} has keys {sorted(entry)}, this peer's "
                f"optimizer keeps {sorted(expected)}"
            )
        for name, value in expected.items():
            _check_like(f"{name!r} of parameter {index!r}", entry[name], value)


def _check_like(what: str, theirs: object, ours: object) -> None:
    """Refuse ``theirs`` where it is not of ``ours``' type (a tensor: shape and dtype; a tuple
    or list: length, and each item so). An int and a float are both numbers (a schedule writes
    a float learning rate where the config gave an int); a bool is not one.

    Raises:
        ValueError: naming ``what`` and how it differs.
    """
    if isinstance(ours, torch.Tensor):
        if not isinstance(theirs, torch.Tensor):
            raise ValueError(f"its {what} is a {type(theirs).__name__}, not a tensor")
        if theirs.shape != ours.shape or theirs.dtype != ours.dtype:
            raise ValueError(
                f"its {what} is {theirs.dtype} of shape {tuple(theirs.shape)}, this peer's "
                f"{ours.dtype} of {tuple(ours.shape)}"
            )
        return
    if type(theirs) is not type(ours) and not (_is_number(theirs) and _is_number(ours)):
        raise ValueError(
            f"its {what} is a {type(theirs).__name__}, this peer's a {type(ours).__name__}"
        )
    if isinstance(ours, tuple | list):
        assert isinstance(theirs, tuple | list)
        if len(theirs) != len(ours):
            raise ValueError(f"its {what} has {len(theirs)} items, this peer's {len(ours)}")
        for number, (item, own) in enumerate(zip(theirs, ours, strict=True)):
            _check_like(f"{what}[{number}]", item, own)


def _is_number(value: object) -> bool:
    return type(value) in (int, float)


def _built_state(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], param: torch.Tensor
) -> dict[str, Any] | None:
    """The state ``optimizer`` builds for a parameter of ``param``'s dtype and device in
    ``group``, read off one step of an optimizer of its class and ``group``'s hyperparameters
    on a stand-in of shape :data:`_STAND_IN_SHAPE` (None where that cannot be made)."""
    try:
        stand_in = torch.zeros(
            _STAND_IN_SHAPE, dtype=param.dtype, device=param.device, requires_grad=True
        )
        stand_in.grad = torch.zeros_like(stand_in)
        hyperparameters = {key: value for key, value in group.items() if key != "params"}
        optimizer_class: Callable[..., torch.optim.Optimizer] = type(optimizer)
        probe = optimizer_class([{"params": [stand_in], **hyperparameters}])
        probe.step()
        return dict(probe.state[stand_in])
    except Exception:  # an optimizer class that takes other arguments, say
        return None


_STAND_IN_SHAPE = (2,)
"""The stand-in parameter's shape in :func:`_built_state`: a state of it is elementwise."""


def _like_param(built: dict[str, Any] | None, param: torch.Tensor) -> dict[str, Any] | None:
    """The state ``built`` by :func:`_built_state` as it is for ``param``: its elementwise
    tensors of ``param``'s shape (on the meta device: only shapes and dtypes are compared)."""
    if built is None:
        return None
    return {
        key: torch.empty(
            param.shape if value.shape == _STAND_IN_SHAPE else value.shape,
            dtype=value.dtype,
            device="meta",
        )
        if isinstance(value, torch.Tensor)
        else value
        for key, value in built.items()
    }
