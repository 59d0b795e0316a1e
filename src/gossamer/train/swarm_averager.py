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
import contextlib
import hashlib
import ipaddress
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch._C._distributed_c10d import Store

from gossamer.comm.allreduce import AllReduceConfig, all_reduce, decline_round
from gossamer.comm.bandwidth import BandwidthMeter, SendRates, agreed_send_rates, plan_weights
from gossamer.comm.codecs import CodecPolicy, ErrorFeedback
from gossamer.comm.groups import split_into_groups
from gossamer.comm.net_transport import NetCommTransport
from gossamer.comm.plan import ROUND_KEY_TAG_NBYTES, round_key_tag
from gossamer.comm.report import AllReduceReport, AllReduceResult
from gossamer.comm.torch_backend import (
    RetiredRendezvous,
    TorchGroupAverager,
    layout_signature,
    open_leader_store,
    open_member_store,
    site_local,
)
from gossamer.comm.transport import CommMailbox, Frame, FrameKind, pack_frame
from gossamer.core.clock import Clock
from gossamer.core.errors import (
    DeadlineExceededError,
    GossamerError,
    NotInRoundError,
    PeerLostError,
    PeerUnavailableError,
    ProtocolError,
)
from gossamer.net.bridge import NodeThread
from gossamer.net.identity import peer_id_of_public_key
from gossamer.net.node import Node
from gossamer.proto import net_pb2
from gossamer.train.averaging import AverageOutcome, record_round_phases, withhold_if_not_finite

__all__ = [
    "RoundFate",
    "SwarmAverager",
    "SwarmAveragerConfig",
    "SwarmPendingRound",
    "read_json_records",
    "round_entry_key",
    "round_settled",
    "settings_difference",
]

logger = logging.getLogger(__name__)

_ENTRY_TTL_S = 300.0


async def read_json_records(
    node: Node, key: bytes, *, replicated_only: bool = False
) -> list[tuple[str, dict[str, Any]]]:
    """(publisher, JSON object) of every record under ``key``; malformed ones are skipped.

    ``replicated_only``: see :meth:`~gossamer.net.dht.Dht.get`.
    """
    found = []
    for record in await node.dht.get(key, replicated_only=replicated_only):
        try:
            value = json.loads(bytes(record.value))
            publisher = peer_id_of_public_key(bytes(record.publisher_public_key))
        except (ValueError, RecursionError, GossamerError):  # (Recursion: nested too deep)
            continue
        if isinstance(value, dict):
            found.append((publisher, value))
    return found


def round_entry_key(round_key: str) -> bytes:
    """The DHT key of round ``round_key``'s entries (``RUN_ID/ROUND``, as rounds name them)."""
    return hashlib.sha256(f"gossamer.train.round/{round_key}".encode()).digest()


def _close_key(round_key: str) -> bytes:
    return hashlib.sha256(f"gossamer.train.close/{round_key}".encode()).digest()


def _members_key(run_id: str) -> bytes:
    return hashlib.sha256(f"gossamer.train.members/{run_id}".encode()).digest()


def _failed_key(round_key: str) -> bytes:
    """The DHT key under which a round's members say that it failed on them."""
    return hashlib.sha256(f"gossamer.train.failed/{round_key}".encode()).digest()


def settings_difference(theirs: object, mine: dict[str, Any]) -> str:
    """How another peer's settings ``theirs`` (from the network) differ from ``mine`` ('' if
    they do not): the first that differs, named as the ``swarm.`` setting it is, with both
    values. A setting ``theirs`` does not hold (a peer of another version) is not compared."""
    if not isinstance(theirs, dict):
        return "their settings are malformed"
    for name, value in mine.items():
        if name not in theirs:
            continue
        other = theirs[name]
        # (True == 1 in Python: a bool is only ever equal to a bool)
        if other != value or isinstance(other, bool) != isinstance(value, bool):
            return f"swarm.{name} is {repr(other)[:40]} there, {value!r} here"
    return ""


_MAX_TORCH_SKIP_ROUNDS = 64
"""Most rounds a peer sends over p2p after torch.distributed failures in a row."""

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


def _active(memberships: dict[str, tuple[str, int, str]], me: str) -> set[str]:
    """The run's other peers whose latest membership says they are active."""
    return {p for p, (state, _, _) in memberships.items() if state == "active" and p != me}


