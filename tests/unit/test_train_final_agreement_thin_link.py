"""The final agreement of swarm DiLoCo peers when the odd one's link is thin: the peers holding
the majority's state keep serving it while the odd one is still fetching it.

Three real strategies and state donors over the in-memory bulk network (``state_sync_fakes``),
with a shared in-memory DHT for the hashes and a run whose members are all active. The odd
peer's downlink carries the donors' replies slowly: its download takes several times the
final agreement's wait (scaled down here, as a 10 MB state over 2 Mbit/s takes 40 s against
the 20 s wait). Before, the donors gave up at that wait, left and stopped serving mid-download,
and the odd peer ended on its own weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from state_sync_fakes import (
    FakeBulkNetwork,
    FakeSharedLink,
    LinkedRepliesNode,
    add_linked_node,
    assert_same_state,
    random_snapshot,
)
from torch import nn

import final_agreement_support as support
from gossamer.core.clock import FakeClock
from gossamer.net.identity import peer_id_of_public_key
from gossamer.train import swarm_diloco
from gossamer.train.diloco_config import DiLoCoConfig
from gossamer.train.state_sync import StateSnapshot, download_state
from gossamer.train.state_sync_donor import StateDonor
from gossamer.train.swarm_diloco import SwarmDiLoCoStrategy

RUN = "final-thin-link"
FINAL_OUTER_STEP = 3
FINAL_STEP = 6
CHUNK = 4096
BASE_WAIT_S = 0.5
"""The final agreement's wait, scaled down (20 s in a run)."""
WIRE_S = 3.0
"""How long the odd peer's downlink takes to carry the majority's state: six waits."""


class SharedDht:
    """Records by key and publisher, as every peer's DHT finds them."""

    def __init__(self) -> None:
        self.records: dict[bytes, dict[bytes, bytes]] = {}


class PeerDht:
    """One peer's view of :class:`SharedDht`: its puts are signed with its key."""

    def __init__(self, shared: SharedDht, public_key: bytes) -> None:
        self._shared = shared
        self._public_key = public_key

    async def put(
        self, key: bytes, value: bytes, ttl_s: float | None = None, *, renew: bool = True
    ) -> int:
        self._shared.records.setdefault(key, {})[self._public_key] = value
        return 1

    async def get(self, key: bytes, *, replicated_only: bool = False) -> list[Any]:
        return [
            SimpleNamespace(value=value, publisher_public_key=public_key)
            for public_key, value in self._shared.records.get(key, {}).items()
        ]


class LoopThread:
    """One event loop in a thread of its own, that every peer's node work runs on (the fake
    bulk network hands a transfer to its receiver's handler on the sender's loop)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_the_rest(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class FakeNodeThread:
    """A peer's node thread: runs its node work on the shared loop."""

    def __init__(self, loop_thread: LoopThread, node: LinkedRepliesNode) -> None:
        self._loop_thread = loop_thread
        self.node = node

    def run(self, work: Callable[[Any], Coroutine[Any, Any, Any]], timeout_s: float) -> Any:
        future = asyncio.run_coroutine_threadsafe(work(self.node), self._loop_thread.loop)
        return future.result(timeout=timeout_s)


class FakeRun:
    """The run's membership as one peer's failure detector reports it: every other peer that
    has not left is active."""

    def __init__(
        self, me: str, peers: list[str], left: set[str], max_round_timeout_s: float
    ) -> None:
        self._me = me
        self._peers = peers
        self._left = left
        self.config = SimpleNamespace(max_round_timeout_s=max_round_timeout_s)
        self.settings: dict[str, Any] = {}
        self.other_settings: dict[str, Any] = {}
        self.other_settings_peers: frozenset[str] = frozenset()
        self.left_before_joining: frozenset[str] = frozenset()
        self.newest_seen_version: int | None = None
        self.looks = 0
        """Times the run's states were read (each a DHT lookup in a swarm)."""

    def run_states(self) -> dict[str, tuple[str, int]]:
        self.looks += 1
        return {
            p: ("active", FINAL_OUTER_STEP)
            for p in self._peers
            if p != self._me and p not in self._left
        }

    def join_run(self, version: int) -> None:
        pass

    def leave_run(self) -> None:
        pass

    def newest_version(self) -> int:
        return -1

    def rounds_awaiting(self) -> list[str]:
        return []


@dataclass
class Peer:
    strategy: SwarmDiLoCoStrategy
    model: nn.Module
    donor: StateDonor
    peer_id: str


