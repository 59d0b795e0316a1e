"""Group formation: same members, order and hash on every peer, even under racing joins."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter

import pytest
from comm_fakes import IdleJumpClock

from gossamer.comm.groups import (
    AgreedGroup,
    DhtRendezvousBoard,
    GroupConfig,
    InMemoryRendezvousBoard,
    JoinEntry,
    form_group,
    split_into_groups,
)
from gossamer.core.errors import DeadlineExceededError, ProtocolError
from gossamer.net.config import DhtConfig
from gossamer.net.dht import Dht
from net_fakes import FakeDhtNetwork

CONFIG = GroupConfig(min_group_size=2, max_group_size=8, join_window_s=5.0)


def _join_all(
    num_peers: int, seed: int, key: str = "run/1", late: frozenset[int] = frozenset()
) -> dict[int, AgreedGroup | Exception]:
    clock = IdleJumpClock()
    board = InMemoryRendezvousBoard()
    rng = random.Random(seed)
    opens_at = clock.wall()

    async def one(i: int) -> AgreedGroup | Exception:
        # racing joins: each peer arrives at its own moment inside (or after) the window
        await clock.sleep_async(6.0 if i in late else rng.uniform(0, 5.0))
        me = JoinEntry(f"peer-{i:03d}", 0.0, float(1 + i % 3))
        try:
            return await form_group(board, key, me, opens_at_s=opens_at, config=CONFIG, clock=clock)
        except DeadlineExceededError as exc:
            return exc

    async def main() -> dict[int, AgreedGroup | Exception]:
        results = await asyncio.gather(*(one(i) for i in range(num_peers)))
        return dict(enumerate(results))

    return asyncio.run(clock.run(main()))


@pytest.mark.parametrize("seed", range(5))
def test_every_member_computes_the_same_group_under_racing_joins(seed: int) -> None:
    results = _join_all(6, seed, late=frozenset({5}))
    groups = [r for r in results.values() if isinstance(r, AgreedGroup)]
    assert len(groups) == 5
    assert len({g.group_hash for g in groups}) == 1
    assert len({g.members for g in groups}) == 1
    assert groups[0].members[0] == groups[0].leader
    assert "peer-005" not in groups[0].members
    assert isinstance(results[5], DeadlineExceededError)  # the late peer joins the next round


def test_a_large_swarm_splits_into_bounded_groups_that_change_each_round() -> None:
    results = _join_all(30, seed=1)
    groups = {g.group_hash: g for g in results.values() if isinstance(g, AgreedGroup)}
    assert len(groups) == 4
    sizes = sorted(len(g.members) for g in groups.values())
    assert sizes == [7, 7, 8, 8]
    members = [m for g in groups.values() for m in g.members]
    assert len(members) == len(set(members)) == 30
    peers = [f"p{i}" for i in range(30)]
    first, second = split_into_groups("run/1", peers, 8), split_into_groups("run/2", peers, 8)
    assert {frozenset(g) for g in first} != {frozenset(g) for g in second}


@pytest.mark.parametrize(("largest", "smallest"), [(0, 1), (2, 5), (4, 0)])
def test_group_sizes_that_cannot_be_met_are_refused_by_the_split_too(
    largest: int, smallest: int
) -> None:
    # As GroupConfig refuses them: max 0 divided by zero, min over max made groups all under min.
    with pytest.raises(ValueError, match="need 1 <= min_group_size <= max_group_size, got"):
        split_into_groups("run/1", [f"p{i}" for i in range(4)], largest, smallest)


def test_too_few_peers_means_no_round() -> None:
    results = _join_all(1, seed=0)
    assert isinstance(results[0], DeadlineExceededError)


def test_join_entries_are_checked() -> None:
    entry = JoinEntry("peer-a", 1.0, 10.0, "10.0.0.1")
    assert JoinEntry.decode(entry.encode(), "peer-a") == entry
    with pytest.raises(ProtocolError, match="other than its publisher"):
        JoinEntry.decode(entry.encode(), "peer-b")
    with pytest.raises(ProtocolError, match="malformed"):
        JoinEntry.decode(b"[1, 2]", "peer-a")
    with pytest.raises(ProtocolError, match="limit"):
        JoinEntry.decode(b" " * 5000, "peer-a")
    with pytest.raises(ProtocolError, match="malformed"):  # (RecursionError in the parser)
        JoinEntry.decode(b"[" * 1000, "peer-a")


def test_a_join_entry_with_a_number_too_large_for_a_float_is_refused() -> None:
    data = json.dumps(["p", 1.0, 10**400, ""]).encode()  # int -> float overflows
    with pytest.raises(ProtocolError, match="malformed"):
        JoinEntry.decode(data, "p")


def test_a_peer_whose_own_entry_the_others_would_refuse_does_not_join() -> None:
    # Its own entry was counted without the check the others make, so it computed a member
    # list (and group hash) of its own.
    clock = IdleJumpClock()
    board = InMemoryRendezvousBoard()

    async def main() -> None:
        me = JoinEntry("peer-nan", 0.0, float("nan"))
        with pytest.raises(ProtocolError, match="bandwidth"):
            await form_group(
                board, "run/1", me, opens_at_s=clock.wall(), config=CONFIG, clock=clock
            )
        assert await board.entries("run/1") == []  # nothing announced

    asyncio.run(clock.run(main()))


class _SlowAnnounce(InMemoryRendezvousBoard):
    """A board whose announcement of one peer takes ``delay_s`` (slow replicas, a retry)."""

    def __init__(self, clock: IdleJumpClock, slow: str, delay_s: float) -> None:
        super().__init__()
        self.clock, self.slow, self.delay_s = clock, slow, delay_s

    async def announce(self, key: str, entry: JoinEntry, ttl_s: float) -> None:
        if entry.peer_id == self.slow:
            await self.clock.sleep_async(self.delay_s)
        await super().announce(key, entry, ttl_s)


def test_a_peer_whose_announcement_lands_after_the_others_read_joins_the_next_round() -> None:
    # It joins 0.1 s before the cutoff (5 s) and its announcement takes 2 s; the others read
    # the members at 6 s without it. Before, it counted itself anyway: two member lists, two
    # group hashes (and with a 30 s announcement it returned at 35 s, past any deadline).
    clock = IdleJumpClock()
    board = _SlowAnnounce(clock, "peer-slow", 2.0)
    config = GroupConfig(min_group_size=2, max_group_size=8, join_window_s=5.0)
    opens_at = clock.wall()

    async def one(peer: str, at: float) -> AgreedGroup | Exception:
        await clock.sleep_async(at)
        try:
            me = JoinEntry(peer, 0.0, 1e7)
            return await form_group(
                board, "run/1", me, opens_at_s=opens_at, config=config, clock=clock
            )
        except DeadlineExceededError as exc:
            return exc

    async def main() -> list[AgreedGroup | Exception]:
        return await asyncio.gather(one("peer-a", 1.0), one("peer-b", 2.0), one("peer-slow", 4.9))

    a, b, slow = asyncio.run(clock.run(main()))
    assert isinstance(a, AgreedGroup)
    assert isinstance(b, AgreedGroup)
    assert a.group_hash == b.group_hash
    assert set(a.members) == {"peer-a", "peer-b"}
    assert isinstance(slow, DeadlineExceededError)
    assert "next one" in str(slow)


@pytest.mark.parametrize(
    ("num_peers", "smallest", "largest", "sizes"),
    [(5, 4, 4, [4]), (9, 5, 8, [8]), (17, 9, 16, [16]), (30, 2, 8, [7, 7, 8, 8]), (3, 2, 2, [2])],
)
def test_groups_are_never_made_too_small_where_a_valid_one_fits(
    num_peers: int, smallest: int, largest: int, sizes: list[int]
) -> None:
    # Before, five peers with groups of exactly four split into groups of three and two, and
    # every one of them sat the round out.
    peers = [f"p{i}" for i in range(num_peers)]
    groups = split_into_groups("run/3", peers, largest, smallest)
    assert sorted(len(g) for g in groups) == sizes
    placed = [p for g in groups for p in g]
    assert len(placed) == len(set(placed))


def test_seventy_peers_forming_on_the_dht_agree_on_their_groups() -> None:
    # A DHT key kept 64 records: from the 65th peer on every replica refused the announcement,
    # the refused peer counted itself anyway, and 6 of 70 formed groups nobody else had.
    async def main(clock: IdleJumpClock) -> list[AgreedGroup | Exception]:
        network = FakeDhtNetwork(clock, DhtConfig(bucket_size=8, record_ttl_s=300.0))
        first = network.add_node()
        for _ in range(69):
            node = network.add_node()
            node.learn(first.own_record())
            await node.lookup(node.identity.digest)
        for _ in range(3):
            for node in network.nodes.values():
                await node.refresh()
        opens_at = clock.wall()
        config = GroupConfig(min_group_size=2, max_group_size=16, join_window_s=5.0)

        async def one(dht: Dht) -> AgreedGroup | Exception:
            me = JoinEntry(dht.identity.peer_id, 0.0, 1e6)
            board = DhtRendezvousBoard(dht)
            try:
                return await form_group(
                    board, "run/1", me, opens_at_s=opens_at, config=config, clock=clock
                )
            except DeadlineExceededError as exc:
                return exc

        return list(await asyncio.gather(*(one(d) for d in network.nodes.values())))

    clock = IdleJumpClock()
    results = asyncio.run(clock.run(main(clock)))
    groups = [r for r in results if isinstance(r, AgreedGroup)]
    assert len(groups) == 70
    by_members = Counter(g.members for g in groups)
    assert all(by_members[g.members] == len(g.members) for g in groups)  # each member has it
    assert len({g.group_hash for g in groups}) == groups[0].num_groups == 5


class FakeFullKeyDht:
    """A DHT whose replicas refuse every record (the key is full)."""

    async def lookup(self, key: bytes) -> list[str]:
        return ["replica"]

    async def put(self, key: bytes, value: bytes, ttl_s: float, **_: object) -> int:
        return 0

    async def get(self, key: bytes, replicated_only: bool = False) -> list[object]:
        return []


def test_a_peer_whose_entry_every_replica_refused_does_not_count_itself_in() -> None:
    clock = IdleJumpClock()
    config = GroupConfig(min_group_size=1, max_group_size=8, join_window_s=5.0)

    async def main() -> None:
        me = JoinEntry("peer-a", 0.0, 1.0)
        with pytest.raises(DeadlineExceededError, match="no replica took"):
            await form_group(
                DhtRendezvousBoard(FakeFullKeyDht()),
                "run/1",
                me,
                opens_at_s=clock.wall(),
                config=config,
                clock=clock,
            )

    asyncio.run(clock.run(main()))
