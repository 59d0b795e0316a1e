"""How a relayed peer's reservation watches its relay, on the watchdog alone (no sockets): a
relay is alive while anything comes from it, heartbeat answers or tunnel bytes."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest

from gossamer.core.clock import FakeClock
from gossamer.core.errors import DeadlineExceededError, PeerUnavailableError
from gossamer.net.config import NodeConfig
from gossamer.net.connections import DialTarget
from gossamer.net.counters import NetCounters
from gossamer.net.relay_dialer import RelayDialer
from gossamer.net.relay_traffic import BUSY_RELAY_SILENT_S, RelayTraffic
from gossamer.net.tunnels import _RETRY_RELAY_AFTER_S, RelayReservations
from gossamer.proto import net_pb2


class _ClockOnlyPool:
    """What the relay watchdog reads of a pool: its clock (its record of relay traffic is
    kept per pool)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock


async def _nothing() -> None:
    pass


def _watchdog(pool: _ClockOnlyPool, heartbeat: Any) -> RelayReservations:
    return RelayReservations(
        pool,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        NodeConfig(keepalive_interval_s=10.0, keepalive_timeout_s=5.0),
        pool.clock,
        "self",
        local_address=lambda: "127.0.0.1:1",
        needs_relay=lambda: True,
        on_change=_nothing,
        heartbeat=heartbeat,
    )


def test_a_relay_whose_tunnels_bring_bytes_is_kept_though_no_heartbeat_is_answered() -> None:
    """At 500 kbit/s with bulk data both ways, heartbeat answers came 8-23 s late behind the
    tunnels' data, and the relay was given up (with the transfers through it) after 15 s."""

    async def main() -> None:
        pool = _ClockOnlyPool(FakeClock())
        traffic = RelayTraffic.of(pool)  # type: ignore[arg-type]
        num_heartbeats = 0

        async def heartbeat(peer_id: str, timeout_s: float) -> None:
            nonlocal num_heartbeats
            num_heartbeats += 1
            pool.clock.advance(timeout_s / 2)
            traffic.heard("relay")  # (a tunnel's frame meanwhile)
            pool.clock.advance(timeout_s / 2)
            raise DeadlineExceededError("no answer within the deadline")

        watch = asyncio.ensure_future(_watchdog(pool, heartbeat)._until_silent("relay", heartbeat))
        for _ in range(2000):
            if num_heartbeats >= 20 or watch.done():
                break
            await asyncio.sleep(0)
        assert not watch.done(), f"given up after {num_heartbeats} heartbeats"
        assert pool.clock.monotonic() > 60.0
        watch.cancel()

    asyncio.run(main())


def test_a_relay_silent_since_its_last_byte_is_given_up_after_the_window() -> None:
    """Bytes keep a relay only while they come: one that then sends nothing at all (hung) is
    given up keepalive interval + timeout (15 s) after the last of them, as before."""

    async def main() -> None:
        pool = _ClockOnlyPool(FakeClock())
        traffic = RelayTraffic.of(pool)  # type: ignore[arg-type]
        last_byte_at = 20.0

        async def heartbeat(peer_id: str, timeout_s: float) -> None:
            end = pool.clock.monotonic() + timeout_s
            while pool.clock.monotonic() < end:  # (a tunnel's frame every 1 s until 20 s)
                pool.clock.advance(min(1.0, end - pool.clock.monotonic()))
                if pool.clock.monotonic() <= last_byte_at:
                    traffic.heard("relay")
            raise DeadlineExceededError("no answer")

        traffic.heard("relay")
        watch = _watchdog(pool, heartbeat)._until_silent("relay", heartbeat)
        await asyncio.wait_for(watch, 5)
        silent_for_s = pool.clock.monotonic() - traffic.heard_at("relay")
        assert traffic.heard_at("relay") > last_byte_at - 1.0
        assert 15.0 <= silent_for_s <= 16.0, silent_for_s

    asyncio.run(main())


class _DroppingPool(_ClockOnlyPool):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.dropped: list[str] = []

    async def drop(self, peer_id: str, connection: object = None) -> None:
        self.dropped.append(peer_id)


class _QuietReservation:
    """A reservation call that announces nothing until cancelled."""

    async def read(self) -> object:
        await asyncio.Event().wait()
        raise AssertionError("never reached")


def test_a_heartbeat_that_breaks_is_not_put_down_to_the_relay_s_silence() -> None:
    """A heartbeat on a connection closed under it (gRPC's UsageError) ended the watchdog, and
    the reservation's end was logged as "the relay answered no heartbeat for 15 s" the moment
    it broke, in the netlab run where the link, not the relay, was at fault."""

    async def main() -> None:
        pool = _DroppingPool(FakeClock())

        async def heartbeat(peer_id: str, timeout_s: float) -> None:
            raise grpc.aio.UsageError("Channel is closed.")

        reservations = _watchdog(pool, heartbeat)
        with pytest.raises(PeerUnavailableError) as raised:
            await asyncio.wait_for(
                reservations._read_events("relay", _QuietReservation(), None),  # type: ignore[arg-type]
                5,
            )
        assert "heartbeat failed" in str(raised.value), raised.value
        assert "Channel is closed" in str(raised.value)
        assert pool.dropped == ["relay"]

    asyncio.run(main())