def round_settled(
    *,
    me: str,
    stamp: float,
    close_at: float,
    active: set[str],
    entries: dict[str, float],
    closes: dict[str, float],
    join_window_s: float,
) -> bool:
    """Whether a round's members are final before its propagation grace is over.

    The grace protects against an announcement stamped before the close that a reader has not
    seen yet (it would count it, another would not), and against an earlier close still on its
    way (the smallest close counts). Neither can happen once

    - every peer the run lists as active (read after the close) has announced: a peer's membership
      is on the DHT before its first announcement is stamped, so a peer that could still announce
      before the close is listed and makes this false;
    - every member has published a close, all equal to this peer's: a non-member's close is at
      least its own stamp, after this close, unless its join window ran out, and
    - this close comes before the join window of the round's first announcement runs out, so no
      peer can close by the window before it.

    A peer alone keeps the grace: it has no all-reduce to start sooner, and a swarm's first peer
    should not race through its rounds before the next peers can join (they start one after
    another).

    A DHT put returns once the record is on every replica a get asks, so whatever a peer
    published before its close is read by anyone who read its close.

    Args:
        me: this peer's id.
        stamp: this peer's announcement.
        close_at: the close this peer computed and published.
        active: the run's other active peers, read after the close.
        entries: the current announcements, by peer.
        closes: the current closes, by peer (this peer's included once published).
        join_window_s: the round's join window.
    """
    entries = {**entries, me: stamp}
    if not active <= set(entries):
        return False
    if close_at >= min(entries.values()) + join_window_s:
        return False
    others = [p for p, at in entries.items() if at <= close_at and p != me]
    if not others:  # alone: no time to save in the all-reduce, and the pace stays as it was
        return False
    if any(closes.get(p) != close_at for p in others):
        return False
    return min(closes.values(), default=close_at) >= close_at


