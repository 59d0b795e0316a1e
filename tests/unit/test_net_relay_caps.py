"""A relay's caps on the tunnels it carries, on the servicer alone (no sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gossamer.core.clock import FakeClock
from gossamer.core.errors import DeadlineExceededError, PeerUnavailableError
from gossamer.net.config import NodeConfig, RelayConfig
from gossamer.net.counters import NetCounters
from gossamer.net.relay import (
    MAX_TUNNELS_PER_HOST_TO_TARGET,
    MAX_TUNNELS_PER_TARGET,
    BytePipe,
    RelayServicer,
    TokenBucket,
    _Reservation,
)
from gossamer.net.tunnels import RelayReservations


def test_peers_at_one_host_hold_at_most_a_quarter_of_a_relay_s_tunnels() -> None:
    """Identities cost nothing: 64 of them on one connection, 16 tunnels each, took all 1,024
    places, and every other peer's tunnel was refused."""
    clock = FakeClock()
    relay = RelayServicer(RelayConfig(), NetCounters(), clock, lambda: True, accept_timeout_s=5)

    async def accept_all(reservation: _Reservation) -> None:
        while True:
            event = await reservation.events.get()
            relay._pending[event.tunnel_id].accepted.set()

    async def main() -> None:
        targets = [f"target{i}" for i in range(20)]  # 16 tunnels from one host to each
        acceptors = []
        for target in targets:
            reservation = _Reservation(target, TokenBucket(1e9, 1e9, clock))
            relay._reservations[target] = reservation
            acceptors.append(asyncio.create_task(accept_all(reservation)))
        try:
            opened = []
            for i in range(256):  # 16 dialers of 16 tunnels, all at one host
                dialer, target = f"dialer{i // 16}", targets[i % len(targets)]
                opened.append(await relay._open_tunnel(dialer, target, host="10.0.0.1"))
            with pytest.raises(PeerUnavailableError, match="peers at this host"):
                await relay._open_tunnel("dialer99", targets[0], host="10.0.0.1")
            other = await relay._open_tunnel("dialer99", targets[0], host="10.0.0.2")
            opened[0].close()  # a place at the first host comes back
            opened.append(await relay._open_tunnel("dialer98", targets[1], host="10.0.0.1"))
            for tunnel in [*opened, other]:
                tunnel.close()
            assert relay._num_open_from_host == {}
            assert relay._num_open_from.total() == 0
        finally:
            for task in acceptors:
                task.cancel()
            await asyncio.gather(*acceptors, return_exceptions=True)

    asyncio.run(main())


def test_peers_at_one_host_hold_at_most_a_quarter_of_one_target_s_tunnels() -> None:
    """Four throwaway identities on one host, 16 tunnels each, filled a target's 64 places: no
    other peer reached it through this relay."""
    clock = FakeClock()
    relay = RelayServicer(RelayConfig(), NetCounters(), clock, lambda: True, accept_timeout_s=5)

    async def accept_all(reservation: _Reservation) -> None:
        while True:
            event = await reservation.events.get()
            relay._pending[event.tunnel_id].accepted.set()

    async def main() -> None:
        reservation = _Reservation("target", TokenBucket(1e9, 1e9, clock))
        relay._reservations["target"] = reservation
        acceptor = asyncio.create_task(accept_all(reservation))
        opened = []
        try:
            for i in range(MAX_TUNNELS_PER_HOST_TO_TARGET):  # four identities at one host
                dialer = f"dialer{i % 4}"
                opened.append(await relay._open_tunnel(dialer, "target", host="10.0.0.1"))
            with pytest.raises(PeerUnavailableError, match="open to target here already"):
                await relay._open_tunnel("dialer9", "target", host="10.0.0.1")
            # other hosts fill the target's share; the relay's own node is not held to it
            for i in range(MAX_TUNNELS_PER_TARGET - MAX_TUNNELS_PER_HOST_TO_TARGET - 1):
                host = f"10.0.1.{i // MAX_TUNNELS_PER_HOST_TO_TARGET}"
                opened.append(await relay._open_tunnel(f"other{i}", "target", host=host))
            opened.append(await relay._open_tunnel("me", "target", local=True))
            opened[0].close()  # a place of the first host comes back
            opened.append(await relay._open_tunnel("dialer9", "target", host="10.0.0.1"))
            for tunnel in opened:
                tunnel.close()
            assert relay._num_open_from_host_to == {}
        finally:
            acceptor.cancel()
            await asyncio.gather(acceptor, return_exceptions=True)

    asyncio.run(main())


