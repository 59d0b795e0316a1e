"""A relay's caps on the tunnels it carries, on the servicer alone (no sockets)."""

from __future__ import annotations

import asyncio

import pytest

from gossamer.core.clock import FakeClock
from gossamer.core.errors import PeerUnavailableError
from gossamer.net.config import RelayConfig
from gossamer.net.counters import NetCounters
from gossamer.net.relay import RelayServicer, TokenBucket, _Reservation


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
        targets = [f"target{i}" for i in range(5)]  # 64 tunnels to each at most
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
