"""Group formation without a server: peers averaging under one key agree on who and in what order.

Every peer that wants to average under a key (run id + round) announces a small signed entry on
a :class:`RendezvousBoard` (the DHT in a swarm, memory in unit tests) before the key's join
cutoff. After the cutoff plus a propagation grace, every peer reads the board: entries stamped
after the cutoff are left for the next round, so every peer that reads the same entries
computes the same member list, order, group split and group hash. A swarm larger than
``max_group_size`` splits into groups of near-equal size; the split is a hash of the round key,
so groups change from round to round and averages mix across the whole swarm.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gossamer.comm.bandwidth import plan_weights
from gossamer.core.clock import Clock
from gossamer.core.errors import DeadlineExceededError, ProtocolError
from gossamer.net.identity import peer_id_of_public_key

__all__ = [
    "AgreedGroup",
    "DhtRendezvousBoard",
    "GroupConfig",
    "InMemoryRendezvousBoard",
    "JoinEntry",
    "RendezvousBoard",
    "form_group",
    "split_into_groups",
]

_MAX_ENTRY_BYTES = 1024


@dataclass(frozen=True, slots=True)
class JoinEntry:
    """One peer's wish to average under a key."""

    peer_id: str
    """Who."""
    announced_at_s: float
    """Wall time of the announcement (entries after the cutoff wait for the next round)."""
    bandwidth_bytes_per_s: float
    """The peer's measured send throughput (its ``BandwidthMeter`` estimate; 0 if unknown):
    sizes its part."""
    address: str = ""
    """HOST for direct connections (the torch.distributed backend), empty if unreachable."""

    def encode(self) -> bytes:
        """Bytes for the board (JSON: plain data, never pickled)."""
        return json.dumps(
            [self.peer_id, self.announced_at_s, self.bandwidth_bytes_per_s, self.address]
        ).encode()

    @classmethod
    def decode(cls, data: bytes, publisher: str) -> JoinEntry:
        """Parse an entry published by ``publisher`` (who must be the peer it names)."""
        if len(data) > _MAX_ENTRY_BYTES:
            raise ProtocolError(f"join entry of {len(data)} bytes (limit {_MAX_ENTRY_BYTES})")
        try:
            peer_id, at, bandwidth, address = json.loads(data)
            entry = cls(str(peer_id), float(at), float(bandwidth), str(address))
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            # (RecursionError: brackets nested past the parser's depth, well within the size)
            raise ProtocolError(f"malformed join entry: {exc}") from exc
        if entry.peer_id != publisher:
            raise ProtocolError("a join entry names a peer other than its publisher")
        if not (math.isfinite(entry.bandwidth_bytes_per_s) and entry.bandwidth_bytes_per_s >= 0):
            raise ProtocolError("join entry with a bad bandwidth")
        return entry


class RendezvousBoard(Protocol):
    """Where peers leave and read join entries."""

    async def announce(self, key: str, entry: JoinEntry, ttl_s: float) -> None:
        """Publish ``entry`` under ``key`` for ``ttl_s`` seconds."""
        ...

    async def entries(self, key: str) -> list[JoinEntry]:
        """Every live entry under ``key`` (one per peer)."""
        ...