@contextlib.contextmanager
def peers(
    count: int, link: FakeSharedLink, *, max_round_timeout_s: float = 60.0
) -> Iterator[tuple[list[Peer], set[str]]]:
    """``count`` peers on one in-memory network; every peer's state-sync replies cross
    ``link`` (the odd peer's downlink: only it downloads). Yields them and the set of peers
    that left the run (a peer leaves once its finish() returns)."""
    network = FakeBulkNetwork()
    dht = SharedDht()
    loop_thread = LoopThread()
    keys = [bytes([i + 1]) * 32 for i in range(count)]
    ids = [peer_id_of_public_key(key) for key in keys]
    left: set[str] = set()
    made: list[Peer] = []
    try:
        with contextlib.ExitStack() as stack:
            for key, peer_id in zip(keys, ids, strict=True):
                node = add_linked_node(network, peer_id, link)
                cast(Any, node).dht = PeerDht(dht, key)
                donor = StateDonor(node, chunk_bytes=CHUNK)
                stack.callback(donor.close)
                strategy = SwarmDiLoCoStrategy(
                    DiLoCoConfig(inner_steps=2, run_id=RUN),
                    cast(Any, FakeRun(peer_id, ids, left, max_round_timeout_s)),
                    cast(Any, FakeNodeThread(loop_thread, node)),
                    donor,
                    join_existing=False,
                )
                stack.callback(strategy.close)
                torch.manual_seed(0)  # every peer starts from the same weights, as a run does
                model = nn.Linear(64, 64)
                strategy.setup(model, torch.optim.AdamW(model.parameters()))
                made.append(Peer(strategy, model, donor, peer_id))
            yield made, left
    finally:
        loop_thread.close()


def end_run_with(peer: Peer, value: float) -> None:
    """Make ``peer`` stand after the final outer step with every global weight at ``value``."""
    support.end_run_with(
        peer.strategy,
        peer.model,
        value,
        outer_step=FINAL_OUTER_STEP,
        step=FINAL_STEP,
        published=True,
    )


def finish_all(made: list[Peer], left: set[str]) -> tuple[list[bool], list[float]]:
    """Every peer's finish() at once; a peer whose finish() returned leaves the run and its
    process ends: its donor serves no more. Returns what each returned and when."""

    def leave(index: int) -> None:
        left.add(made[index].peer_id)
        made[index].donor.close()

    finishes = [functools.partial(p.strategy.finish, p.model, FINAL_STEP) for p in made]
    return support.finish_all(finishes, then=leave)


def state_bytes(peer: Peer) -> int:
    """Bytes of ``peer``'s published state, as a download carries them."""
    with peer.donor._lock:
        assert peer.donor._current is not None
        return peer.donor._current.snapshot.manifest.total_bytes


@pytest.mark.timeout(60)
def test_the_majority_serves_its_final_state_until_a_slow_minority_has_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(swarm_diloco, "_FINAL_AGREEMENT_S", BASE_WAIT_S)
    link = FakeSharedLink(bytes_per_s=1.0)  # (set once the state's size is known)
    with peers(3, link) as (made, left):
        for peer, value in zip(made, [1.0, 2.0, 1.0], strict=True):
            end_run_with(peer, value)
        link.bytes_per_s = state_bytes(made[0]) / WIRE_S
        replaced, took_s = finish_all(made, left)
        # The odd peer took the majority's state: every peer ends on the same weights.
        assert replaced == [False, True, False]
        assert len({p.strategy.global_weights_hash() for p in made}) == 1
        odd = made[1]
        assert odd.strategy.resyncs == 1
        for param in odd.model.parameters():
            assert torch.equal(param.detach(), torch.full_like(param, 1.0))
        # The majority stayed past its wait, serving, until the odd peer had its state.
        assert min(took_s[0], took_s[2]) > WIRE_S * 0.8


@pytest.mark.timeout(60)
def test_a_peer_that_fetches_nothing_holds_the_others_no_longer_than_the_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The odd peer published another hash and never runs its finish(): it fetches nothing,
    # so the majority leaves at its wait, as before.
    monkeypatch.setattr(swarm_diloco, "_FINAL_AGREEMENT_S", BASE_WAIT_S)
    link = FakeSharedLink(bytes_per_s=1e9)
    with peers(3, link) as (made, left):
        for peer, value in zip(made, [1.0, 2.0, 1.0], strict=True):
            end_run_with(peer, value)
        replaced, took_s = finish_all([made[0], made[2]], left)
        assert replaced == [False, False]
        assert all(BASE_WAIT_S <= s < BASE_WAIT_S + 2.0 for s in took_s)
        assert made[0].donor.num_bytes_served == made[2].donor.num_bytes_served == 0


def _serve_a_download_longer_than(cap_s: float) -> tuple[list[bool], list[float], list[int]]:
    """The odd peer's download takes 10 s; the majority serves it at most ``cap_s``
    (``swarm.max_round_timeout_s``). Returns what each peer's finish() returned, when, and how
    often each read the run's states (see :class:`FakeRun`)."""
    link = FakeSharedLink(bytes_per_s=1.0)
    with peers(3, link, max_round_timeout_s=cap_s) as (made, left):
        for peer, value in zip(made, [1.0, 2.0, 1.0], strict=True):
            end_run_with(peer, value)
        link.bytes_per_s = state_bytes(made[0]) / 10.0
        replaced, took_s = finish_all(made, left)
        return replaced, took_s, [cast(Any, p.strategy.swarm_averager).looks for p in made]