@dataclass(frozen=True, kw_only=True, slots=True)
class SwarmAveragerConfig:
    """Rounds across machines."""

    run_id: str
    """Peers of the same run average together; others never."""
    codec: str = "none"
    """Codec of large tensors."""
    join_window_s: float = 30.0
    """Longest a round waits, from its first announcement, for the previous round's peers."""
    propagation_grace_s: float = 0.5
    """Extra wait before reading the members, so late announcements have spread."""
    round_timeout_s: float = 60.0
    """Deadline of the all-reduce."""
    max_group_size: int = 16
    """Peers per group; larger rounds split into several groups."""
    poll_interval_s: float = 0.1
    """How often a peer waiting for a round's members reads the DHT again when no nudge came
    (half of it while it waits for the others' closes)."""
    clock_tolerance_s: float | None = None
    """A round entry stamped further ahead of this peer's time than this is not believed: its
    writer is neither waited for nor counted (it would come after any close). Bounds how long a
    clock set wrong (or a peer that lies) holds the others; ``join_window_s`` if None (a peer
    ahead by less holds the others as long as a join window would, and still averages)."""
    backend: str = "auto"
    """``p2p`` (comm's all-reduce over the peers' authenticated links), ``torch`` (a
    torch.distributed gloo or NCCL group of the agreed members, fp32) or ``auto``: torch where
    the codec is none and every member published a direct loopback or private address, p2p
    otherwise."""

    def __post_init__(self) -> None:
        if not self.poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be positive, got {self.poll_interval_s}")
        if self.max_group_size < 1:  # (0 divided by zero at the first round)
            raise ValueError(f"max_group_size must be at least 1, got {self.max_group_size}")
        for name in ("join_window_s", "round_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.propagation_grace_s >= 0:
            raise ValueError(f"propagation_grace_s must be >= 0, got {self.propagation_grace_s}")
        if self.clock_tolerance_s is not None and not self.clock_tolerance_s > 0:
            raise ValueError(f"clock_tolerance_s must be positive, got {self.clock_tolerance_s}")
        if self.backend not in ("auto", "p2p", "torch"):
            raise ValueError(f"backend must be auto, p2p or torch, got {self.backend!r}")
        if self.backend == "torch" and self.codec != "none":
            raise ValueError(
                f"backend torch averages in fp32 and cannot use codec {self.codec!r}: "
                "set the codec to none, or the backend to p2p or auto"
            )

    @property
    def formation_bound_s(self) -> float:
        """The longest a round's formation can take: its join window from the first entry,
        an entry stamped up to the clock tolerance ahead that is waited for, and the grace."""
        tolerance_s = self.clock_tolerance_s or self.join_window_s
        return self.join_window_s + max(self.join_window_s, tolerance_s) + self.propagation_grace_s

    @property
    def averaging_bound_s(self) -> float:
        """The longest a member's averaging may run on after its round closed: the grace, a
        torch.distributed attempt (up to half the round's timeout, twice) where this peer may
        use one, the all-reduce over p2p, and 10 s for the node's work around them."""
        torch_s = self.round_timeout_s if self.backend != "p2p" and self.codec == "none" else 0.0
        return self.propagation_grace_s + torch_s + self.round_timeout_s + 10.0

    @property
    def entry_ttl_s(self) -> float:
        """How long a round's entries and closes live: past any formation of the round (with
        the fixed 300 s before, a join window over about 300 s let the first entries expire
        while late peers still read them, and members agreed on different lists)."""
        return max(_ENTRY_TTL_S, self.formation_bound_s + 60.0)


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
    until its close plus :attr:`SwarmAveragerConfig.averaging_bound_s` (0 when none is)."""
    newest_version: int | None = None
    """The newest state version the run's other active peers published (None: unknown)."""


@dataclass(frozen=True, slots=True)
class _Formed:
    """A round's group as formation agreed on it."""

    members: list[str]
    """This peer's group, in the order every member computed."""
    missing: list[str]
    """The run's peers, alive at the start, that did not come."""
    part_weights: list[float]
    """The members' shares of the p2p all-reduce's parts."""
    send_rates: SendRates | None
    """The send rates every member picks its p2p send order by (None: no group)."""
    entries: dict[str, dict[str, Any]]
    """Every member's round entry (its stamp, figures, store address, held group)."""


@dataclass(frozen=True, slots=True)
class _TorchPlan:
    """How this peer joins a round's torch.distributed group."""

    name: str
    """The group's name: the held one when every member holds it, else a new one."""
    members: tuple[str, ...]
    rank: int
    leader_address: tuple[str, int]
    """(host, port) of the rendezvous store (the first member's)."""


def _torch_round_id(key: str, plan: _TorchPlan) -> bytes:
    """The mailbox's id of a torch.distributed round: the key's tag (see
    :func:`~gossamer.comm.plan.round_key_tag`), then a hash of the group's name and members,
    which every member of the plan computes alike."""
    digest = hashlib.sha256(b"gossamer.swarm.torch-round/")
    for item in (plan.name, *plan.members):
        digest.update(len(item).to_bytes(8, "little") + item.encode())
    return round_key_tag(key) + digest.digest()[: 16 - ROUND_KEY_TAG_NBYTES]


class _TorchPresence:
    """A torch.distributed round's place in the mailbox, under the round's key.

    Each member tells the others that it is in the round (a PRESENT frame under
    :func:`_torch_round_id`). A member that runs no round of the key (it averaged alone, its
    clock apart) or is in another group's refuses it at once, so this one stops waiting for
    it instead of waiting the torch timeout at the rendezvous or in the collective. While
    open, the round refuses other groups' p2p rounds of the key, as a settled key does.
    """

    def __init__(self, mailbox: CommMailbox, round_id: bytes) -> None:
        self.mailbox = mailbox
        self.round_id = round_id
        self.refused: dict[str, str] = {}
        """Members that refused this one's word, with their reason."""
        self._tasks: list[asyncio.Task[None]] = []

    async def handle(self, sender: str, frame: Frame, body: memoryview) -> None:
        """Take another member's word; a torch round has no other message."""
        if frame.kind is not FrameKind.PRESENT:
            raise ProtocolError(f"a torch.distributed round takes no {frame.kind.name} message")

    def open(self, members: Sequence[str], me: str, timeout_s: float) -> None:
        """Open the round in the mailbox and tell every other member (in the background)."""
        self.mailbox.open_round(self.round_id, self)
        word = pack_frame(Frame(FrameKind.PRESENT, self.round_id, 0, 0, members.index(me), 0.0))
        loop = asyncio.get_running_loop()
        for peer in members:
            if peer != me:
                self._tasks.append(loop.create_task(self._tell(peer, word, timeout_s)))

    async def _tell(self, peer: str, word: bytes, timeout_s: float) -> None:
        try:
            await self.mailbox.transport.send(peer, word, timeout_s=timeout_s)
        except NotInRoundError as exc:
            self.refused[peer] = str(exc)
        except GossamerError as exc:  # gone, late or busy: the detector and timeouts decide
            logger.debug("telling %s of torch round %s failed: %s", peer[:8], self.round_id, exc)

    def close(self) -> None:
        """Stop telling and close the round (later words of it are dropped)."""
        for task in self._tasks:
            task.cancel()
        self.mailbox.close_round(self.round_id)


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


def _forces_torch(entry: dict[str, Any], host: str) -> bool:
    """Whether the entry's peer takes the torch backend on any address (``backend = "torch"``),
    not only on private ones (``auto``). Its entry says so (``bk``); one of a version before
    that says it only by a store address that is not site-local, which no peer on ``auto``
    publishes."""
    return entry.get("bk") == "torch" or ("bk" not in entry and not site_local(host))


def _store_address(entry: dict[str, Any]) -> tuple[str, int] | None:
    """The (host, port) of a round entry's store address, or None where it is not one.

    Entries come from other peers: only a literal IP address and a port in 1..65535 count (a
    name would be resolved differently by different members, and a malformed one must not
    crash the members that read it)."""
    address = entry.get("tcp", "")
    if not isinstance(address, str):
        return None
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        return None
    if not port.isdigit() or not 0 < number < 65536:
        return None
    return host, number


def _torch_kind() -> str:
    """The kind of group this peer's torch backend makes (see :class:`TorchGroupAverager`)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _figure(entry: dict[str, Any], name: str = "bw") -> float:
    """A bandwidth figure of a round entry: its send-rate estimate (``bw``) or its floor
    (``bwf``); 0 (the median in ``plan_weights``, the estimate for a floor) if unreadable."""
    try:
        return float(entry.get(name, 0.0))
    except (TypeError, ValueError, OverflowError):
        return 0.0


class SwarmAverager:
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
            send_timeout_s=min(30.0, config.round_timeout_s / 2),
            codec=CodecPolicy(codec=config.codec),
        )
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

    @property
    def peer_id(self) -> str:
        """This peer's id."""
        return self.node_thread.node.peer_id

    def _open_torch_store(self) -> None:
        """Open this peer's rendezvous store where the torch backend may be chosen."""
        if self.config.backend == "p2p" or self.config.codec != "none":
            return
        host = self.node_thread.node.addresses[0].rpartition(":")[0].strip("[]")
        if self.config.backend == "auto" and not site_local(host):
            logger.info("peer %s: %s is not site-local: rounds go over p2p", self.peer_id[:8], host)
            return
        timeout_s = self._torch_timeout_s
        try:
            self._store = open_leader_store(host, 1, timeout_s)
        except (OSError, RuntimeError) as exc:  # DistError is a RuntimeError
            logger.warning(
                "peer %s: cannot listen for torch.distributed rendezvous at %s (%s), the first "
                "address this peer advertises: rounds go over p2p (advertise an address of "
                "this machine first to use the torch backend)",
                self.peer_id[:8],
                host,
                exc,
            )
            return
        self._store_address = (
            f"[{host}]:{self._store.port}" if ":" in host else (f"{host}:{self._store.port}")
        )
        self._torch_host = host
        self._torch = TorchGroupAverager(timeout_s=timeout_s, retired=self._retired_rendezvous)

    @property
    def _rerun_config(self) -> AllReduceConfig:
        """The round's config when it runs again over p2p after a torch.distributed attempt.

        The members leave the attempt at different times: one whose collective failed at once
        starts the p2p round while another still waits in gloo's collective, which cannot be
        interrupted and does not always fail when a member's failed (its timeout counts per
        receive, so it may outlast the torch timeout). Messages to a member that has not opened
        the round yet wait in its mailbox; with the usual send deadline (as long as the torch
        timeout) the sender counted it failed just as it came. Here a message may wait until
        the round's deadline: a member that is gone is still dropped at once (the failure
        detector), and no round waits past its deadline.
        """
        return replace(self._allreduce_config, send_timeout_s=self._allreduce_config.timeout_s)

    @property
    def _torch_timeout_s(self) -> float:
        """Deadline of a torch.distributed rendezvous and collective: half the round's, so the
        round can still run again over p2p when the group fails."""
        return self.config.round_timeout_s / 2

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
        started = time.monotonic()
        wall_offset_s = time.time() - started
        marks: dict[str, float] = {}
        """Monotonic times the work reached on the node's loop: began, formed (the group)."""
        deadline_s = (
            self.config.formation_bound_s  # (a clock tolerance over the join window included)
            + self.config.round_timeout_s
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
            result = None
            backend = "torch"
            plan = self._torch_plan(node, key, round_)
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
                        config=self._allreduce_config,
                        bandwidth_weights=round_.part_weights,
                    )
            if result is None:
                result = await all_reduce(
                    tensors,
                    mailbox=self._mailbox,
                    members=members,
                    round_key=key if plan is None else p2p_key,
                    config=self._allreduce_config if plan is None else self._rerun_config,
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
            await node.dht.put(_failed_key(key), value, self.config.entry_ttl_s, renew=False)

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
            return RoundFate(
                failed_everywhere=False,
                undecided=undecided,
                undecided_for_s=max(0.0, close_at + self.config.averaging_bound_s - now),
                newest_version=newest,
            )

        try:
            return self.node_thread.run(read, timeout_s=15)
        except GossamerError as exc:
            logger.debug("reading what round %s's members said failed: %s", key, exc)
            return RoundFate(failed_everywhere=False)

    def _settings_differ(self, entry: dict[str, Any]) -> str:
        """How the settings of a round entry differ from this peer's ('' where they do not,
        where this peer names none, or where the entry carries none: a peer of before)."""
        if not self.settings or "cfg" not in entry:
            return ""
        return settings_difference(entry["cfg"], self.settings)

    def _torch_plan(self, node: Node, key: str, round_: _Formed) -> _TorchPlan | None:
        """The torch.distributed group of this round, or None where p2p does it.

        Decided from the members' round entries alone, so every member decides alike: torch
        when every member published a store address (site-local ones, unless every member's
        entry says ``torch``: one peer's own setting decided it for that peer alone; loopback
        ones only where all are) and every member makes the same kind of group (NCCL where it
        has a GPU, gloo where not: the two never meet in a rendezvous); the group held now is
        re-used when every member says it holds it and it has exactly these members, otherwise
        a new one is made, named by the round and its first member's stamp.
        """
        if self._torch is None:
            return None
        entries = [round_.entries.get(p, {}) for p in round_.members]
        parsed = [_store_address(e) for e in entries]
        stores = [a for a in parsed if a is not None]
        hosts = [host for host, _ in stores]
        loopback = [ipaddress.ip_address(h).is_loopback for h in hosts]
        if (
            len(stores) < len(entries)
            or (
                not all(_forces_torch(e, h) for e, h in zip(entries, hosts, strict=True))
                and not all(map(site_local, hosts))
            )
            or (any(loopback) and not all(loopback))  # not one machine: they cannot all meet
            or len({str(e.get("dev", "")) for e in entries}) > 1  # NCCL beside gloo never meet
            # Other tensors (another model under the same run name): gloo would mix unrelated
            # values or end both processes; over p2p the round id tells them apart.
            or len({str(e.get("lay", "")) for e in entries} - {""}) > 1
        ):
            if self.config.backend == "torch":
                logger.warning(
                    "round %s: the members' entries do not all allow a torch.distributed group "
                    "(each needs a store address, the same device kind and the same tensors, "
                    "and public addresses need every member set to torch); the round goes over "
                    "p2p",
                    key,
                )
            return None
        held = {str(e.get("pg", "")) for e in entries}
        current = self._torch.group_hash
        if held == {current} and set(self._torch.members) == set(round_.members):
            assert current is not None  # an empty name is never held
            members = self._torch.members
            return _TorchPlan(current, members, self._torch.rank, stores[0])
        members = tuple(round_.members)
        name = f"{key}@{entries[0].get('at')!r}"
        return _TorchPlan(name, members, members.index(node.peer_id), stores[0])

    async def _torch_round(
        self,
        node: Node,
        plan: _TorchPlan,
        tensors: list[torch.Tensor],
        weight: float,
        p2p_key: str,
        presence: _TorchPresence,
    ) -> AllReduceResult | None:
        """The round over the torch.distributed group; None if it failed or a member went.

        The rendezvous and the collective run in a thread of their own, since gloo's cannot be
        interrupted: a member that dies without closing its connections (or the rendezvous'
        leader, dead before it opened the group) would hold them to their timeout, half the
        round's. Instead, once the failure detector reports a member gone the thread is left
        to end on its own (it closes its group) and a fresh averager takes its place; the
        caller runs the round again over p2p (``p2p_key``), which drops the gone member at
        once. So too when a message of that p2p round arrives during the rendezvous: its sender
        runs the round over p2p already (its rendezvous failed, or it formed another group) and
        never comes; and when a member refuses this one's word (``presence``: it runs no round
        of the key, having averaged alone, or another group's). A failed rendezvous or
        collective closes the group too (the others' collectives fail as well, at once where
        their connections to this peer close, else at gloo's timeout) and the caller runs the
        round over p2p, where messages wait for the members still in their collective (see
        :attr:`_rerun_config`).
        """
        averager = self._torch
        assert averager is not None
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[AllReduceResult | None] = loop.create_future()
        abandoned = threading.Event()
        meeting = threading.Event()
        """Set while the thread waits in the rendezvous for the others."""

        def settle(result: AllReduceResult | None, error: BaseException | None) -> None:
            if finished.done():
                return
            if error is not None:
                finished.set_exception(error)
            else:
                finished.set_result(result)

        handover = threading.Lock()
        """Held while the thread hands its outcome over or the loop abandons it: one or the
        other, never both (a result handed over is used, one not handed over is dropped)."""
        handed = False

        def attempt() -> None:
            nonlocal handed
            result: AllReduceResult | None = None
            error: BaseException | None = None
            try:
                if plan.name != averager.group_hash:
                    meeting.set()
                    store = self._store if plan.rank == 0 else None
                    if store is None:
                        store = self._leader_store(plan.leader_address, abandoned)
                    averager.ensure_group(
                        plan.name, plan.members, plan.rank, store, self._torch_host
                    )
                    meeting.clear()
                result = averager.average(tensors, weight)
            except (PeerLostError, DeadlineExceededError) as exc:
                averager.close()
                error = exc
            except BaseException as exc:  # anything else is a bug: raised in the round
                error = exc
            with handover:
                if abandoned.is_set():
                    averager.close()  # ended after the round gave up on it
                    return
                handed = True
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
                loop.call_soon_threadsafe(settle, result, error)

        thread = threading.Thread(target=attempt, name="gossamer-torch-round", daemon=True)
        thread.start()
        others = [p for p in plan.members if p != node.peer_id]
        gone: list[str] = []
        mailbox = self._mailbox
        assert mailbox is not None
        p2p_tag = round_key_tag(p2p_key)
        why = ""
        # The rendezvous and the collective each end by the torch timeout where gloo's timeout
        # fires; its timeout counts per receive, though, so a collective that stalls with
        # every member alive could run on past the round: it is given up at both timeouts.
        give_up_at = time.monotonic() + 2 * self._torch_timeout_s

        def give_up() -> bool:
            """Leave the thread to end on its own, unless it handed its outcome over already."""
            with handover:
                if not handed:
                    abandoned.set()
            return abandoned.is_set()

        try:
            while not finished.done():
                gone = [p for p in others if not self._alive(node, p)]
                if gone:
                    why = f"{', '.join(p[:8] for p in gone)} reported gone"
                elif presence.refused:
                    peer, reason = next(iter(presence.refused.items()))
                    why = f"{peer[:8]} is not in this round ({reason})"
                elif meeting.is_set() and mailbox.awaits_round_of_key(p2p_tag):
                    why = "a member runs it over p2p and never comes to the rendezvous"
                elif time.monotonic() >= give_up_at:
                    why = f"no outcome in {2 * self._torch_timeout_s:g} s"
                if why:
                    if give_up():
                        break
                    why = ""  # the outcome is on its way: take it
                await asyncio.wait([finished], timeout=self._allreduce_config.liveness_poll_s)
        except asyncio.CancelledError:  # the round's own deadline: leave the thread behind too
            if give_up():
                self._abandon_torch(thread, plan)
            raise
        if why:
            self._abandon_torch(thread, plan)
            logger.warning(
                "peer %s: torch.distributed round %s given up: %s; running it over p2p",
                self.peer_id[:8],
                plan.name,
                why,
            )
            return None
        try:
            result = finished.result()
        except (PeerLostError, DeadlineExceededError) as exc:
            self._leader_stores.pop(plan.leader_address, None)
            self.torch_failures += 1
            self._torch_failures_in_a_row += 1
            self._torch_rounds_to_skip = min(
                _MAX_TORCH_SKIP_ROUNDS, 2 ** (self._torch_failures_in_a_row - 1)
            )
            logger.warning(
                "peer %s: torch.distributed round %s failed (%s); running it over p2p",
                self.peer_id[:8],
                plan.name,
                exc,
            )
            return None
        self._torch_failures_in_a_row = 0
        return result

    def _abandon_torch(self, thread: threading.Thread, plan: _TorchPlan) -> None:
        """Leave a torch round's thread to end on its own (it closes its group when it does)
        and take a fresh averager, so no later round shares its group or staging buffer.
        Until the thread ends it may hold this peer's store (a rendezvous waiting on a gone
        member keeps the store's lock): rounds go over p2p meanwhile."""
        self._abandoned_torch.append(thread)
        self._torch = TorchGroupAverager(
            timeout_s=self._torch_timeout_s, retired=self._retired_rendezvous
        )
        self._leader_stores.pop(plan.leader_address, None)
        self.torch_failures += 1

    def _leader_store(self, address: tuple[str, int], abandoned: threading.Event) -> Store:
        """A connection to the store at ``address``, kept for later groups it leads (not if the
        round that opened it was ``abandoned`` meanwhile: it may be to a dead leader). Only the
        newest leader's is kept: connections to leaders of earlier groups (some long gone)
        would pile up as leaders change; a group still held keeps its own store alive."""
        store = self._leader_stores.get(address)
        if store is None:
            host, port = address
            store = open_member_store(host, port, 1, self._torch_timeout_s)
            if not abandoned.is_set():
                self._leader_stores.clear()
                self._leader_stores[address] = store
        return store

    def join_run(self, version: int) -> None:
        """Tell the run's other peers to wait for this one at their rounds, and its state version.

        Called again after every outer step with the new version, so a peer that fell behind
        (restarted from an older checkpoint, say) sees that it must fetch the newer state.
        """
        self._set_membership("active", version)

    def announce_joining(self, step: int) -> None:
        """Tell the run that this peer joins at ``step``: it needs the state the others hold then.

        Not yet awaited at rounds; :meth:`join_run` makes it a member once it has the state.
        """
        self._set_membership("joining", step)

    def run_states(self) -> dict[str, tuple[str, int]]:
        """Every other peer of the run that the failure detector does not report gone: its
        membership state (``active``, ``joining``, ``left``) and version (or joining step).

        Raises:
            GossamerError: the DHT could not be read.
        """

        async def read(node: Node) -> dict[str, tuple[str, int]]:
            return {
                peer: (state, version)
                for peer, (state, version, _) in (await self._memberships(node)).items()
                if peer != node.peer_id and self._alive(node, peer)
            }

        return self.node_thread.run(read, timeout_s=15)

    def round_entrants(self, round_key: str) -> tuple[frozenset[str], frozenset[str]]:
        """The run's other active peers, and those of them whose entry of round ``round_key``
        (as callers name it) is on the DHT: peers of :attr:`other_settings_peers` and those the
        failure detector reports gone are left out of both, and entries of an earlier run of
        the same name or of a killed incarnation are not counted.

        Raises:
            GossamerError: the DHT could not be read.
        """
        key = f"{self.config.run_id}/{round_key}"

        async def read(node: Node) -> tuple[frozenset[str], frozenset[str]]:
            memberships, (entries,) = await self._read_round(node, [(round_entry_key(key), "at")])
            entries = self._this_run_s(node, entries)
            odd = self.other_settings_peers  # (noted from these memberships)
            active = frozenset(
                p
                for p in _active(memberships, node.peer_id)
                if p not in odd and self._alive(node, p)
            )
            return active, active & frozenset(entries)

        return self.node_thread.run(read, timeout_s=10)

    def leave_run(self) -> None:
        """Tell the run's other peers to stop waiting for this one."""
        self._set_membership("left", -1)

    def newest_version(self) -> int:
        """The newest state version among the run's active peers (-1 when none is known, or
        the DHT cannot be read), not those of :attr:`other_settings_peers`."""

        async def read(node: Node) -> int:
            active = await self._active_members(node)
            others = self.other_settings_peers  # (noted from these memberships)
            return max((v for p, v in active.items() if p not in others), default=-1)

        try:
            return self.node_thread.run(read, timeout_s=15)
        except GossamerError:
            return -1

    def _set_membership(self, state: str, version: int) -> None:
        key = _members_key(self.config.run_id)
        at = self._clock.wall() + self._correction_s
        if self._joined_at is None and state != "left":
            self._joined_at = at
        record: dict[str, Any] = {
            "state": state,
            "version": version,
            "inc": self.incarnation,
            "at": at,
        }
        if self.settings:  # (see other_settings_peers)
            record["cfg"] = self.settings
        value = json.dumps(record).encode()

        async def put(node: Node) -> None:
            await node.dht.put(key, value, _ENTRY_TTL_S)

        try:
            self.node_thread.run(put, timeout_s=15)
        except GossamerError as exc:
            logger.warning(
                "peer %s could not publish that it is %s: %s", self.peer_id[:8], state, exc
            )

    async def _memberships(self, node: Node) -> dict[str, tuple[str, int, str]]:
        """Every peer's latest membership record: (state, version, incarnation).

        The active ones are watched from here on: a peer that reads the run (a newcomer
        catching up, say) knows which of them are gone by its first round, instead of waiting
        for each there until the failure detector's timeout (a SIGKILLed peer's record says
        active for minutes).

        A peer that left before this one joined the run (its record says when) is left out,
        with whatever it published (see :attr:`left_before_joining`): it is of an earlier run
        of the same name, or one that ended before this peer came, and no round this peer
        forms is its. Its records live on for minutes after it left: a run started again
        under the name on a node still standing found every round it formed closed by the
        earlier run's entries, missed it, and formed it again as the next attempt, at the
        next boundary: half its outer steps.
        """
        found: dict[str, tuple[str, int, str]] = {}
        left_before: set[str] = set()
        other_settings: set[str] = set()
        for publisher, value in await read_json_records(node, _members_key(self.config.run_id)):
            try:
                found[publisher] = (str(value["state"]), int(value["version"]), str(value["inc"]))
                at = float(value.get("at", math.nan))
            except (KeyError, TypeError, ValueError, OverflowError):  # (int of an inf)
                continue
            if publisher != node.peer_id and self._settings_differ(value):
                other_settings.add(publisher)
            joined_at = self._joined_at
            if joined_at is None:
                continue
            if found[publisher][0] != "left":
                self._seen_in_run.add(publisher)
            # (a peer never seen in the run that left up to a clock tolerance after this one
            # joined: this peer's join time is in its own clock, uncorrected before its first
            # round, and one a few seconds behind counted an earlier run's peer as its run's)
            tolerance_s = 0.0 if publisher in self._seen_in_run else self._tolerance_s
            if found[publisher][0] == "left" and at < joined_at + tolerance_s:
                del found[publisher]  # (a NaN, from a peer of before, compares False: kept)
                left_before.add(publisher)
        if left_before != self.left_before_joining:
            self.left_before_joining = frozenset(left_before)
        self._members_of_other_settings = frozenset(other_settings)
        self._note_other_settings()
        for peer, (state, _, _) in found.items():
            if state == "active" and peer != node.peer_id:
                node.detector.watch(peer)
        return found

    async def _active_members(self, node: Node) -> dict[str, int]:
        """The run's other active peers and the state version each published."""
        return {
            peer: version
            for peer, (state, version, _) in (await self._memberships(node)).items()
            if state == "active" and peer != node.peer_id
        }

    @staticmethod
    async def _records_by_publisher(
        node: Node, key: bytes, field: str, seen: dict[str, dict[str, Any]] | None = None
    ) -> dict[str, tuple[float, str]]:
        """(``field``, incarnation) of every record under ``key`` with a finite number.

        With ``seen``, each such record is put there whole: its other fields (the bandwidth
        figure, the store address) are read from the same record as the field, so whoever
        counts a member knows the same figures.
        """
        found: dict[str, tuple[float, str]] = {}
        # Only records on replicas: one that only its publisher holds (killed during its put)
        # would be counted by the members that asked it and not by the others.
        for publisher, value in await read_json_records(node, key, replicated_only=True):
            try:
                number, inc = float(value[field]), str(value["inc"])
            except (KeyError, TypeError, ValueError, OverflowError):  # (float of 10**400)
                continue
            if math.isfinite(number):
                found[publisher] = (number, inc)
                if seen is not None:
                    seen[publisher] = value
        return found

    async def _read_round(
        self,
        node: Node,
        keys: Sequence[tuple[bytes, str]],
        seen: dict[str, dict[str, Any]] | None = None,
    ) -> tuple[dict[str, tuple[str, int, str]], list[dict[str, float]]]:
        """The memberships and, for every (key, field), the current incarnations' records.

        The reads run at once (one round trip instead of several); a record counts only if it
        was written by the incarnation the publisher's membership names, so what a killed
        process left on the DHT is ignored after its restart. ``seen`` collects the round
        entries whole (those of the ``at`` reads).
        """
        reads = asyncio.gather(
            *(self._records_by_publisher(node, k, f, seen if f == "at" else None) for k, f in keys)
        )
        memberships, raw = await asyncio.gather(self._memberships(node), reads)
        incarnations = {p: inc for p, (_, _, inc) in memberships.items()}
        incarnations[node.peer_id] = self.incarnation
        self._note_versions(node, memberships)
        current = [
            {p: number for p, (number, inc) in found.items() if inc == incarnations.get(p)}
            for found in raw
        ]
        return memberships, current

    def _note_versions(self, node: Node, memberships: dict[str, tuple[str, int, str]]) -> None:
        joining = {
            peer: version
            for peer, (state, version, _) in memberships.items()
            if state == "joining" and peer != node.peer_id
        }
        for peer in joining:
            node.detector.watch(peer)  # one that dies while joining must not be waited for
        self.joining = {p: v for p, v in joining.items() if self._alive(node, p)}
        self.newest_seen_version = max(
            (
                version
                for peer, (state, version, _) in memberships.items()
                if state == "active"
                and peer != node.peer_id
                and peer not in self.other_settings_peers
            ),
            default=-1,
        )

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
            self.config.entry_ttl_s,
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
            self.config.entry_ttl_s,
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
        records = {p: seen.get(p, {}) for p in group}
        estimates = [_figure(r) for r in records.values()]
        floors = [_figure(r, "bwf") for r in records.values()]
        return _Formed(
            group, missing, plan_weights(estimates), agreed_send_rates(estimates, floors), records
        )

    @property
    def _tolerance_s(self) -> float:
        """How far apart two peers' clocks may be (see
        :attr:`SwarmAveragerConfig.clock_tolerance_s`)."""
        return self.config.clock_tolerance_s or self.config.join_window_s

    def _this_run_s(self, node: Node, stamps: dict[str, float]) -> dict[str, float]:
        """``stamps`` (a round's entries or closes, by writer) less those of an earlier run of
        the same name: stamped before this peer joined the run by a writer the failure
        detector has not heard answer (gone, or not one answer since it was watched).

        A killed peer of an earlier run leaves no 'left' (see :attr:`left_before_joining`):
        its membership says active for minutes, and its entries and closes closed every round
        of the run started again under the name before its peer came; it missed each, and
        formed it again as the next attempt at its next boundary: half the outer steps. A
        newcomer's case stands: the entries of the round in progress when it joined are
        stamped before, by writers alive that answer, and count once they have (this peer
        reads them again while it waits for those writers, as it awaits them).
        """
        joined_at = self._joined_at
        if joined_at is None:
            return stamps
        return {
            p: at
            for p, at in stamps.items()
            if at >= joined_at or p == node.peer_id or self._answered(node, p)
        }

    @staticmethod
    def _answered(node: Node, peer_id: str) -> bool:
        """Whether the failure detector heard ``peer_id`` answer since it was watched (or came
        back), and does not report it gone."""
        liveness = node.detector.liveness(peer_id)
        return (
            liveness is not None
            and liveness.alive
            and liveness.last_answer_s > liveness.changed_at_s
        )

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

    def _note_other_settings(self) -> None:
        """Update :attr:`other_settings_peers` from round entries and memberships."""
        peers = self._members_of_other_settings | frozenset(self.other_settings)
        if peers != self.other_settings_peers:
            self.other_settings_peers = peers

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

    @staticmethod
    def _alive(node: Node, peer_id: str) -> bool:
        liveness = node.detector.liveness(peer_id)
        return liveness is None or liveness.alive


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
