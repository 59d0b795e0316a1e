"""An in-memory :class:`~gossamer.obs.dashboard.source.SwarmSource` that tests script."""

from __future__ import annotations

import dataclasses

from gossamer.core.clock import Clock, SystemClock
from gossamer.core.errors import GossamerError
from gossamer.obs.dashboard.source import PeerSample, PeerView, SwarmSnapshot

__all__ = ["FakeSwarmSource"]


class FakeSwarmSource:
    """A swarm whose peers and metrics the test sets directly.

    Args:
        clock: stamps snapshots and last-seen times.
    """

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self._peers: dict[str, PeerView] = {}
        self._samples: dict[str, PeerSample] = {}
        self.fail_with: GossamerError | None = None
        """Raised by the next snapshots while set (a source that cannot see the swarm)."""
        self.num_snapshots = 0
        """Snapshots taken so far."""

    def set_peer(
        self,
        peer_id: str,
        *,
        address: str = "",
        alive: bool = True,
        reachability: str | None = None,
        sample: PeerSample | None = None,
    ) -> None:
        """Add or change a peer (alive peers are seen now); replace its sample if given.

        Unset address and reachability keep their previous values (a new peer: none, direct).
        """
        previous = self._peers.get(peer_id)
        seen = self._clock.wall() if alive else (previous.last_seen_wall_s if previous else None)
        self._peers[peer_id] = PeerView(
            peer_id=peer_id,
            address=address or (previous.address if previous else ""),
            status="alive" if alive else "gone",
            reachability=reachability  # type: ignore[arg-type]  # PeerView checks it
            or (previous.reachability if previous else "direct"),
            last_seen_wall_s=seen,
        )
        if sample is not None:
            self._samples[peer_id] = sample

    def update_sample(self, peer_id: str, **values: object) -> None:
        """Change some metric values of a peer."""
        current = self._samples.get(peer_id, PeerSample())
        self._samples[peer_id] = dataclasses.replace(current, **values)  # type: ignore[arg-type]

    def remove_peer(self, peer_id: str) -> None:
        """Forget a peer entirely (as if the source stopped listing it)."""
        self._peers.pop(peer_id, None)
        self._samples.pop(peer_id, None)

    async def snapshot(self) -> SwarmSnapshot:
        self.num_snapshots += 1
        if self.fail_with is not None:
            raise self.fail_with
        now = self._clock.wall()
        peers = tuple(
            dataclasses.replace(p, last_seen_wall_s=now) if p.status == "alive" else p
            for p in self._peers.values()
        )
        return SwarmSnapshot(taken_at_wall_s=now, peers=peers, samples=dict(self._samples))
