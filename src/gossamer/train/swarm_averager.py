"""Averaging across machines: group formation on the DHT, then comm's fault-tolerant all-reduce.

A round is named by the run and the round key (``run/outer/12``). Peers join the run by publishing
that they are active (and that they left, when they finish, and when: a peer that left before this
one joined is of an earlier run of the same name, and what it published is not this run's). Every
peer that reaches a round announces itself on the DHT with a time stamp, and waits for the run's
active peers (those the failure detector reports gone are not waited for) or, at most, a join
window from the round's first announcement. The round closes at the last awaited stamp; every entry
stamped by then is a member, so peers reading the same entries after a propagation grace agree on
the members without a leader. A peer that arrives after the round closed averages with nobody, and
the hash check after the outer step sends it to the donors for the swarm's state.
Peers read the DHT again at a poll interval while they wait, and nudge each other: a peer that
announced itself or published its close tells the run's other active peers directly (a tiny bulk
message naming the round), and a waiting peer reads again at once instead of at its next poll,
so a round starts as soon as its last member comes, not up to a poll interval later. Nudges only
hasten reads; the DHT records alone decide the members.
Members then run comm's all-reduce; a member that dies mid-round is dropped as soon as the failure
detector reports it gone (or a send to it fails) and the others finish with what arrived.

A member whose round failed (its all-reduce raised, the others dropped it, or its strategy found
the average unusable: :meth:`SwarmAverager.report_failed`) publishes that it did under the round
key. A round failed on every member when each of its members (the entries stamped by its close)
published that, or is gone or left the run: nobody's state moved, so no newer state will come
to wait for (:meth:`SwarmAverager.failed_everywhere`). Its records stay on the DHT and keep its
key closed (formed again under it, every member found the old close, earlier than its new
stamp, and missed the round), so a strategy forms the next attempt under a key of its own.
Where any member did not say it failed, that member may have averaged (with the others dropped):
the others wait for its newer state, or for its word that the round failed on it too, as long
as that member may still be in the round (:meth:`SwarmAverager.round_fate`): a member whose
all-reduce fails late (up to the round's deadline) still fails everywhere with the others, and
they all form the next attempt at the same boundary.

A strategy may name settings every member must share (:attr:`SwarmAverager.settings`, DiLoCo's
inner steps and outer optimizer); they go with its round entries, and an entry with other
values is neither a member nor awaited (an entry without them, from a peer of an older
version, counts as before). Such peers are listed in :attr:`SwarmAverager.other_settings`.
The settings go with a peer's membership too: a peer known to use other ones, by either, is no
donor of this peer's state and its state versions are not the run's
(:attr:`SwarmAverager.other_settings_peers`).

Where every member is on one site, a torch.distributed group does the all-reduce instead
(``backend``: ``auto`` or ``torch``): each peer keeps a ``TCPStore`` and publishes its address
with its round entry, the group's first member is the rendezvous, and the group is re-used for as
long as the same members come (each member publishes which group it holds, so all decide alike
from the same entries). A member lost during the collective makes it fail on the others (its
connections closed) or is reported gone by the failure detector (it hung); they give the group up
and run the round again over the peer-to-peer path, which drops the lost one at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch._C._distributed_c10d import Store

from gossamer.comm.allreduce import AllReduceConfig, all_reduce, decline_round
from gossamer.comm.bandwidth import BandwidthMeter
from gossamer.comm.codecs import CodecPolicy, ErrorFeedback
from gossamer.comm.groups import split_into_groups
from gossamer.comm.net_transport import NetCommTransport
from gossamer.comm.plan import round_key_tag
from gossamer.comm.report import AllReduceReport
from gossamer.comm.torch_backend import (
    RetiredRendezvous,
    TorchGroupAverager,
    layout_signature,
)
from gossamer.comm.transport import CommMailbox
from gossamer.core.clock import Clock
from gossamer.core.errors import (
    GossamerError,
    PeerUnavailableError,
)
from gossamer.net.bridge import NodeThread
from gossamer.net.node import Node
from gossamer.train.averaging import AverageOutcome, record_round_phases, withhold_if_not_finite
from gossamer.train.swarm_averager_config import SwarmAveragerConfig
from gossamer.train.swarm_round_formation import (
    _MAX_NUDGE_BYTES,
    NUDGE_TOPIC,
    _RoundFormation,
    buffer_wire_nbytes,
    deadline_bytes_per_s,
    lowest_figure_of_any_group,
    round_deadline_s,
)
from gossamer.train.swarm_round_records import _close_key, _failed_key, _Formed, round_entry_key
from gossamer.train.swarm_torch_rounds import (
    _torch_round_id,
    _TorchPresence,
    _TorchRounds,
)

__all__ = [
    "RoundFate",
    "SwarmAverager",
    "SwarmPendingRound",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundFate:
    """What a closed round's members said of it, as one read of the DHT found (see
    :meth:`SwarmAverager.round_fate`)."""

    failed_everywhere: bool
    """Every member published that the round failed on it, or is gone or left the run."""
    undecided: tuple[str, ...] = ()
    """Members that said neither and are alive: each may still average, or fail."""
    undecided_for_s: float = 0.0
    """How much longer (from the read) an ``undecided`` member may still be in the round:
    until its close plus how long its averaging may run, by the round's members' links (see
    :meth:`SwarmAverager._averaging_bound_of_s`; 0 when none is)."""
    newest_version: int | None = None
    """The newest state version the run's other active peers published (None: unknown)."""