def test_a_relay_whose_tunnels_take_a_thin_link_s_bytes_is_kept_up_to_a_bound() -> None:
    """A tunnel that only sends brings back almost nothing, and the heartbeats wait behind its
    data: while the tunnels still take bytes they had to hold back (a thin link), the relay is
    kept, for at most BUSY_RELAY_SILENT_S with nothing from it (a hung relay's kernel takes
    bytes for a while yet)."""

    async def main() -> None:
        pool = _ClockOnlyPool(FakeClock())
        traffic = RelayTraffic.of(pool)  # type: ignore[arg-type]

        async def heartbeat(peer_id: str, timeout_s: float) -> None:
            end = pool.clock.monotonic() + timeout_s
            while pool.clock.monotonic() < end:  # (a frame held back and taken every 1 s)
                pool.clock.advance(min(1.0, end - pool.clock.monotonic()))
                traffic.sent("relay")
            raise DeadlineExceededError("no answer")

        watch = _watchdog(pool, heartbeat)._until_silent("relay", heartbeat)
        await asyncio.wait_for(watch, 5)
        assert BUSY_RELAY_SILENT_S <= pool.clock.monotonic() <= BUSY_RELAY_SILENT_S + 1.0

    asyncio.run(main())


def test_a_relay_is_given_up_soon_after_its_tunnels_stop_taking_bytes() -> None:
    async def main() -> None:
        pool = _ClockOnlyPool(FakeClock())
        traffic = RelayTraffic.of(pool)  # type: ignore[arg-type]
        last_sent_at = 20.0

        async def heartbeat(peer_id: str, timeout_s: float) -> None:
            end = pool.clock.monotonic() + timeout_s
            while pool.clock.monotonic() < end:  # (bytes taken until 20 s, then none)
                pool.clock.advance(min(1.0, end - pool.clock.monotonic()))
                if pool.clock.monotonic() <= last_sent_at:
                    traffic.sent("relay")
            raise DeadlineExceededError("no answer")

        watch = _watchdog(pool, heartbeat)._until_silent("relay", heartbeat)
        await asyncio.wait_for(watch, 5)
        assert last_sent_at + 14.0 <= pool.clock.monotonic() <= last_sent_at + 16.0

    asyncio.run(main())


class _ClosedUnderCall:
    """A reservation call that is granted, then ends as gRPC ends a call whose channel was
    closed under it: ``CancelledError``, which nobody asked for."""

    def __init__(self) -> None:
        self.num_reads = 0

    async def read(self) -> object:
        self.num_reads += 1
        if self.num_reads == 1:
            return net_pb2.RelayEvent(reserved=True)
        raise asyncio.CancelledError

    def cancel(self) -> None:
        pass


class _ReservingConnection:
    peer_id = "relay"
    metadata = ()
    target = DialTarget("127.0.0.1:1")

    def __init__(self) -> None:
        self.call = _ClosedUnderCall()

    def unary_stream(self, method: str, response_type: object) -> object:
        return lambda request, metadata: self.call


class _ReservingPool(_DroppingPool):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.connection_ = _ReservingConnection()

    async def connection(self, peer_id: str) -> _ReservingConnection:
        return self.connection_

    async def failed(self, connection: object, exc: object, method: str) -> None:
        raise AssertionError("no call failed")


def test_a_reservation_whose_connection_is_closed_under_it_does_not_blame_the_relay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The pool dropped the reservation's connection (a redial replaced it): its call ended in
    ``CancelledError``, which fell through to "the relay answered no heartbeat and sent
    nothing for 15 s", and the healthy relay was not tried again for 10 s."""

    async def main() -> None:
        pool = _ReservingPool(FakeClock())

        async def heartbeat(peer_id: str, timeout_s: float) -> None:
            await asyncio.Event().wait()  # (answered on time: it never gets to answer)

        reservations = _watchdog(pool, heartbeat)
        with caplog.at_level(logging.INFO, logger="gossamer.net.tunnels"):
            await asyncio.wait_for(reservations._hold("relay"), 5)
        assert pool.connection_.call.num_reads == 2
        assert "relay" not in reservations._failed_at, "the relay was blamed"
        assert pool.dropped == []
        assert "closed under it" in caplog.text, caplog.text
        assert "answered no heartbeat" not in caplog.text

    asyncio.run(main())


class _GivingUpPool(_DroppingPool):
    """What the dialer's watch reads of a pool when it gives a relay up: no peer goes through
    it but the relay itself."""

    peer_ids: tuple[str, ...] = ()

    def get(self, peer_id: str) -> None:
        return None


class _NoRecords:
    def records(self) -> list[object]:
        return []

    def __contains__(self, peer_id: object) -> bool:
        return False


def test_a_relay_the_dialer_gave_up_is_not_reserved_again_at_once() -> None:
    """The dialer's watch gave a relay up (it answered nothing) and dropped the connection:
    the reservation with it ended "closed under it (the relay is not to blame)" and the relay
    was dialled again at once, 5 s spent on a hung relay in the review. Now the reservations
    see the dialer's give-up and wait the usual back-off."""

    async def main() -> None:
        pool = _GivingUpPool(FakeClock())
        dialer = RelayDialer(
            pool,  # type: ignore[arg-type]
            _NoRecords(),  # type: ignore[arg-type]
            "self",
            NetCounters(),
        )
        reservations = RelayReservations(
            pool,  # type: ignore[arg-type]
            _NoRecords(),  # type: ignore[arg-type]
            NodeConfig(),
            pool.clock,
            "self",
            local_address=lambda: "127.0.0.1:1",
            needs_relay=lambda: True,
            on_change=_nothing,
            bootstrap_peers=lambda: ["relay"],
        )
        assert reservations.candidates() == ["relay"]
        await dialer._give_up("relay", object(), 15.0)  # type: ignore[arg-type]
        assert pool.dropped == ["relay"]
        assert reservations.candidates() == [], "the relay given up was reserved again at once"
        pool.clock.advance(_RETRY_RELAY_AFTER_S)
        assert reservations.candidates() == ["relay"]

    asyncio.run(main())
