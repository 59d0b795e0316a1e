"""Upgrading relayed connections to direct ones: the decisions on each side, with fakes.

The NATed side offers a direct way back only to a reachable dialer, once per retry period; the
reachable side swaps a relayed connection for one through the offer, counts it, keeps the relayed
one on any failure, and goes back to the relays when the offer ends. The relay service keeps
direct reservations apart from relayed ones: nobody else tunnels through them and their bytes are
not counted as relayed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from gossamer.core.clock import FakeClock
from gossamer.core.errors import PeerUnavailableError
from gossamer.net.config import NodeConfig, RelayConfig
from gossamer.net.connections import DialTarget
from gossamer.net.counters import NetCounters
from gossamer.net.handshake import Session
from gossamer.net.recent_failures import note_failure
from gossamer.net.relay import RelayServicer
from gossamer.net.relay_dialer import REVERSED_ADDRESS
from gossamer.net.server import _session_var
from gossamer.net.upgrades import DirectUpgrades
from gossamer.proto import net_pb2

DIRECT = net_pb2.REACHABILITY_DIRECT
RELAYED = net_pb2.REACHABILITY_RELAYED


@dataclass
class FakeRecord:
    reachability: int
    addresses: tuple[str, ...] = ("10.0.0.1:1",)


@dataclass
class FakeDirectory:
    records: dict[str, FakeRecord] = field(default_factory=dict)

    def get(self, peer_id: str) -> FakeRecord | None:
        return self.records.get(peer_id)


@dataclass
class FakeConnection:
    peer_id: str
    target: DialTarget
    calls: list[asyncio.Task[None]] = field(default_factory=list)
    """Calls running on it."""
    closed: bool = False


class FakePool:
    """Connections in memory; a dial through the reversal succeeds unless ``dial_error`` is set.

    Retired connections close as gRPC channels do with a grace: once their calls have ended, or
    at the end of the grace (on the fake clock), cancelling the calls still running.
    """

    def __init__(self, clock: FakeClock) -> None:
        self._clock = clock
        self.connections: dict[str, FakeConnection] = {}
        self.dial_error: Exception | None = None
        self.dials: list[tuple[DialTarget, bool]] = []
        self.retired: list[FakeConnection] = []
        self.closed_retired: list[str] = []
        self.asked: list[str] = []
        self._locks: dict[str, asyncio.Lock] = {}

    def get(self, peer_id: str) -> FakeConnection | None:
        return self.connections.get(peer_id)

    def dial_lock(self, peer_id: str) -> asyncio.Lock:
        return self._locks.setdefault(peer_id, asyncio.Lock())

    async def connection(self, peer_id: str, timeout_s: float | None = None) -> FakeConnection:
        self.asked.append(peer_id)
        # The reachable peer is only known through a relay here, so no reservation is made.
        return FakeConnection(peer_id, DialTarget("relay", "relayed"))

    async def dial(
        self, target: DialTarget, *, expected_peer_id: str, retire_previous: bool = False
    ) -> FakeConnection:
        self.dials.append((target, retire_previous))
        if self.dial_error is not None:
            raise self.dial_error
        previous = self.connections.get(expected_peer_id)
        if previous is not None and retire_previous:
            self.retired.append(previous)
        self.connections[expected_peer_id] = FakeConnection(expected_peer_id, target)
        return self.connections[expected_peer_id]

    def retire(self, peer_id: str, connection: FakeConnection) -> None:
        if self.connections.get(peer_id) is connection:
            del self.connections[peer_id]
            self.retired.append(connection)

    async def close_retired(self, peer_id: str, grace_s: float) -> None:
        self.closed_retired.append(peer_id)
        deadline_s = self._clock.monotonic() + grace_s
        for connection in [c for c in self.retired if c.peer_id == peer_id and not c.closed]:
            try:
                while any(not call.done() for call in connection.calls):
                    if self._clock.monotonic() >= deadline_s:
                        break
                    await asyncio.sleep(0)
            finally:  # (cancelled: closed at once, as the pool does)
                for call in connection.calls:
                    call.cancel()
                connection.closed = True


class FakeDialer:
    def __init__(self) -> None:
        self.reversible: set[str] = set()

    def direct_target(self, peer_id: str) -> DialTarget | None:
        return DialTarget(REVERSED_ADDRESS, "direct") if peer_id in self.reversible else None


@dataclass
class Side:
    upgrades: DirectUpgrades
    pool: FakePool
    directory: FakeDirectory
    dialer: FakeDialer
    counters: NetCounters
    clock: FakeClock
    relayed: list[bool]


def _side(*, relayed: bool) -> Side:
    clock = FakeClock()
    pool, directory, dialer = FakePool(clock), FakeDirectory(), FakeDialer()
    counters, state = NetCounters(), [relayed]
    upgrades = DirectUpgrades(
        pool,  # type: ignore[arg-type]
        directory,  # type: ignore[arg-type]
        dialer,  # type: ignore[arg-type]
        NodeConfig(listen_address="127.0.0.1:0"),
        clock,
        counters,
        local_address=lambda: "127.0.0.1:1",
        is_relayed=lambda: state[0],
    )
    return Side(upgrades, pool, directory, dialer, counters, clock, state)


async def _settle(side: Side) -> None:
    await side.upgrades.close()  # cancels and awaits whatever the calls above started


def test_nated_peer_offers_a_way_back_only_to_reachable_dialers() -> None:
    async def scenario() -> None:
        side = _side(relayed=True)
        side.directory.records = {"nated": FakeRecord(RELAYED), "reachable": FakeRecord(DIRECT)}
        side.upgrades.offer("nated")
        side.upgrades.offer("reachable")
        assert side.upgrades.holding == {"reachable"}
        await asyncio.sleep(0)
        await _settle(side)
        assert side.pool.asked == ["reachable"]

    asyncio.run(scenario())


def test_reachable_peer_offers_nothing() -> None:
    async def scenario() -> None:
        side = _side(relayed=False)
        side.directory.records = {"reachable": FakeRecord(DIRECT)}
        side.upgrades.offer("reachable")
        assert side.upgrades.holding == set()
        await _settle(side)

    asyncio.run(scenario())


def test_offer_waits_for_the_dialers_record_from_its_handshake() -> None:
    async def scenario() -> None:
        side = _side(relayed=True)
        side.upgrades.offer("reachable")  # the tunnel is announced before the handshake
        assert side.upgrades.holding == set()
        side.directory.records["reachable"] = FakeRecord(DIRECT)
        side.upgrades.session_opened("reachable")
        assert side.upgrades.holding == {"reachable"}
        side.upgrades.session_opened("other")  # no tunnel from it: nothing to do
        assert side.upgrades.holding == {"reachable"}
        await _settle(side)

    asyncio.run(scenario())


def test_failed_offer_is_not_retried_until_the_retry_period_passes() -> None:
    async def scenario() -> None:
        side = _side(relayed=True)
        side.directory.records["reachable"] = FakeRecord(DIRECT)
        side.upgrades.offer("reachable")
        for _ in range(5):  # the hold finds only a relayed way there and gives up
            await asyncio.sleep(0)
        assert side.upgrades.holding == set()
        side.upgrades.offer("reachable")
        assert side.upgrades.holding == set()
        side.clock.advance(31.0)
        side.upgrades.offer("reachable")
        assert side.upgrades.holding == {"reachable"}
        await asyncio.sleep(0)
        await _settle(side)
        assert side.pool.asked == ["reachable", "reachable"]

    asyncio.run(scenario())


def test_relayed_connection_is_swapped_for_the_reversal_and_counted() -> None:
    async def scenario() -> None:
        side = _side(relayed=False)
        relayed = FakeConnection("nated", DialTarget("relay", "relayed"))
        side.pool.connections["nated"] = relayed
        side.dialer.reversible.add("nated")
        side.upgrades.reversed_to("nated")
        for _ in range(5):
            await asyncio.sleep(0)
        await _settle(side)
        assert side.pool.dials == [(DialTarget(REVERSED_ADDRESS, "direct"), True)]
        assert side.pool.connections["nated"].target.kind == "direct"
        assert side.pool.retired == [relayed]
        assert side.pool.closed_retired == ["nated"]
        assert side.counters.num_direct_upgrades == 1

    asyncio.run(scenario())


async def _transfer(clock: FakeClock, duration_s: float) -> None:
    """A call that runs ``duration_s`` on the fake clock (a bulk transfer on a slow link)."""
    end_s = clock.monotonic() + duration_s
    while clock.monotonic() < end_s:
        await clock.sleep_async(1.0)


async def _run_until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(10_000):  # (fake time: bounded passes)
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(what)


def test_a_transfer_on_the_replaced_connection_runs_to_its_end() -> None:
    # A 32 s bulk transfer on a 1 Mbit/s relayed link failed: the relayed connection was closed
    # 30 s after the upgrade, whatever still ran on it.
    async def scenario() -> None:
        side = _side(relayed=False)
        relayed = FakeConnection("nated", DialTarget("relay", "relayed"))
        side.pool.connections["nated"] = relayed
        transfer = asyncio.ensure_future(_transfer(side.clock, 32.0))
        relayed.calls.append(transfer)
        side.dialer.reversible.add("nated")
        side.upgrades.reversed_to("nated")
        await _run_until(lambda: relayed.closed and transfer.done(), "the transfer never ended")
        assert not transfer.cancelled(), "the upgrade cut the transfer"
        assert side.clock.monotonic() >= 32.0
        assert side.pool.connections["nated"].target.kind == "direct"  # (new calls)
        await _settle(side)

    asyncio.run(scenario())


def test_a_transfer_on_the_replaced_connection_holds_up_no_later_upgrade() -> None:
    async def scenario() -> None:
        side = _side(relayed=False)
        relayed = FakeConnection("nated", DialTarget("relay", "relayed"))
        side.pool.connections["nated"] = relayed
        transfer = asyncio.ensure_future(_transfer(side.clock, 600.0))
        relayed.calls.append(transfer)
        side.dialer.reversible.add("nated")
        side.upgrades.reversed_to("nated")
        await _run_until(lambda: side.counters.num_direct_upgrades == 1, "no upgrade")
        # Its way back ends while the transfer still runs: calls go through the relays again,
        # and the next reversal upgrades them.
        side.upgrades.reversal_ended("nated")
        side.pool.connections["nated"] = FakeConnection("nated", DialTarget("relay", "relayed"))
        side.upgrades.reversed_to("nated")
        await _run_until(lambda: len(side.pool.dials) == 2, "no second upgrade")
        assert not transfer.done()
        assert side.counters.num_direct_upgrades == 2
        await _settle(side)  # (closing cuts what still runs)
        await asyncio.wait([transfer])
        assert transfer.cancelled()
        assert relayed.closed

    asyncio.run(scenario())


@pytest.mark.parametrize("current_kind", [None, "direct"])
def test_no_upgrade_without_a_relayed_connection(current_kind: str | None) -> None:
    async def scenario() -> None:
        side = _side(relayed=False)
        if current_kind is not None:
            side.pool.connections["nated"] = FakeConnection("nated", DialTarget("x", current_kind))
        side.dialer.reversible.add("nated")
        side.upgrades.reversed_to("nated")
        for _ in range(5):
            await asyncio.sleep(0)
        await _settle(side)
        assert side.pool.dials == []
        assert side.counters.num_direct_upgrades == 0

    asyncio.run(scenario())


def test_failed_upgrade_keeps_the_relayed_connection() -> None:
    async def scenario() -> None:
        side = _side(relayed=False)
        relayed = FakeConnection("nated", DialTarget("relay", "relayed"))
        side.pool.connections["nated"] = relayed
        side.pool.dial_error = PeerUnavailableError("the tunnel was not accepted")
        side.dialer.reversible.add("nated")
        side.upgrades.reversed_to("nated")
        for _ in range(5):
            await asyncio.sleep(0)
        await _settle(side)
        assert len(side.pool.dials) == 1
        assert side.pool.connections["nated"] is relayed
        assert side.counters.num_direct_upgrades == 0

    asyncio.run(scenario())


def test_ended_reversal_sends_later_calls_back_to_the_relays() -> None:
    async def scenario() -> None:
        side = _side(relayed=False)
        reversed_ = FakeConnection("nated", DialTarget(REVERSED_ADDRESS, "direct"))
        plain = FakeConnection("other", DialTarget("10.0.0.2:1", "direct"))
        side.pool.connections = {"nated": reversed_, "other": plain}
        side.upgrades.reversal_ended("nated")
        side.upgrades.reversal_ended("other")
        assert side.pool.connections == {"other": plain}
        assert side.pool.retired == [reversed_]
        await asyncio.sleep(0)
        await _settle(side)

    asyncio.run(scenario())


def _relay(counters: NetCounters, *, serve: bool) -> RelayServicer:
    return RelayServicer(
        RelayConfig(serve=serve), counters, FakeClock(), may_relay=lambda: True, accept_timeout_s=1
    )


class _Context:
    """What a reservation asks of gRPC's servicer context: the caller's address."""

    def peer(self) -> str:
        return "ipv4:10.0.0.7:5000"


def test_direct_reservation_is_kept_apart_from_relaying() -> None:
    async def scenario() -> None:
        counters = NetCounters()
        relay = _relay(counters, serve=False)  # a peer that relays for nobody still reverses
        started: list[str] = []
        ended: list[str] = []
        relay.on_direct_reservation = started.append
        relay.on_direct_reservation_ended = ended.append
        _session_var.set(Session("nated", b"k" * 32, 0.0))
        events: Any = relay.Reserve(net_pb2.ReserveRequest(direct=True), _Context())  # type: ignore[arg-type]
        first = await anext(events)
        assert first.reserved
        pending = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0)
        assert started == ["nated"]
        assert relay.has_direct("nated")
        assert relay.reserved_peers == []
        assert counters.relay_reservations == 0
        # nobody can tunnel to it through this peer as a relay
        with pytest.raises(PeerUnavailableError):
            await relay._open_tunnel("third", "nated")
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await events.aclose()
        assert ended == ["nated"]
        assert not relay.has_direct("nated")

    asyncio.run(scenario())


def test_relay_reservation_still_refused_when_not_serving() -> None:
    async def scenario() -> None:
        relay = _relay(NetCounters(), serve=False)
        _session_var.set(Session("nated", b"k" * 32, 0.0))
        events: Any = relay.Reserve(net_pb2.ReserveRequest(), _Context())  # type: ignore[arg-type]
        with pytest.raises(PeerUnavailableError):
            await anext(events)

    asyncio.run(scenario())


def test_failures_past_their_retry_wait_are_forgotten() -> None:
    # One entry per peer whose reservation ever failed was kept for the node's life.
    failed_at: dict[str, float] = {}
    for i in range(1000):
        note_failure(failed_at, f"peer{i}", now=float(i), keep_s=30.0)
    assert sorted(failed_at.values()) == [float(i) for i in range(970, 1000)]
    note_failure(failed_at, "peer999", now=1000.0, keep_s=30.0)
    assert failed_at["peer999"] == 1000.0
    assert len(failed_at) == 29  # (peer970 went, 30 s old)