_NUM_RECENT_DEADLINES = 16
"""How many recent rounds' deadlines size this peer's round entries' lifetime."""


def _send_timeout_s(round_timeout_s: float) -> float:
    """The send timeout of a round whose all-reduce has ``round_timeout_s``: half of it, at
    most 30 s (a message is given its share of the round besides, see
    :attr:`~gossamer.comm.allreduce.AllReduceConfig.send_timeout_s`)."""
    return min(30.0, round_timeout_s / 2)


def _group_size(num_members: int, report: AllReduceReport) -> int:
    """The members whose values are in this peer's averages (in some parts at least), at least
    1 (this peer's own values stand where nobody's are): the same count on every member of a
    round. Counted as the members not declared failed, a round that ran to its deadline
    without the others, who never came, counted as the whole group, and where the others
    withheld their values (weight 0) the one member with a weight counted itself alone while
    they counted the whole group."""
    if not report.parts:  # (nothing to average)
        return num_members - len(report.failed)
    contributors = {
        p for part in report.parts for p in part.contributors + part.partial_contributors
    }
    return max(1, len(contributors))


class SwarmAverager(_RoundFormation, _TorchRounds):
    """A :class:`~gossamer.train.averaging.TensorAverager` over a peer's node.

    Args:
        node_thread: the started node this peer speaks through.
        config: round settings.
    """

    def __init__(self, node_thread: NodeThread, config: SwarmAveragerConfig) -> None:
        self.node_thread = node_thread
        self.config = config
        self.feedback = ErrorFeedback()
        self.meter = BandwidthMeter()
        """This peer's send throughput, measured by every round, published with its entry; parts
        of the all-reduce are sized by the members' figures."""
        self._allreduce_config = AllReduceConfig(
            timeout_s=config.round_timeout_s,
            send_timeout_s=_send_timeout_s(config.round_timeout_s),
            codec=CodecPolicy(codec=config.codec),
        )
        """The all-reduce's settings at the floor deadline; each round's own deadline follows
        its members' links (see :meth:`_round_configs`)."""
        self._deadline_cap_warned = False
        """Whether a round's links needed more than ``max_round_timeout_s`` (said once)."""
        self._recent_deadlines_s: deque[float] = deque(maxlen=_NUM_RECENT_DEADLINES)
        """The deadlines of this peer's recent rounds, as it computed them for its own groups
        or read them from others' entries (see :meth:`_entry_ttl_s`)."""
        self._wire_nbytes: int | None = None
        """The bytes this peer's buffer takes on the wire, as its last round found (None
        before the first): every member of the run averages the same tensors."""
        self._mailbox: CommMailbox | None = None
        self.incarnation = secrets.token_hex(8)
        """A nonce of this process: records of a killed predecessor with the same key differ."""
        self.last_failed: list[str] = []
        """Peers dropped from the last round."""
        self.last_members: list[str] = []
        """The members of this peer's group in the last round (empty: it came late)."""
        self.settings: dict[str, Any] = {}
        """Settings every member of this peer's rounds must share (JSON values), published
        with its round entries; none if empty (see the module's docstring)."""
        self.other_settings: dict[str, str] = {}
        """Peers whose round entries carried other :attr:`settings` (left out of the rounds),
        with how they differ. Written on the node's loop (replaced whole), read anywhere."""
        self._members_of_other_settings: frozenset[str] = frozenset()
        """Peers whose membership record carries other :attr:`settings` (the last read)."""
        self.other_settings_peers: frozenset[str] = frozenset()
        """Peers known to use other :attr:`settings`: their round entries (see
        :attr:`other_settings`) or their membership records say so. Their state versions are
        left out of :attr:`newest_seen_version` and :meth:`newest_version`: an odd peer of a
        smaller H published higher versions, and the run's peers, counting them, downloaded
        its state (refused) every 0.2 s. Replaced whole on the node's loop, read anywhere."""
        self._other_incarnations: dict[str, str] = {}
        """The incarnation of each peer whose entry carried other settings (used on the
        node's loop only)."""
        self.newest_seen_version: int | None = None
        """The newest state version among the run's other active peers (not those of
        :attr:`other_settings_peers`), as the last round's
        formation, or the last read after a nudge for a round this peer is not forming, read it
        (None before either)."""
        self.joining: dict[str, int] = {}
        """Peers joining the run and the step each joins at, as the last round's formation read
        them (see :meth:`announce_joining`)."""
        self._run_peers: set[str] | None = None
        """The run's other active peers as the last round's formation read them (None before
        the first): whose clocks the next round's stamps agree with."""
        self._clock_correction_warned_s = 0.0
        self._correction_s = 0.0
        """The clock correction of the last round's formation (see _clock_correction_s)."""
        self._joined_at: float | None = None
        """When this peer first said it joins or is active in the run (its clock, corrected)."""
        self._seen_in_run: set[str] = set()
        """Peers whose membership this peer read as active or joining since it joined the run
        (see :meth:`_memberships`; used on the node's loop only)."""
        self.left_before_joining: frozenset[str] = frozenset()
        """Peers whose membership says they left the run before this peer joined it, as the
        last read found them: their records (round entries, hashes) are not this run's (see
        :meth:`_memberships`). Replaced whole on the node's loop, read anywhere."""
        self._clock_warned_at_s: dict[str, float] = {}
        """When a clock was last reported off, by peer ('' for this peer's own)."""

        self._nudged: dict[str, asyncio.Event] = {}
        """Rounds this peer is forming, set when a peer nudges (used on the node's loop only)."""
        self._nudges_in_flight: set[asyncio.Task[None]] = set()
        self._awaited_in: dict[str, None] = {}
        """Rounds other peers nudged this one for while it was not forming them, oldest first
        (at most :data:`_MAX_AWAITED_ROUNDS`): rounds that wait for it (see
        :meth:`rounds_awaiting`). Written on the node's loop, read on the caller's thread."""
        self._awaited_lock = threading.Lock()
        self._reading_versions: asyncio.Task[None] | None = None
        """Reads of the run's versions after a nudge (see :meth:`_read_versions`)."""
        self.rounds_by_backend: dict[str, int] = {"p2p": 0, "torch": 0}
        """Rounds with others this peer averaged, by the backend that did it."""
        self.torch_failures = 0
        """Rounds whose torch.distributed collective failed (run again over p2p)."""
        self._torch_failures_in_a_row = 0
        self._torch_rounds_to_skip = 0
        """Rounds for which this peer publishes no store address after failures, so every round
        it is in goes over p2p: 1 after a failure, doubling with each failure in a row (up to
        :data:`_MAX_TORCH_SKIP_ROUNDS`), so a torch path that keeps failing (gloo's ports
        blocked, say) costs a timeout now and then, not every round."""
        self._torch: TorchGroupAverager | None = None
        self._retired_rendezvous = RetiredRendezvous()
        """Keys of this peer's failed rendezvous, shared by the averagers that take each
        other's place (one given up on may still add to it)."""
        self._abandoned_torch: list[threading.Thread] = []
        """Threads of torch rounds given up on that have not ended yet (see _torch_round)."""
        self._store: Store | None = None
        self._store_address = ""
        """HOST:PORT of this peer's rendezvous store, published with its entries ('' without)."""
        self._leader_stores: dict[tuple[str, int], Store] = {}
        """Connections to other leaders' stores, by address."""
        self._torch_host = ""
        self._layout = ""
        """:func:`layout_signature` of the tensors this peer last averaged, published with its
        entries: a torch.distributed group is made only of members holding the same tensors
        ('' before the first round: the collective's own check stands behind it)."""
        self._open_torch_store()

        async def make_mailbox(node: Node) -> tuple[Clock, CommMailbox]:
            node.on_bulk(NUDGE_TOPIC, self._on_nudge, max_bytes=_MAX_NUDGE_BYTES)
            return node.clock, CommMailbox(NetCommTransport(node), node.clock)

        # The node's clock: round formation's stamps and the node's heartbeats share it.
        self._clock, self._mailbox = node_thread.run(make_mailbox, timeout_s=10)

    def close(self) -> None:
        """Tear down the torch.distributed group and the stores (idempotent)."""
        if self._torch is not None:
            self._torch.close()
        self._leader_stores.clear()
        self._store = None
        self._store_address = ""
        self._torch = None

    def average(
        self, tensors: list[torch.Tensor], *, round_key: str, weight: float
    ) -> AverageOutcome:
        """Average with whoever joins ``round_key`` in time; alone if nobody does.

        The round's group formation (waiting for the others) and its all-reduce are timed
        apart, returned in the outcome and recorded as "waiting" and "communication" spans
        nested in the caller's open span, if any.
        """
        return self._average(tensors, f"{self.config.run_id}/{round_key}", weight, None)

    def begin(self, round_key: str) -> SwarmPendingRound:
        """Start forming ``round_key``'s group on the node's loop and return at once.

        The group forms while the caller trains; :meth:`SwarmPendingRound.average` then runs
        the all-reduce, waiting only for what is left of the formation.
        """
        key = f"{self.config.run_id}/{round_key}"

        ended = threading.Event()

        async def start(node: Node) -> asyncio.Task[_Formed]:
            task = asyncio.get_running_loop().create_task(self._form_group(node, key))
            task.add_done_callback(lambda _: ended.set())
            return task

        try:
            task: asyncio.Task[_Formed] | None = self.node_thread.run(start, timeout_s=10)
        except GossamerError as exc:  # the round is missed, as when its formation fails
            logger.warning("round %s could not begin on this peer (%s)", key, exc)
            task = None
            ended.set()
        return SwarmPendingRound(self, key, task, ended)

    def _average(
        self,
        tensors: list[torch.Tensor],
        key: str,
        weight: float,
        forming: SwarmPendingRound | None,
    ) -> AverageOutcome:
        """The round ``key``: its group formation (already under way with ``forming``), then
        the all-reduce. With ``forming``, the time waited is what the caller waited for the
        group from this call on, not the formation's whole time (it trained meanwhile)."""
        tensors, weight = withhold_if_not_finite(tensors, weight, key)
        self._layout = layout_signature(tensors)
        wire_nbytes = buffer_wire_nbytes([t.numel() for t in tensors], self._allreduce_config.codec)
        self._wire_nbytes = wire_nbytes
        started = time.monotonic()
        wall_offset_s = time.time() - started
        marks: dict[str, float] = {}
        """Monotonic times the work reached on the node's loop: began, formed (the group)."""
        # A backstop, not the round's deadline: the all-reduce ends at its own deadline (see
        # _round_configs), a torch attempt at twice its timeout; this only catches the node's
        # work hung past all of them, so it counts each at its longest.
        deadline_s = (
            self.config.formation_bound_s  # (a clock tolerance over the join window included)
            + self.config.max_round_timeout_s  # (the round's own deadline is not known yet)
            + (self._torch_timeout_s * 2 if self._torch is not None else 0.0)
            + 10.0
        )

        async def work(node: Node) -> AverageOutcome:
            marks["began"] = time.monotonic()
            if forming is None:
                round_ = await self._form_group(node, key)
            elif forming.task is None:
                raise PeerUnavailableError(f"round {key} never began on this peer")
            else:
                round_ = await forming.task
            members, missing = round_.members, round_.missing
            self.last_members = list(members)
            marks["formed"] = formed = time.monotonic()
            assert self._mailbox is not None
            p2p_key = f"{key}/p2p"  # the key of the p2p re-run after a torch attempt
            if len(members) < 2:
                # A peer that counted this one (clocks apart, no majority to correct them) is
                # refused at its first message instead of waiting for one that never comes:
                # in the round, and in its p2p re-run where that peer tried torch first.
                self._mailbox.settle_key(round_key_tag(key))
                self._mailbox.settle_key(round_key_tag(p2p_key))
                return AverageOutcome(
                    tensors=[t.clone() for t in tensors],
                    group_size=len(members),
                    bytes_sent=0,
                    bytes_received=0,
                    seconds=formed - started,
                    missing_peers=missing,
                    excluded=not members,
                    wait_seconds=formed - marks["began"],
                )
            for peer in members:  # so that one dying from here on is noticed within seconds
                if peer != node.peer_id:
                    node.detector.watch(peer)
            round_config, rerun_config = self._round_configs(node, key, wire_nbytes, round_)
            result = None
            backend = "torch"
            plan = self._torch_plan(node, key, round_, round_config.timeout_s)
            if plan is not None:  # (its p2p re-run has a key of its own)
                presence = _TorchPresence(self._mailbox, _torch_round_id(key, plan))
                presence.open(plan.members, node.peer_id, self._torch_timeout_s)
                try:
                    result = await self._torch_round(node, plan, tensors, weight, p2p_key, presence)
                finally:
                    presence.close()
                if result is not None:  # a member whose collective failed runs it over p2p
                    decline_round(
                        tensors,
                        mailbox=self._mailbox,
                        members=members,
                        round_key=p2p_key,
                        config=round_config,
                        bandwidth_weights=round_.part_weights,
                    )
            if result is None:
                result = await all_reduce(
                    tensors,
                    mailbox=self._mailbox,
                    members=members,
                    round_key=key if plan is None else p2p_key,
                    config=round_config if plan is None else rerun_config,
                    weight=weight,
                    bandwidth_weights=round_.part_weights,
                    meter=self.meter,
                    send_rates=round_.send_rates,
                    feedback=self.feedback,
                    alive=lambda peer: self._alive(node, peer),
                    # A member whose collective succeeded (after a torch attempt), or one that
                    # counted other members (clocks apart), says so at once.
                    announce=True,
                )
                backend = "p2p"
            self.rounds_by_backend[backend] += 1
            report = result.report
            done = time.monotonic()
            return AverageOutcome(
                tensors=result.tensors,
                group_size=_group_size(len(members), report),
                bytes_sent=report.bytes_sent,
                bytes_received=report.bytes_received,
                seconds=done - started,
                failed_peers=sorted(report.failed),
                missing_peers=missing,
                wait_seconds=formed - marks["began"],
                communication_seconds=done - formed,
                backend=backend,
                # Dropped by the others: its own parts differ from theirs, so the strategy takes
                # the swarm's state, as for a missed round.
                excluded=report.excluded is not None,
            )

        try:
            outcome = self.node_thread.run(work, timeout_s=deadline_s)
            if outcome.excluded and outcome.group_size > 0:  # dropped by the others
                self._publish_failed(key)
        except GossamerError as exc:  # the deadline, or the node's work cut under it
            # Whatever the others did, this peer has no result: it counts as having missed the
            # round, and the strategy takes the swarm's state once the others publish it (or
            # forms the round again, where it failed on every member).
            logger.warning("round %s failed on this peer (%s); it missed the round", key, exc)
            self._publish_failed(key)
            now = time.monotonic()
            began, formed = marks.get("began", now), marks.get("formed", now)
            outcome = AverageOutcome(
                tensors=[t.clone() for t in tensors],
                group_size=0,
                bytes_sent=0,
                bytes_received=0,
                seconds=now - started,
                excluded=True,
                wait_seconds=formed - began,
                communication_seconds=now - formed,
            )
        record_round_phases(
            key,
            began_unix_s=marks.get("began", started) + wall_offset_s,
            wait_seconds=outcome.wait_seconds,
            communication_seconds=outcome.communication_seconds,
        )
        self.last_failed = outcome.failed_peers
        logger.info(
            "peer %s round %s: %d peers, %d bytes sent, %.2f s",
            self.peer_id[:8],
            key,
            outcome.group_size,
            outcome.bytes_sent,
            outcome.seconds,
        )
        return outcome

    def _round_configs(
        self, node: Node, key: str, wire_nbytes: int, round_: _Formed
    ) -> tuple[AllReduceConfig, AllReduceConfig]:
        """The all-reduce's settings for round ``key`` (of two members or more), and those of
        its p2p re-run after a torch.distributed attempt: the round's deadline follows its
        members' links (:func:`round_deadline_s`), and so does its send timeout.

        Computed from what formation fixed with the members and their part weights, the same
        on every member: the group, and the slowest member's figure of the same round entries
        (:func:`deadline_bytes_per_s`: clamped against the others', and a member that measured
        nothing yet counted at a low figure, not the meter's start value). A round whose links need
        more than ``max_round_timeout_s`` is cut there, with a warning once per run."""
        lowest = deadline_bytes_per_s([round_.entries.get(p, {}) for p in round_.members])
        timeout_s, needed_s = round_deadline_s(
            num_members=len(round_.members),
            wire_nbytes=wire_nbytes,
            lowest_bytes_per_s=lowest,
            floor_s=self.config.round_timeout_s,
            cap_s=self.config.max_round_timeout_s,
        )
        if needed_s > self.config.max_round_timeout_s and not self._deadline_cap_warned:
            self._deadline_cap_warned = True
            logger.warning(
                "peer %s round %s: %d members' %.1f MB each at %.3g Mbit/s (the slowest "
                "member's send rate) need a %.0f s deadline, past swarm.max_round_timeout_s "
                "(%.0f s): rounds are cut there and average part of what they should. Set "
                "swarm.max_round_timeout_s to at least %.0f (said once per run)",
                node.peer_id[:8],
                key,
                len(round_.members),
                wire_nbytes / 1e6,
                lowest * 8 / 1e6,
                needed_s,
                self.config.max_round_timeout_s,
                math.ceil(needed_s),
            )
        self._recent_deadlines_s.append(timeout_s)
        round_config = replace(
            self._allreduce_config, timeout_s=timeout_s, send_timeout_s=_send_timeout_s(timeout_s)
        )
        # The second: the round run again over p2p after a torch.distributed attempt. Members
        # leave the attempt at different times (one whose collective failed at once starts the
        # p2p round while another still waits in gloo's collective, which cannot be
        # interrupted), and messages to a member that has not opened the round yet wait in its
        # mailbox: with the usual send deadline the sender counted it failed just as it came.
        # There a message may wait until the round's deadline (a member that is gone is still
        # dropped at once by the failure detector, and no round waits past its deadline).
        return round_config, replace(round_config, send_timeout_s=timeout_s)

    def _averaging_bound_of_s(self, key: str, entries: dict[str, dict[str, Any]]) -> float:
        """How long after its close any member of round ``key`` of members with ``entries``
        may still average: :meth:`SwarmAveragerConfig.averaging_bound_within_s` of the longest
        deadline of its groups, each computed as its members compute it (the groups as
        formation splits them, each at :func:`lowest_figure_of_any_group` of its entries), or
        of ``max_round_timeout_s`` before this peer knows its buffer's size. A member that
        fails late fails within it, so the others wait for its word that long, and no
        longer."""
        if self._wire_nbytes is None or not entries:
            return self.config.averaging_bound_s
        longest_s = 0.0
        for group in split_into_groups(key, list(entries), self.config.max_group_size):
            deadline_s, _ = round_deadline_s(
                num_members=len(group),
                wire_nbytes=self._wire_nbytes,
                lowest_bytes_per_s=lowest_figure_of_any_group([entries[p] for p in group]),
                floor_s=self.config.round_timeout_s,
                cap_s=self.config.max_round_timeout_s,
            )
            longest_s = max(longest_s, deadline_s)
        self._recent_deadlines_s.append(longest_s)
        return self.config.averaging_bound_within_s(longest_s)

    def report_failed(self, round_key: str) -> None:
        """The round ``round_key`` (as :meth:`average` names it) failed on this peer although
        its all-reduce did not: its strategy could not use the average (it held values that
        are not finite). Published as a failed all-reduce is, so that where it failed on every
        member the strategy forms it again (see :meth:`failed_everywhere`)."""
        key = f"{self.config.run_id}/{round_key}"
        logger.warning(
            "peer %s: round %s failed here; its members were %s",
            self.peer_id[:8],
            key,
            ", ".join(p[:8] for p in self.last_members) or "none",
        )
        self._publish_failed(key)

    def _publish_failed(self, key: str) -> None:
        """Say on the DHT that round ``key`` (the full key) failed on this peer."""
        value = json.dumps({"failed_at": self._clock.wall(), "inc": self.incarnation}).encode()

        async def put(node: Node) -> None:
            await node.dht.put(_failed_key(key), value, self._entry_ttl_s(), renew=False)

        try:
            self.node_thread.run(put, timeout_s=15)
        except (GossamerError, RuntimeError) as exc:
            # The others wait for a newer state instead, then go on. RuntimeError: the node's
            # loop is closed (a round thread that outlived its peer's node; the put is closed
            # by the node thread, never run).
            logger.warning(
                "peer %s could not publish that round %s failed here: %s",
                self.peer_id[:8],
                key,
                exc,
            )

    def failed_everywhere(self, round_key: str) -> bool:
        """Whether the round ``round_key`` (as :meth:`average` names it) closed and failed on
        every one of its members: each published that it failed, or is gone or left the run
        (this peer counts as failed: it asks after its round failed or went on without it).
        Then nobody's state moved, and no newer state comes. False where it cannot tell (the
        DHT could not be read, the round never closed).
        """
        return self.round_fate(round_key).failed_everywhere

    def round_fate(self, round_key: str) -> RoundFate:
        """What the members of the round ``round_key`` (as :meth:`average` names it) said of
        it: whether it failed everywhere (see :meth:`failed_everywhere`), else which alive
        members said neither that it failed nor left, and how much longer they may still be
        in it. A peer whose own attempt failed waits that long for their word: one that gave
        up sooner (a member's all-reduce failed late, near its deadline) came back to the
        closed key at its next boundary, missed it again, and formed the next attempt a
        boundary after the others did; the peers ended an outer step apart.

        Nothing is known (not failed everywhere, nobody undecided) where the DHT could not be
        read or the round never closed.
        """
        key = f"{self.config.run_id}/{round_key}"
        reads = [
            (round_entry_key(key), "at"),
            (_close_key(key), "close_at"),
            (_failed_key(key), "failed_at"),
        ]

        async def read(node: Node) -> RoundFate:
            seen: dict[str, dict[str, Any]] = {}
            memberships, (entries, closes, failed) = await self._read_round(node, reads, seen)
            newest = self.newest_seen_version  # (noted from these memberships)
            if not closes:
                return RoundFate(failed_everywhere=False, newest_version=newest)
            close_at = min(closes.values())
            members = [
                p
                for p, at in entries.items()
                if at <= close_at and not self._settings_differ(seen.get(p, {}))
            ]

            def gave_up(peer: str) -> bool:
                state = memberships.get(peer, ("", 0, ""))[0]
                return (
                    peer == node.peer_id
                    or peer in failed
                    or state != "active"
                    or not self._alive(node, peer)
                )

            undecided = tuple(sorted(p for p in members if not gave_up(p)))
            if not undecided:
                return RoundFate(failed_everywhere=bool(members), newest_version=newest)
            now = self._clock.wall() + self._correction_s  # (the time the stamps are in)
            bound_s = self._averaging_bound_of_s(key, {p: seen.get(p, {}) for p in members})
            return RoundFate(
                failed_everywhere=False,
                undecided=undecided,
                undecided_for_s=max(0.0, close_at + bound_s - now),
                newest_version=newest,
            )

        try:
            return self.node_thread.run(read, timeout_s=15)
        except GossamerError as exc:
            logger.debug("reading what round %s's members said failed: %s", key, exc)
            return RoundFate(failed_everywhere=False)


class SwarmPendingRound:
    """A round of a :class:`SwarmAverager` whose group is forming on the node's loop.

    Made by :meth:`SwarmAverager.begin`.
    """

    def __init__(
        self,
        averager: SwarmAverager,
        key: str,
        task: asyncio.Task[_Formed] | None,
        ended: threading.Event,
    ) -> None:
        self.averager = averager
        self.key = key
        self.task = task
        """The formation, on the node's loop (await it only there); None if it never began."""
        self._ended = ended
        """Set (on the loop) once the formation ended."""

    def ready(self) -> bool:
        """Whether the formation has ended (formed, failed or cancelled)."""
        return self._ended.is_set()

    def average(self, tensors: list[torch.Tensor], *, weight: float) -> AverageOutcome:
        """The all-reduce of ``tensors`` with the formed group (waiting for it if still forming)."""
        return self.averager._average(tensors, self.key, weight, self)

    def cancel(self) -> None:
        """Stop the formation if it is still running (the peer is closing)."""
        task = self.task
        if task is not None and not self.ready():
            self.averager.node_thread.call_soon(task.cancel)
