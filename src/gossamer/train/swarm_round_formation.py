"""Forming a swarm round's group on the DHT: each peer announces itself with a time stamp,
waits for the run's active peers (or a join window), publishes the round's close and reads
the members after a propagation grace; peers nudge each other so a round starts as soon as
its last member comes, and agree on their clocks' correction first.

:class:`_RoundFormation` is the part of
:class:`~gossamer.train.swarm_averager.SwarmAverager` that does this; see that module's
docstring."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

from gossamer.comm.bandwidth import (
    DEFAULT_BYTES_PER_S,
    BandwidthMeter,
    agreed_send_rates,
    plan_weights,
)
from gossamer.comm.codecs import CodecPolicy
from gossamer.comm.groups import split_into_groups
from gossamer.comm.plan import round_key_tag
from gossamer.comm.torch_backend import (
    TorchGroupAverager,
)
from gossamer.comm.transport import CommMailbox
from gossamer.core.errors import (
    DeadlineExceededError,
    GossamerError,
)
from gossamer.net.node import Node
from gossamer.proto import net_pb2
from gossamer.train.swarm_membership import _RunMembership
from gossamer.train.swarm_round_records import (
    _active,
    _close_key,
    _figure,
    _Formed,
    round_entry_key,
    round_settled,
)
from gossamer.train.swarm_torch_rounds import _torch_kind

__all__ = [
    "NUDGE_TOPIC",
    "ROUND_DEADLINE_MARGIN",
    "UNMEASURED_BYTES_PER_S",
    "buffer_wire_nbytes",
    "deadline_bytes_per_s",
    "deadline_figure",
    "formed_group",
    "lowest_figure_of_any_group",
    "measured",
    "round_deadline_s",
]

logger = logging.getLogger(__name__)

NUDGE_TOPIC = "gossamer.train.round_nudge.v1"
"""The bulk topic of round nudges: the payload is the round key, UTF-8."""
_MAX_NUDGE_BYTES = 1024
_MAX_AWAITED_ROUNDS = 16
_VERSION_READS_AFTER_S = (0.0, 1.0, 2.0)
"""Delays between the reads of the run's versions a nudge for a round this peer is not forming
starts (one series at a time: a burst of nudges, forged ones included, costs three reads)."""
_NUDGE_TIMEOUT_S = 5.0
_CLOCK_SAMPLE_TIMEOUT_S = 1.0
_CLOCK_WARNING_EVERY_S = 600.0

ROUND_DEADLINE_MARGIN = 2.0
"""A round's deadline over its ring bound. The bound is what the buffer takes at the slowest
member's figure with nothing else on the link; the figure is a moving average of earlier
rounds (a link that slowed since carries less), it is what the sender's uplink carried, while
a round also waits on receivers' downlinks shared by every sender, on encoding and on
messages' headers and latency, and the reduce phase ends at a share of the deadline
(``AllReduceConfig.reduce_deadline_share``, 0.7) to leave time for the averages' way back.
Measured, a 16 MB round between 2 peers at 1 Mbit/s took 137 s against a 128 s bound: twice
the bound leaves room for all of this, and a round that goes well ends long before it."""


def formed_group(
    group: list[str], missing: list[str], records: dict[str, dict[str, Any]]
) -> _Formed:
    """The round of ``group`` as every member fixes it from the same round entries
    (``records``, in group order): the part weights and the send rates from the members'
    figures. The round's deadline follows from the same entries (:func:`round_deadline_s` at
    :func:`deadline_bytes_per_s`: an unmeasured member counts at a low figure there)."""
    estimates = [_figure(r) for r in records.values()]
    floors = [_figure(r, "bwf") for r in records.values()]
    return _Formed(
        group, missing, plan_weights(estimates), agreed_send_rates(estimates, floors), records
    )


UNMEASURED_BYTES_PER_S = 125_000.0
"""The send rate (1 Mbit/s) a round's deadline counts a member at whose meter measured nothing
yet: its published figure is the meter's start value (100 Mbit/s), not its link's. Counted at
that, a new peer on a thin link cut the first round of a run at the floor, averaged part of the
model, and the swarm's states drifted apart (3 peers at 2 Mbit/s with a 10 MB model: no round
complete in 8 minutes). 1 Mbit/s is the thinnest uplink this project trains over (a home ADSL
line's): a first round slower than that is cut, as any round at its deadline. The cost of the
low figure is small: the deadline is a bound, not a wait, so a round over fast links still ends
as soon as its parts are in; it only waits longer for a member that never answers, and it goes
over p2p rather than torch.distributed (see :meth:`SwarmAverager._round_configs
<gossamer.train.swarm_averager.SwarmAverager._round_configs>`), which measures the links for
the next round."""


def measured(entry: dict[str, Any]) -> bool:
    """Whether a round entry's figure was measured: its ``bwm`` (the writer's number of
    measurements) is missing (a peer from before the field published measured figures only as
    far as anyone could tell: as before, its figure counts) or unreadable, or positive."""
    count = entry.get("bwm")
    if isinstance(count, bool) or not isinstance(count, int | float):
        return True
    return not count <= 0  # (NaN: unreadable, so measured)


def deadline_figure(entry: dict[str, Any]) -> float:
    """A member's figure as its round's deadline counts it: its published send rate, or at
    most :data:`UNMEASURED_BYTES_PER_S` where its meter measured nothing yet (:func:`measured`).
    The part weights and the send order keep the published figure."""
    figure = _figure(entry)
    if measured(entry):
        return figure
    usable = math.isfinite(figure) and figure > 0
    return min(figure, UNMEASURED_BYTES_PER_S) if usable else UNMEASURED_BYTES_PER_S


def deadline_bytes_per_s(records: Sequence[dict[str, Any]]) -> float:
    """The send rate a group of members with round entries ``records`` sizes its deadline by
    (:func:`round_deadline_s`): the slowest member's :func:`deadline_figure`, clamped as
    :func:`~gossamer.comm.bandwidth.agreed_send_rates` clamps the estimates (an unreadable
    figure counts as the median, none below a hundredth of it, so one member that publishes
    1 B/s cannot stretch its group's round to the cap unless it is half the group); the
    default (100 Mbit/s) where no member's figure is usable. A pure function of the entries,
    the same on every member and on a peer asking about the round afterwards."""
    figures = [deadline_figure(r) for r in records]
    if not any(math.isfinite(f) and f > 0 for f in figures):
        return DEFAULT_BYTES_PER_S
    return min(plan_weights(figures))


def lowest_figure_of_any_group(records: Sequence[dict[str, Any]]) -> float:
    """The send rate a group of exactly these members' entries sizes its deadline by
    (:func:`deadline_bytes_per_s`): clamped as the group clamps it. (It took the lowest
    figure unclamped, so one member publishing 1 B/s made a peer wait 910 s on a round whose
    group had a 214 s deadline.) A round split into several groups is bounded group by group
    (:meth:`SwarmAverager._averaging_bound_of_s
    <gossamer.train.swarm_averager.SwarmAverager._averaging_bound_of_s>`)."""
    return deadline_bytes_per_s(records)


def buffer_wire_nbytes(numels: Sequence[int], policy: CodecPolicy) -> int:
    """The bytes one member's buffer of tensors of ``numels`` values takes on the wire: each
    tensor in the codec ``policy`` picks for it (small tensors go in fp32), e.g. 4 B a value
    in fp32, 2 in fp16 and bf16, 1 in int8 and a 4-byte scale per ``policy.block_size``
    values. Message headers are left out (the margin covers them)."""
    total = 0
    for numel in numels:
        choice = policy.choose(numel)
        total += choice.codec.encoded_nbytes(numel, choice.block_size)
    return total


def round_deadline_s(
    *,
    num_members: int,
    wire_nbytes: int,
    lowest_bytes_per_s: float,
    floor_s: float,
    cap_s: float,
) -> tuple[float, float]:
    """The deadline of a round's all-reduce, and what its members' links need.

    What they need is :data:`ROUND_DEADLINE_MARGIN` times the ring bound, 2(N-1)/N times the
    buffer's bytes on the wire over the slowest member's send rate: the least any all-reduce
    sends and receives per member. The deadline is that, clamped to ``floor_s``..``cap_s``.
    A pure function of figures every member of the round agreed on (the members, the
    slowest member's published figure as :func:`~gossamer.comm.bandwidth.agreed_send_rates`
    clamps it) and of the tensors' sizes (the same on every member), so every member
    computes the same deadline. A figure that is not a positive finite number (nothing
    usable was published) gives the cap, never an infinite deadline.

    Args:
        num_members: the round's group size.
        wire_nbytes: one member's buffer on the wire (:func:`buffer_wire_nbytes`).
        lowest_bytes_per_s: the slowest member's send rate (bytes/s).
        floor_s: the shortest deadline (``round_timeout_s``).
        cap_s: the longest (``max_round_timeout_s``).

    Returns:
        The deadline in seconds, and the unclamped need (inf where the figure is unusable).
    """
    if num_members < 2 or wire_nbytes <= 0:
        return floor_s, 0.0
    if not (math.isfinite(lowest_bytes_per_s) and lowest_bytes_per_s > 0):
        return cap_s, math.inf
    ring_bound_s = 2 * (num_members - 1) / num_members * wire_nbytes / lowest_bytes_per_s
    needed_s = ROUND_DEADLINE_MARGIN * ring_bound_s
    return min(max(needed_s, floor_s), cap_s), needed_s


class _RoundFormation(_RunMembership):
    """The group formation of a :class:`~gossamer.train.swarm_averager.SwarmAverager`'s rounds."""

    # Set by SwarmAverager.__init__ (see there).
    meter: BandwidthMeter
    _mailbox: CommMailbox | None
    _other_incarnations: dict[str, str]
    _run_peers: set[str] | None
    _clock_correction_warned_s: float
    _clock_warned_at_s: dict[str, float]
    _nudged: dict[str, asyncio.Event]
    _nudges_in_flight: set[asyncio.Task[None]]
    _awaited_in: dict[str, None]
    _awaited_lock: threading.Lock
    _reading_versions: asyncio.Task[None] | None
    _torch_rounds_to_skip: int
    _torch: TorchGroupAverager | None
    _abandoned_torch: list[threading.Thread]
    _store_address: str
    _layout: str
    _recent_deadlines_s: deque[float]

    def _entry_ttl_s(self) -> float:
        """How long this peer's round entries and closes live: past any formation and any
        averaging of the round (see :meth:`SwarmAveragerConfig.entry_ttl_within_s`), for a
        deadline as long as the longest this peer computed or read in its recent rounds, or
        the cap before it knows any. Not the cap always: with rounds fast and frequent (every
        0.2 s), the cap's 1091 s kept so many of a peer's records alive that replicas refused
        its stores (``max_records_per_publisher``). A round far slower than the recent ones
        (a new member on a thin link) may outlive its entries; a peer asking about its fate
        then finds no close and waits as for a round it knows nothing of."""
        if not self._recent_deadlines_s:
            return self.config.entry_ttl_s
        return self.config.entry_ttl_within_s(max(self._recent_deadlines_s))

    async def _form_group(self, node: Node, key: str) -> _Formed:
        """The members of round ``key``, the run's peers that did not come, and part weights.

        Every entry carries its writer's measured send throughput; the part weights follow the
        members' figures (:func:`~gossamer.comm.bandwidth.plan_weights`), the same on every member.

        The round waits for every peer that joined the run and has not left (a peer reported gone
        by the failure detector is not waited for), or ``join_window_s`` after its first
        announcement, whichever is first. It closes at the last awaited announcement; every
        entry stamped by then is a member. A peer that closed the round earlier (it expected fewer
        peers) decides for everyone: the earliest published close counts, so a late reader never
        counts a member that already left. Records carry the writer's incarnation (a nonce per
        process), so what a killed incarnation left on the DHT is ignored after a restart.

        Members are read again ``propagation_grace_s`` after the close, so announcements still on
        their way are seen, unless the round has settled earlier (see :func:`round_settled`):
        then nothing still on its way could change the members.
        """
        nudged = self._nudged[key] = asyncio.Event()
        if self._mailbox is not None:  # settled when this peer last went on alone in this key
            self._mailbox.unsettle_key(round_key_tag(key))
        try:
            return await self._form_group_nudged(node, key, nudged)
        finally:
            self._nudged.pop(key, None)

    async def _form_group_nudged(self, node: Node, key: str, nudged: asyncio.Event) -> _Formed:
        """:meth:`_form_group`, waking between reads when ``nudged`` is set."""
        grace = self.config.propagation_grace_s
        poll_s = self.config.poll_interval_s
        entry_key = round_entry_key(key)
        close_key = _close_key(key)
        correction_s = self._correction_s = await self._clock_correction_s(node)
        # Stamped after the lookup, so it is on the replicas one store's round trip after its
        # stamp: a peer that closes the round after that stamp reads it by its grace's end.
        replicas = await node.dht.lookup(entry_key)

        def now() -> float:
            return self._clock.wall() + correction_s

        stamp = now()
        figure = self.meter.estimate_bytes_per_s
        entry: dict[str, Any] = {
            "at": stamp,
            "bw": figure,
            "bwf": self.meter.floor_bytes_per_s,
            "bwm": self.meter.num_measurements,  # (0: "bw" is the meter's start value)
            "inc": self.incarnation,
        }
        if self.settings:
            entry["cfg"] = self.settings
        self._abandoned_torch = [t for t in self._abandoned_torch if t.is_alive()]
        if self._torch_rounds_to_skip > 0:  # after failures: this round over p2p
            self._torch_rounds_to_skip -= 1
        elif self._abandoned_torch:
            pass  # a torch round given up on may still hold the store: this one over p2p
        elif self._store_address and node.reachability != net_pb2.REACHABILITY_RELAYED:
            held = self._torch.group_hash if self._torch is not None else None
            entry |= {
                "tcp": self._store_address,
                "pg": held or "",
                "dev": _torch_kind(),
                "bk": self.config.backend,  # (torch: any address; auto: private ones only)
                "lay": self._layout,
            }
        stored = await node.dht.put(
            entry_key,
            json.dumps(entry).encode(),
            self._entry_ttl_s(),
            closest=replicas,
            renew=False,
        )
        if replicas and not stored:  # (nobody reads it: counting itself it would be alone)
            raise DeadlineExceededError(
                f"round {key}: no replica took this peer's entry (the key is full, or none "
                "answered); this peer sits the round out"
            )
        seen: dict[str, dict[str, Any]] = {}
        both = [(entry_key, "at"), (close_key, "close_at")]
        memberships, (entries, closes) = await self._read_round(node, both, seen)
        entries, closes = self._this_run_s(node, entries), self._this_run_s(node, closes)
        expected = _active(memberships, node.peer_id)
        self._run_peers = expected
        self._nudge(node, expected, key)  # (_memberships watches them)
        alive_at_start = {p for p in expected if self._alive(node, p)}
        close_at: float | None = None
        everyone_came = False
        reported_ahead: set[str] = set()
        # Peers whose entries carry other settings: neither members nor awaited. Those whose
        # entries did in an earlier round are not awaited in this one before they come (it
        # waited for them to the join window every round), unless they restarted since.
        other = {
            p
            for p in expected
            if p in self._other_incarnations and memberships[p][2] == self._other_incarnations[p]
        }
        tolerance_s = self.config.clock_tolerance_s or self.config.join_window_s
        while True:
            entries[node.peer_id] = stamp
            ahead = {p for p, at in entries.items() if at > now() + tolerance_s}
            if ahead:  # after any close this peer could make: neither a member nor awaited
                if ahead - reported_ahead:
                    logger.warning(
                        "round %s: the entries of %s are stamped over %.1f s ahead of this "
                        "peer's time; they are left out of the round",
                        key,
                        ", ".join(sorted(p[:8] for p in ahead - reported_ahead)),
                        tolerance_s,
                    )
                    reported_ahead |= ahead
                entries = {p: at for p, at in entries.items() if p not in ahead}
            other |= self._left_out_for_settings(key, entries, seen)
            entries = {p: at for p, at in entries.items() if p not in other}
            opens_at = min(entries.values())
            awaited = {p for p in expected if self._alive(node, p)} - ahead - other
            # (a peer left out for its settings closes rounds of its own)
            closed_before = [at for p, at in closes.items() if at < stamp and p not in other]
            if closed_before:
                # Someone closed the round before this peer came (it is behind: the others
                # moved on, and those it awaits may never come to this round): the earliest
                # close decides, so this peer is out of it; no need to wait for the window.
                close_at = min(closed_before)
                break
            if awaited <= set(entries):
                close_at = max(entries[p] for p in awaited | {node.peer_id})
                everyone_came = expected - other <= set(entries)
                break
            if now() >= opens_at + self.config.join_window_s:
                close_at = opens_at + self.config.join_window_s
                break
            await self._until_nudged(nudged, poll_s)
            _, (entries, closes) = await self._read_round(node, both, seen)
            entries, closes = self._this_run_s(node, entries), self._this_run_s(node, closes)
        await node.dht.put(
            close_key,
            json.dumps({"close_at": close_at, "inc": self.incarnation}).encode(),
            self._entry_ttl_s(),
            renew=False,
        )
        self._nudge(node, expected, key)
        read_after = close_at + grace
        while True:
            read_at = now()
            memberships, (latest, closes) = await self._read_round(
                node, [(entry_key, "at"), (close_key, "close_at")], seen
            )
            latest, closes = self._this_run_s(node, latest), self._this_run_s(node, closes)
            if read_at >= read_after:
                break  # the full grace has passed: what this read saw decides
            other |= self._left_out_for_settings(key, latest, seen)
            if everyone_came and round_settled(
                me=node.peer_id,
                stamp=stamp,
                close_at=close_at,
                active=_active(memberships, node.peer_id) - other,
                entries={p: at for p, at in {**entries, **latest}.items() if p not in other},
                closes={p: at for p, at in closes.items() if p not in other},
                join_window_s=self.config.join_window_s,
            ):
                break
            await self._until_nudged(nudged, min(poll_s / 2, max(0.0, read_after - now())))
        close_at = min([close_at, *(at for p, at in closes.items() if p not in other)])
        entries.update(latest)
        other |= self._left_out_for_settings(key, entries, seen)
        entries = {p: at for p, at in entries.items() if p not in other}
        if stamp > close_at:
            logger.warning("peer %s came after round %s closed", node.peer_id[:8], key)
            return _Formed([], [], [], None, {})
        members = [p for p, at in entries.items() if at <= close_at]
        missing = sorted(alive_at_start - set(members))  # not those already known gone
        groups = split_into_groups(key, members, self.config.max_group_size)
        group = next(g for g in groups if node.peer_id in g)
        seen[node.peer_id] = entry
        return formed_group(group, missing, {p: seen.get(p, {}) for p in group})

    def _left_out_for_settings(
        self, key: str, entries: dict[str, float], seen: dict[str, dict[str, Any]]
    ) -> set[str]:
        """The peers of ``entries`` whose round entries carry other :attr:`settings`: left out
        of round ``key`` (neither members nor awaited), each said once in a warning and
        listed in :attr:`other_settings`."""
        other: set[str] = set()
        for peer in entries:
            differs = self._settings_differ(seen.get(peer, {}))
            if not differs:
                continue
            other.add(peer)
            self._other_incarnations[peer] = str(seen.get(peer, {}).get("inc", ""))
            if peer not in self.other_settings:
                logger.warning(
                    "peer %s: round %s: peer %s uses other settings than this peer (%s); every "
                    "peer of a run must use the same: it is left out of this peer's rounds",
                    self.peer_id[:8],
                    key,
                    peer[:8],
                    differs,
                )
                self.other_settings = {**self.other_settings, peer: differs}
        self._note_other_settings()
        return other

    async def _clock_correction_s(self, node: Node) -> float:
        """What to add to this peer's wall clock for round formation: nothing while it agrees
        with most of the run's peers, the majority's offset when it alone is off (see
        :meth:`~gossamer.net.peer_clocks.PeerClocks.correction_s`).

        Round formation compares stamps made on different machines: a peer whose clock is
        behind would find every round closed before it came, one ahead would hold the others
        past their windows. Peers whose clocks were never sampled (the first round, a newcomer)
        are pinged first, for at most :data:`_CLOCK_SAMPLE_TIMEOUT_S`.
        """
        peers = self._run_peers
        if peers is None:
            peers = _active(await self._memberships(node), node.peer_id)
        peers = peers | set(self.joining)
        now_s = self._clock.monotonic()
        unsampled = [
            p
            for p in peers
            if node.peer_clocks.best(p, now_s=now_s) is None and self._alive(node, p)
        ]

        async def sample(peer: str) -> None:
            try:
                await node.ping(peer, timeout_s=_CLOCK_SAMPLE_TIMEOUT_S)
            except GossamerError as exc:  # it counts once its heartbeats answer
                logger.debug("clock of %s not sampled: %s", peer[:8], exc)

        await asyncio.gather(*(sample(p) for p in unsampled))
        now_s = self._clock.monotonic()
        agree_s = self.config.propagation_grace_s / 2
        correction_s = node.peer_clocks.correction_s(peers, now_s=now_s, agree_s=agree_s)
        # Warnings at most once per _CLOCK_WARNING_EVERY_S each: a clock near the edge of the
        # tolerance flips in and out of it from one round to the next.
        due = now_s - self._clock_warned_at_s.get("", -math.inf) >= _CLOCK_WARNING_EVERY_S
        if abs(correction_s - self._clock_correction_warned_s) > agree_s and due:
            self._clock_correction_warned_s = correction_s
            if correction_s:
                self._clock_warned_at_s[""] = now_s
                logger.warning(
                    "peer %s: this machine's clock is %+.2f s from the one most of run %s's "
                    "peers share; rounds use theirs. Synchronise the clock (NTP).",
                    node.peer_id[:8],
                    -correction_s,
                    self.config.run_id,
                )
        for peer in sorted(peers):
            offset_s = node.peer_clocks.offset_s(peer, now_s=now_s)
            off = offset_s is not None and abs(offset_s - correction_s) > agree_s
            due = now_s - self._clock_warned_at_s.get(peer, -math.inf) >= _CLOCK_WARNING_EVERY_S
            if off and due:
                self._clock_warned_at_s[peer] = now_s
                logger.warning(
                    "peer %s: peer %s's clock is %+.2f s from this one's: rounds need clocks "
                    "within %.2f s of each other (a peer behind comes after rounds close, one "
                    "ahead holds the others). Synchronise the clocks (NTP).",
                    node.peer_id[:8],
                    peer[:8],
                    offset_s - correction_s if offset_s is not None else 0.0,
                    agree_s,
                )
        return correction_s

    async def _on_nudge(self, sender: str, topic: str, payload: bytearray) -> None:
        """A peer announced itself or closed a round: read that round's records again now."""
        del sender, topic  # (a longer payload than a round key is refused by net: max_bytes)
        key = bytes(payload).decode("utf-8", errors="replace")
        event = self._nudged.get(key)
        if event is not None:
            event.set()
            return
        prefix = f"{self.config.run_id}/"
        if not key.startswith(prefix):
            return  # not this run's
        key = key[len(prefix) :]  # as the caller names its rounds
        with self._awaited_lock:  # a round forming elsewhere that waits for this peer
            self._awaited_in.pop(key, None)
            self._awaited_in[key] = None
            while len(self._awaited_in) > _MAX_AWAITED_ROUNDS:
                del self._awaited_in[next(iter(self._awaited_in))]
        if self._reading_versions is None or self._reading_versions.done():
            node = self.node_thread.node
            self._reading_versions = asyncio.get_running_loop().create_task(
                self._read_versions(node)
            )

    async def _read_versions(self, node: Node) -> None:
        """(after a nudge for a round this peer is not forming) Read the run's memberships now
        and again :data:`_VERSION_READS_AFTER_S` later, so ``newest_seen_version`` says whether
        the others' state is newer than this peer's without its caller reading the DHT: a
        peer nudged as it begins a round may publish its new version a moment later."""
        for delay_s in _VERSION_READS_AFTER_S:
            await asyncio.sleep(delay_s)
            try:
                self._note_versions(node, await self._memberships(node))
            except GossamerError as exc:
                logger.debug("reading the run's versions after a nudge failed: %s", exc)

    def rounds_awaiting(self) -> list[str]:
        """Keys (as callers name them) of rounds that other peers of the run are forming and
        wait for this peer in, as their nudges told it while it formed none of them (the latest
        last, at most
        :data:`_MAX_AWAITED_ROUNDS`). A peer that finds one ahead of its own state is behind:
        the others wait for it at that round (see the DiLoCo swarm strategy). Any peer can
        send a nudge: a caller checks the run's state versions (``newest_seen_version``, read
        after each such nudge) before acting on one."""
        with self._awaited_lock:
            return list(self._awaited_in)

    def _nudge(self, node: Node, peers: set[str], key: str) -> None:
        """Tell ``peers`` (in the background) to read round ``key``'s records again."""
        payload = key.encode()

        async def one(peer: str) -> None:
            try:
                await node.send_bulk(peer, NUDGE_TOPIC, payload, timeout_s=_NUDGE_TIMEOUT_S)
            except GossamerError as exc:  # the peer reads at its next poll instead
                logger.debug("nudge to %s for %s failed: %s", peer[:8], key, exc)

        for peer in peers:
            task = asyncio.get_running_loop().create_task(one(peer))
            self._nudges_in_flight.add(task)
            task.add_done_callback(self._nudges_in_flight.discard)

    @staticmethod
    async def _until_nudged(event: asyncio.Event, timeout_s: float) -> None:
        """Wait for a nudge or ``timeout_s``; the event is cleared for the read that follows."""
        if timeout_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout_s)
        event.clear()