async def _turns(count: int = 5) -> None:
    """Let the other ready tasks run (no time passes)."""
    for _ in range(count):
        await asyncio.sleep(0)


def test_a_pipe_queues_one_frame_of_the_largest_size() -> None:
    """A relay's pipes held 16 frames each: 64 tunnels whose ends sent and never read held
    512 MiB."""

    async def main() -> None:
        pipe = BytePipe(3)
        assert await pipe.put(b"xx")
        too_big = asyncio.ensure_future(pipe.put(b"yy"))  # the pipe holds 3 bytes
        await _turns()
        assert not too_big.done()
        assert await pipe.get() == b"xx"
        assert await too_big
        assert await BytePipe(3).put(b"wxyz")  # (a frame always goes into an empty pipe)
        waiting = asyncio.ensure_future(pipe.put(b"vv"))  # ("yy" is queued)
        await _turns()
        assert not waiting.done()
        pipe.discard()  # its reader is gone: the writer is let go
        assert await waiting is False

    asyncio.run(main())


class _ClockOnlyPool:
    """What the relay watchdog reads of a pool: its clock (its record of relay traffic is
    kept per pool)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock


def _watchdog(clock: FakeClock, heartbeat: Any) -> RelayReservations:
    """Reservations with only what the relay watchdog reads (a pool's clock; a directory
    unused)."""
    return RelayReservations(
        _ClockOnlyPool(clock),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        NodeConfig(keepalive_interval_s=10.0, keepalive_timeout_s=5.0),
        clock,
        "self",
        local_address=lambda: "127.0.0.1:1",
        needs_relay=lambda: True,
        on_change=_nothing,
        heartbeat=heartbeat,
    )


async def _nothing() -> None:
    pass


def test_a_relay_answering_slowly_behind_its_tunnels_data_is_kept() -> None:
    """On a busy 1 Mbit/s link a relay's answers came 3.7-4.7 s late: heartbeats of the failure
    detector's 2.5 s all missed, and a healthy relay was given up after 15 s."""

    async def main() -> None:
        clock = FakeClock()
        budgets: list[float] = []

        async def heartbeat(peer_id: str, timeout_s: float) -> None:
            budgets.append(timeout_s)
            if timeout_s < 4.5:
                clock.advance(timeout_s)
                raise DeadlineExceededError("no answer within the deadline")
            clock.advance(4.5)  # (answered, 4.5 s behind the tunnels' data)

        watch = asyncio.ensure_future(_watchdog(clock, heartbeat)._until_silent("relay", heartbeat))
        for _ in range(2000):
            if len(budgets) >= 20 or watch.done():
                break
            await asyncio.sleep(0)
        assert not watch.done(), f"given up after {len(budgets)} heartbeats: {budgets}"
        watch.cancel()

    asyncio.run(main())


def test_a_relay_that_answers_nothing_is_given_up_after_keepalive_interval_and_timeout() -> None:
    async def main() -> None:
        clock = FakeClock()

        async def heartbeat(peer_id: str, timeout_s: float) -> None:
            clock.advance(timeout_s)
            raise DeadlineExceededError("no answer")

        await asyncio.wait_for(_watchdog(clock, heartbeat)._until_silent("relay", heartbeat), 5)
        assert 15.0 <= clock.monotonic() <= 16.0

    asyncio.run(main())