@pytest.mark.timeout(60)
def test_a_minority_fetching_for_longer_than_a_round_may_take_is_left_at_that_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its download would take 10 s; the majority serves it at most swarm.max_round_timeout_s
    # (2 s here) in all, then leaves.
    monkeypatch.setattr(swarm_diloco, "_FINAL_AGREEMENT_S", BASE_WAIT_S)
    cap_s = 2.0
    replaced, took_s, _ = _serve_a_download_longer_than(cap_s)
    assert replaced == [False, False, False]  # (the odd peer's download was cut short)
    assert all(cap_s <= s < cap_s + 2.0 for s in (took_s[0], took_s[2]))


@pytest.mark.timeout(60)
def test_a_peer_serving_past_the_wait_looks_at_the_run_less_often(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The majority serves the odd peer's download for the cap (4 s here). It looked at the run
    # every 0.2 s throughout (20 looks in those 4 s; up to 900 s and 4,500 DHT lookups for
    # every finished peer in a run); past the wait, once a second.
    monkeypatch.setattr(swarm_diloco, "_FINAL_AGREEMENT_S", BASE_WAIT_S)
    cap_s = 4.0
    _, took_s, looks = _serve_a_download_longer_than(cap_s)
    assert all(cap_s <= s < cap_s + 2.0 for s in (took_s[0], took_s[2]))
    for serving in (0, 2):
        # (the wait's looks, then about one a second)
        assert looks[serving] <= BASE_WAIT_S / 0.2 + 2 + (cap_s - BASE_WAIT_S) + 2, looks


def test_a_donor_says_how_long_since_it_last_served_a_version() -> None:
    # What finish() reads: 0 while a reply of the version is on its way (a thin link's chunk
    # takes long to cross), the time since the last one after, None for a version it never
    # served or no longer holds.
    clock = FakeClock()
    network = FakeBulkNetwork()
    link = FakeSharedLink(bytes_per_s=40_000.0)  # (5 chunks of 4 KiB: about half a second)
    node = add_linked_node(network, "donor", link)
    donor = StateDonor(node, chunk_bytes=CHUNK, clock=clock)
    want = random_snapshot(5000)
    donor.publish(want)
    assert donor.serving_idle_s(want.version) is None
    seen: list[float | None] = []

    async def download_watching() -> StateSnapshot:
        fetching = asyncio.create_task(
            download_state(network.add("newcomer"), ["donor"], timeout_s=30)
        )
        while not fetching.done():
            seen.append(donor.serving_idle_s(want.version))
            await asyncio.sleep(0.01)
        return await fetching

    got = asyncio.run(download_watching())
    assert_same_state(got[0], want)
    assert 0.0 in seen  # (sending)
    assert donor.serving_idle_s(want.version) == 0.0  # (taken just now, by the fake clock)
    clock.advance(7.0)
    assert donor.serving_idle_s(want.version) == 7.0
    assert donor.serving_idle_s(want.version + 1) is None
    clock.advance(60.0)  # (past the grace a replaced state is kept for its downloads)
    for version in (want.version + 1, want.version + 2):  # (it no longer holds the first)
        donor.publish(StateSnapshot(version=version, tensors=want.tensors, meta={"step": 0}))
    assert donor.serving_idle_s(want.version) is None


@pytest.mark.timeout(60)
def test_a_peer_outside_the_run_fetching_the_final_state_holds_nobody(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The odd peer published another hash and never runs its finish(); a node that is not a
    # member of the run (a monitor, an evaluator, or a hostile one) downloads the majority's
    # final state over and over. Only members still to agree may hold the majority past its
    # wait: counted as serving, that node held every finished peer to the cap (900 s by
    # default; 5 s here), with requests of a few bytes.
    monkeypatch.setattr(swarm_diloco, "_FINAL_AGREEMENT_S", BASE_WAIT_S)
    link = FakeSharedLink(bytes_per_s=1e9)
    with peers(3, link, max_round_timeout_s=5.0) as (made, left):
        for peer, value in zip(made, [1.0, 2.0, 1.0], strict=True):
            end_run_with(peer, value)
        network = made[0].donor._node.network  # (the peers' in-memory network)
        donors = [made[0].peer_id, made[2].peer_id]
        stop = threading.Event()
        fetched: list[int] = []

        def fetch_over_and_over() -> None:
            async def fetch() -> None:
                outsider = network.add("outsider")
                while not stop.is_set():
                    with contextlib.suppress(Exception):
                        await download_state(outsider, donors, timeout_s=5)
                        fetched.append(1)
                    await asyncio.sleep(0.1)

            asyncio.run(fetch())

        fetcher = threading.Thread(target=fetch_over_and_over)
        fetcher.start()
        try:
            replaced, took_s = finish_all([made[0], made[2]], left)
        finally:
            stop.set()
            fetcher.join(timeout=10)
        assert fetched, "the outsider never fetched the state"
        assert replaced == [False, False]
        assert all(BASE_WAIT_S <= s < BASE_WAIT_S + 2.0 for s in took_s), took_s