class InMemoryRendezvousBoard:
    """A board in memory, shared by the peers of one process (tests, benchmarks)."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, JoinEntry]] = {}

    async def announce(self, key: str, entry: JoinEntry, ttl_s: float) -> None:
        self._entries.setdefault(key, {})[entry.peer_id] = entry

    async def entries(self, key: str) -> list[JoinEntry]:
        return list(self._entries.get(key, {}).values())


class DhtRendezvousBoard:
    """A board on net's DHT: signed records, one per publisher, under a hash of the key.

    Args:
        dht: a started node's ``Dht`` (anything with ``lookup(key)``, ``put(key, value, ttl_s,
            closest=..., renew=False)`` returning how many replicas took it, and
            ``get(key, replicated_only=...)``).
    """

    def __init__(self, dht: object) -> None:
        self._dht = dht

    @staticmethod
    def _key(key: str) -> bytes:
        return hashlib.sha256(b"gossamer.comm.group/" + key.encode()).digest()

    async def announce(self, key: str, entry: JoinEntry, ttl_s: float) -> None:
        """Publish ``entry`` on the replicas of ``key``.

        Raises:
            DeadlineExceededError: no replica took the entry (the key is full, or none
                answered): nobody reads it, and counting itself this peer would form a group
                of its own.
        """
        digest = self._key(key)
        replicas = await self._dht.lookup(digest)  # type: ignore[attr-defined]
        stored = await self._dht.put(  # type: ignore[attr-defined]
            digest, entry.encode(), ttl_s, closest=replicas, renew=False
        )
        if replicas and not stored:
            raise DeadlineExceededError(
                f"round {key!r}: no replica took this peer's entry (the key is full, or none "
                "answered); join the next round"
            )

    async def entries(self, key: str) -> list[JoinEntry]:
        found: list[JoinEntry] = []
        # Only copies on replicas, so a publisher killed during its put is counted by none.
        records = await self._dht.get(self._key(key), replicated_only=True)  # type: ignore[attr-defined]
        for record in records:
            publisher = peer_id_of_public_key(bytes(record.publisher_public_key))
            try:
                found.append(JoinEntry.decode(bytes(record.value), publisher))
            except ProtocolError:
                continue  # one malformed entry does not stop the others
        return found


def _check_group_sizes(min_group_size: int, max_group_size: int) -> None:
    if not 1 <= min_group_size <= max_group_size:
        raise ValueError(
            f"need 1 <= min_group_size <= max_group_size, got {min_group_size} and {max_group_size}"
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupConfig:
    """Group formation."""

    min_group_size: int = 2
    """Fewer peers than this: no round (the caller retries next round)."""
    max_group_size: int = 16
    """More peers than this: the swarm splits into several groups."""
    join_window_s: float = 5.0
    """How long after the round opens peers may join it."""
    propagation_grace_s: float = 1.0
    """Wait after the cutoff before reading, so late-arriving announcements are seen."""

    def __post_init__(self) -> None:
        _check_group_sizes(self.min_group_size, self.max_group_size)
        if self.join_window_s <= 0 or self.propagation_grace_s < 0:
            raise ValueError("join_window_s must be positive and propagation_grace_s >= 0")


@dataclass(frozen=True, slots=True)
class AgreedGroup:
    """The group this peer averages with this round: the same on every member."""

    key: str
    """The round key."""
    members: tuple[str, ...]
    """Peer ids in the agreed order (the first is the leader)."""
    bandwidth_weights: tuple[float, ...]
    """Each member's bandwidth, in member order."""
    addresses: tuple[str, ...]
    """Each member's direct address (empty if none)."""
    group_hash: str
    """Hex sha256 over key, members, bandwidths and addresses."""
    num_groups: int
    """Groups the swarm split into this round."""

    def part_weights(self) -> list[float]:
        """``bandwidth_weights`` for :func:`~gossamer.comm.allreduce.all_reduce`: the agreed
        figures, bounded by :func:`~gossamer.comm.bandwidth.plan_weights` (the same on every
        member)."""
        return plan_weights(self.bandwidth_weights)

    @property
    def leader(self) -> str:
        """The member that hosts rendezvous (e.g. the torch.distributed store)."""
        return self.members[0]


def _order_key(round_key: str, peer_id: str) -> bytes:
    return hashlib.sha256(f"{round_key}|{peer_id}".encode()).digest()


