"""How far other peers' wall clocks are from this one's, and a time base peers agree on.

Every heartbeat answer carries the responder's wall clock. With the round trip measured on this
peer's monotonic clock, the responder's offset is ``remote - (sent + rtt / 2)``, wrong by at most
half the round trip (the answer was stamped somewhere inside it). Of a peer's latest samples the
one with the shortest round trip counts: queueing delays only ever lengthen a round trip, so the
shortest one bounds the error best (NTP's clock filter does the same).

Coordination that compares wall times stamped on different machines (round formation's join
windows and closes) uses :meth:`PeerClocks.swarm_offset_s`: the median of the offsets of a set
of peers, this one's own (0) included. When every peer takes the median over the same set, they
arrive at the same time base, the median of their clocks: with clocks ``c_j``, peer ``i`` measures
``c_j - c_i`` and ends at ``c_i + median_j(c_j - c_i) = median_j(c_j)``. One clock far off (or a
peer that lies about its own) moves that median by at most one rank.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ClockSample", "PeerClocks"]

_MAX_SANE_WALL_S = 1e11
"""Wall times beyond this (year 5138) are not a clock's reading."""


@dataclass(frozen=True, slots=True)
class ClockSample:
    """One heartbeat's measure of a peer's clock."""

    offset_s: float
    """The peer's wall clock minus this peer's, at the moment of the answer."""
    round_trip_s: float
    """The heartbeat's round trip; the offset is wrong by at most half of it."""


class PeerClocks:
    """The offsets of other peers' wall clocks, from heartbeat round trips.

    Args:
        num_samples: samples kept per peer; the one with the shortest round trip counts.
    """

    def __init__(self, num_samples: int = 8) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        self._num_samples = num_samples
        self._samples: dict[str, deque[ClockSample]] = {}

    def note(
        self, peer_id: str, *, sent_wall_s: float, round_trip_s: float, remote_wall_s: float
    ) -> None:
        """Record a heartbeat to ``peer_id`` sent at ``sent_wall_s`` (this peer's clock) whose
        answer, stamped ``remote_wall_s`` by the peer, came ``round_trip_s`` later.

        Answers without a usable stamp (0 from a peer that does not send one, not finite, out of
        any clock's range) are ignored.
        """
        if not (0.0 < remote_wall_s < _MAX_SANE_WALL_S and math.isfinite(sent_wall_s)):
            return
        if not (math.isfinite(round_trip_s) and round_trip_s >= 0.0):
            return
        sample = ClockSample(remote_wall_s - (sent_wall_s + round_trip_s / 2), round_trip_s)
        self._samples.setdefault(peer_id, deque(maxlen=self._num_samples)).append(sample)

    def best(self, peer_id: str) -> ClockSample | None:
        """The sample of ``peer_id`` with the shortest round trip, or None without one."""
        samples = self._samples.get(peer_id)
        return min(samples, key=lambda s: s.round_trip_s) if samples else None

    def offset_s(self, peer_id: str) -> float | None:
        """``peer_id``'s wall clock minus this peer's, or None before any sample."""
        best = self.best(peer_id)
        return best.offset_s if best is not None else None

    def swarm_offset_s(self, peers: Iterable[str]) -> float:
        """What to add to this peer's wall clock for the median clock of ``peers`` and itself.

        Peers without a sample yet are left out. See the module docstring for why every peer
        taking the median over the same set arrives at the same time.
        """
        offsets = [0.0]
        for peer in peers:
            offset = self.offset_s(peer)
            if offset is not None:
                offsets.append(offset)
        return statistics.median(offsets)
