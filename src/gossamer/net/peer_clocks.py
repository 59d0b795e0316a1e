"""How far other peers' wall clocks are from this one's, and whether this one is the odd one out.

Every ping and heartbeat answer carries the responder's wall clock. With the round trip measured
on this peer's monotonic clock, the responder's offset is ``remote - (sent + rtt / 2)``, wrong by
at most half the round trip (the answer was stamped somewhere inside it). Of a peer's recent
samples the one with the shortest round trip counts: queueing only ever lengthens a round trip,
so the shortest bounds the error best (NTP's clock filter does the same).

Coordination that compares wall times stamped on different machines (round formation's join
windows and closes) needs clocks that agree to within its grace. :meth:`PeerClocks.correction_s`
moves this peer onto the clock a strict majority of a set of peers (itself counted) share, when
it is not on it itself: a peer whose clock is seconds off then stamps as the others do. A peer on
the majority's clock never moves, so swarms whose clocks agree behave as if nothing were
measured, and two peers can never move onto different clocks (two strict majorities of one set
share a member). Without a strict majority (two peers that disagree, a swarm split in halves)
nobody moves: there is no telling which clock is right.
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
    """One answer's measure of a peer's clock."""

    offset_s: float
    """The peer's wall clock minus this peer's, at the moment of the answer."""
    round_trip_s: float
    """The round trip; the offset is wrong by at most half of it."""
    taken_at_s: float
    """This peer's monotonic clock when the answer came."""


_MIN_PRUNE_AT = 64
"""Peers sampled before stale ones are first looked for."""


class PeerClocks:
    """The offsets of other peers' wall clocks, from ping and heartbeat round trips.

    Args:
        num_samples: samples kept per peer; of those fresh enough, the one with the shortest
            round trip counts.
        max_age_s: samples older than this do not count (a peer that stopped answering, or
            whose clock was stepped, is not judged on what it said long ago).
    """

    def __init__(self, num_samples: int = 8, max_age_s: float = 10.0) -> None:
        if num_samples < 1 or not max_age_s > 0:
            raise ValueError(
                f"num_samples and max_age_s must be positive, got {num_samples} and {max_age_s}"
            )
        self._num_samples = num_samples
        self._max_age_s = max_age_s
        self._samples: dict[str, deque[ClockSample]] = {}
        self._prune_at = _MIN_PRUNE_AT

    def note(
        self,
        peer_id: str,
        *,
        sent_wall_s: float,
        round_trip_s: float,
        remote_wall_s: float,
        now_s: float,
    ) -> None:
        """Record an answer of ``peer_id``, stamped ``remote_wall_s`` by it, to a request sent
        at ``sent_wall_s`` (this peer's wall clock) that came ``round_trip_s`` later, at
        ``now_s`` (this peer's monotonic clock).

        Answers without a usable stamp (0 from a peer that sends none, not finite, out of any
        clock's range) are ignored.
        """
        if not (0.0 < remote_wall_s < _MAX_SANE_WALL_S and math.isfinite(sent_wall_s)):
            return
        if not (math.isfinite(round_trip_s) and round_trip_s >= 0.0):
            return
        sample = ClockSample(remote_wall_s - (sent_wall_s + round_trip_s / 2), round_trip_s, now_s)
        self._samples.setdefault(peer_id, deque(maxlen=self._num_samples)).append(sample)
        if len(self._samples) >= self._prune_at:
            # Peers whose every sample is stale count no more: forgotten (kept, one deque per
            # peer ever pinged piled up over a run with churn). Amortized: at each doubling.
            for stale in [
                p
                for p, kept in self._samples.items()
                if now_s - kept[-1].taken_at_s > self._max_age_s
            ]:
                del self._samples[stale]
            self._prune_at = max(_MIN_PRUNE_AT, 2 * len(self._samples))

    @property
    def num_peers(self) -> int:
        """Peers with samples kept."""
        return len(self._samples)

    def best(self, peer_id: str, *, now_s: float) -> ClockSample | None:
        """The fresh sample of ``peer_id`` with the shortest round trip, or None."""
        fresh = [
            s for s in self._samples.get(peer_id, ()) if now_s - s.taken_at_s <= self._max_age_s
        ]
        return min(fresh, key=lambda s: s.round_trip_s) if fresh else None

    def offset_s(self, peer_id: str, *, now_s: float) -> float | None:
        """``peer_id``'s wall clock minus this peer's, or None without a fresh sample."""
        best = self.best(peer_id, now_s=now_s)
        return best.offset_s if best is not None else None

    def correction_s(self, peers: Iterable[str], *, now_s: float, agree_s: float) -> float:
        """What to add to this peer's wall clock to be on the clock most of ``peers`` share.

        Clocks within ``agree_s`` of each other count as one. The answer is 0 unless a strict
        majority of ``peers`` with a fresh sample and this peer together lie within ``agree_s``
        of their median and this peer is not among them; then it is that median. See the module
        docstring for why peers that move never disagree.
        """
        offsets = sorted(
            offset
            for offset in (self.offset_s(p, now_s=now_s) for p in set(peers))
            if offset is not None
        )
        if len(offsets) < 2:  # with one other, no majority excludes this peer
            return 0.0
        middle = statistics.median(offsets)
        if abs(middle) <= agree_s:
            return 0.0  # on the clock the others share (or they share none without this one)
        near = sum(1 for offset in offsets if abs(offset - middle) <= agree_s)
        return middle if near > (len(offsets) + 1) / 2 else 0.0