def split_into_groups(
    round_key: str, peers: Sequence[str], max_group_size: int, min_group_size: int = 1
) -> list[list[str]]:
    """Near-equal groups of at most ``max_group_size``, reshuffled by ``round_key``.

    Where that many groups would be smaller than ``min_group_size``, fewer are made (at most
    ``max_group_size`` each) and the peers left over, last in the round's order, are in none:
    five peers with groups of four at least and at most make one group of four, not two groups
    too small to average.

    Raises:
        ValueError: not ``1 <= min_group_size <= max_group_size`` (max 0 divided by zero; min
            over max made groups all under min).
    """
    _check_group_sizes(min_group_size, max_group_size)
    ordered = sorted(set(peers), key=lambda p: _order_key(round_key, p))
    num_groups = max(1, math.ceil(len(ordered) / max_group_size))
    if len(ordered) // num_groups < min_group_size:
        num_groups = max(1, len(ordered) // min_group_size)
    seated = ordered[: num_groups * max_group_size]
    return [seated[i::num_groups] for i in range(num_groups)]


def _group_hash(key: str, entries: Sequence[JoinEntry]) -> str:
    digest = hashlib.sha256(key.encode())
    for e in entries:
        digest.update(json.dumps([e.peer_id, e.bandwidth_bytes_per_s, e.address]).encode())
    return digest.hexdigest()


async def form_group(
    board: RendezvousBoard,
    key: str,
    me: JoinEntry,
    *,
    opens_at_s: float,
    config: GroupConfig,
    clock: Clock,
) -> AgreedGroup:
    """Announce ``me`` under ``key`` and return the group this peer belongs to.

    Args:
        board: where entries are published.
        key: the round key (run id + round).
        me: this peer's entry (``announced_at_s`` is set here from the clock).
        opens_at_s: wall time the round opened; the join cutoff is ``join_window_s`` later.
        config: sizes and timing.
        clock: time source.

    Raises:
        DeadlineExceededError: this peer came after the cutoff (it should join the next round),
            or fewer than ``min_group_size`` peers joined.
        ProtocolError: this peer's own entry is one the others would refuse (a bandwidth that
            is not finite or negative, an address too long).
    """
    cutoff_s = opens_at_s + config.join_window_s
    now = clock.wall()
    if now > cutoff_s:
        raise DeadlineExceededError(f"joined round {key!r} after its cutoff; join the next one")
    # Checked as the others will check it: one they drop but this peer counts would give it a
    # member list (and group hash) of its own.
    entry = JoinEntry.decode(
        JoinEntry(me.peer_id, now, me.bandwidth_bytes_per_s, me.address).encode(), me.peer_id
    )
    ttl_s = config.join_window_s + config.propagation_grace_s + 60.0
    read_at_s = cutoff_s + config.propagation_grace_s
    await board.announce(key, entry, ttl_s)
    if clock.wall() > read_at_s:
        # The others read the members at read_at_s: they may not have seen this entry, and
        # counting itself this peer would have a member list (and group hash) of its own.
        raise DeadlineExceededError(
            f"announcing this peer in round {key!r} took past the others' reading of its "
            "members; join the next one"
        )
    await clock.sleep_async(max(0.0, read_at_s - clock.wall()))
    joined = {e.peer_id: e for e in await board.entries(key) if e.announced_at_s <= cutoff_s}
    joined[entry.peer_id] = entry
    groups = split_into_groups(key, list(joined), config.max_group_size, config.min_group_size)
    mine = next((g for g in groups if entry.peer_id in g), None)
    if mine is None:
        raise DeadlineExceededError(
            f"round {key!r}: {len(joined)} peers joined, and groups of "
            f"{config.min_group_size}-{config.max_group_size} left this one out; join the next one"
        )
    if len(mine) < config.min_group_size:
        raise DeadlineExceededError(
            f"round {key!r}: {len(mine)} peers joined, fewer than min_group_size "
            f"({config.min_group_size})"
        )
    ordered = [joined[p] for p in mine]
    return AgreedGroup(
        key=key,
        members=tuple(e.peer_id for e in ordered),
        bandwidth_weights=tuple(e.bandwidth_bytes_per_s for e in ordered),
        addresses=tuple(e.address for e in ordered),
        group_hash=_group_hash(key, ordered),
        num_groups=len(groups),
    )
