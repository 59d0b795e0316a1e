"""The dashboard's memory: bounded curves per peer, traffic rates per link, and events.

:class:`SwarmHistory` is fed one :class:`~gossamer.obs.dashboard.source.SwarmSnapshot` at a
time and derives what a single snapshot cannot say: curves over time, bytes per second between
peers (from counter differences), and events (a peer joined, went, came back, resynced). All of
it is bounded: each curve is a ring, the event list is a ring, peers gone for long are forgotten
and so are links no longer reported, and there are at most ``num_links`` links (a peer that named
5,000 new remotes at each scrape grew them, the memory and ``/api/state`` without end: 48 MB
within a minute). :meth:`SwarmHistory.state` is what ``/api/state`` serves.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gossamer.obs.dashboard.source import PeerSample, PeerView, SwarmSnapshot

__all__ = ["HistoryConfig", "SwarmEvent", "SwarmHistory", "swarm_goodput_ratio"]


@dataclass(frozen=True, kw_only=True, slots=True)
class HistoryConfig:
    """How much the dashboard remembers."""

    num_points: int = 600
    """Points kept per curve and peer (10 minutes at one snapshot a second)."""
    num_events: int = 200
    """Events kept."""
    forget_after_s: float = 600.0
    """A peer gone for this long is dropped from the view."""
    num_links: int = 2048
    """Links kept (each way between two peers is one): past it, links with an end that is not a
    listed peer go first, then the ones not reported now, the oldest, the smallest."""

    def __post_init__(self) -> None:
        if self.num_points < 2:
            raise ValueError(f"HistoryConfig.num_points: need at least 2, not {self.num_points}")
        if self.num_events < 1:
            raise ValueError(f"HistoryConfig.num_events: need at least 1, not {self.num_events}")
        if self.num_links < 1:
            raise ValueError(f"HistoryConfig.num_links: need at least 1, not {self.num_links}")
        if not (math.isfinite(self.forget_after_s) and self.forget_after_s > 0):
            raise ValueError(
                f"HistoryConfig.forget_after_s: must be positive, not {self.forget_after_s}"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class SwarmEvent:
    """Something that happened to a peer."""

    wall_s: float
    """When the dashboard noticed it."""
    kind: str
    """``joined``, ``gone``, ``came back`` or ``resynced``."""
    peer_id: str
    """The peer it happened to."""
    detail: str = ""
    """A short human-readable addition."""


@dataclass(slots=True)
class _Link:
    bytes_total: float
    bytes_per_s: float | None = None
    updated_wall_s: float = 0.0


@dataclass(slots=True)
class _PeerHistory:
    view: PeerView
    first_seen_wall_s: float
    gone_since_wall_s: float | None = None
    ever_alive: bool = False
    sample: PeerSample = field(default_factory=PeerSample)
    times: deque[float] = field(default_factory=deque)
    loss: deque[float | None] = field(default_factory=deque)
    tokens_per_second: deque[float | None] = field(default_factory=deque)


def _json_number(value: float | None, digits: int = 6) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


def swarm_goodput_ratio(samples: Iterable[PeerSample]) -> float | None:
    """The swarm's goodput ratio from its training peers' samples, as ``swarm_goodput`` defines
    it (docs/observability.md): their kept tokens over what they could have computed in their
    wall time (each one's wall seconds times its compute-only rate), so a fast peer counts for
    more than a slow one. A peer that exports its ratio only (not the three figures it is made
    of) counts as one of the others' mean capacity, or, where none has them, all are averaged;
    None when no peer says anything.
    """
    kept = capacity = 0.0
    num_weighed = 0
    ratios_only: list[float] = []
    for sample in samples:
        tokens, wall_s, rate = (
            sample.goodput_kept_tokens,
            sample.goodput_wall_s,
            sample.compute_tokens_per_second,
        )
        if tokens is not None and wall_s is not None and rate is not None:
            peer_capacity = wall_s * rate
            if math.isfinite(peer_capacity) and peer_capacity > 0 and math.isfinite(tokens):
                kept += tokens
                capacity += peer_capacity
                num_weighed += 1
            continue  # (one that has not computed yet says nothing)
        if sample.goodput_ratio is not None and math.isfinite(sample.goodput_ratio):
            ratios_only.append(sample.goodput_ratio)
    if not num_weighed:
        return sum(ratios_only) / len(ratios_only) if ratios_only else None
    mean_capacity = capacity / num_weighed
    kept += sum(ratios_only) * mean_capacity
    capacity += len(ratios_only) * mean_capacity
    ratio = kept / capacity
    return ratio if math.isfinite(ratio) else None


class SwarmHistory:
    """Everything the page shows, accumulated over snapshots.

    Args:
        config: how much to remember.
    """

    def __init__(self, config: HistoryConfig | None = None) -> None:
        self.config = config or HistoryConfig()
        self._peers: dict[str, _PeerHistory] = {}
        self._links: dict[tuple[str, str], _Link] = {}
        self._events: deque[SwarmEvent] = deque(maxlen=self.config.num_events)
        self._last_wall_s: float | None = None
        self.num_snapshots = 0
        """Snapshots recorded."""

    @property
    def events(self) -> list[SwarmEvent]:
        """Events, oldest first."""
        return list(self._events)

    def record(self, snapshot: SwarmSnapshot) -> None:
        """Take in one snapshot: update peers, curves, link rates, and derive events."""
        now = snapshot.taken_at_wall_s
        self.num_snapshots += 1
        listed = {view.peer_id: view for view in snapshot.peers}
        for peer_id, view in listed.items():
            self._record_peer(view, snapshot.samples.get(peer_id), now)
        for peer_id, peer in list(self._peers.items()):
            if peer_id in listed:
                continue
            if not peer.ever_alive:
                del self._peers[peer_id]  # an address that never answered, now known by its id
            elif peer.view.status == "alive":
                self._mark_gone(peer, now, "no longer listed")
        for peer_id, peer in list(self._peers.items()):
            if peer.gone_since_wall_s is not None and (
                now - peer.gone_since_wall_s >= self.config.forget_after_s
            ):
                del self._peers[peer_id]
        self._record_links(snapshot, now)
        self._last_wall_s = now

    def _record_peer(self, view: PeerView, sample: PeerSample | None, now: float) -> None:
        peer = self._peers.get(view.peer_id)
        if peer is None:
            peer = _PeerHistory(view=view, first_seen_wall_s=now)
            self._peers[view.peer_id] = peer
            if view.status == "alive":
                self._event(now, "joined", view.peer_id, view.address)
            else:
                peer.gone_since_wall_s = now
        elif view.status == "alive" and peer.view.status == "gone":
            self._event(now, "came back" if peer.ever_alive else "joined", view.peer_id)
            peer.gone_since_wall_s = None
        elif view.status == "gone" and peer.view.status == "alive":
            self._mark_gone(peer, now)
        peer.view = view
        if view.status == "alive":
            peer.ever_alive = True
        if sample is None:
            return
        previous_resyncs = peer.sample.num_resyncs
        if (
            sample.num_resyncs is not None
            and previous_resyncs is not None
            and sample.num_resyncs > previous_resyncs
        ):
            # (figures from a peer's endpoint: any float, so the difference may be infinite)
            delta = sample.num_resyncs - previous_resyncs
            count = int(delta) if delta < 1e6 else None
            detail = "many times" if count is None else (f"{count}x" if count > 1 else "")
            self._event(now, "resynced", view.peer_id, detail)
        changed = sample != peer.sample or not peer.times
        peer.sample = sample
        if view.status == "alive" and changed:
            peer.times.append(now)
            peer.loss.append(sample.loss)
            peer.tokens_per_second.append(sample.tokens_per_second)
            while len(peer.times) > self.config.num_points:
                peer.times.popleft()
                peer.loss.popleft()
                peer.tokens_per_second.popleft()

    def _mark_gone(self, peer: _PeerHistory, now: float, detail: str = "") -> None:
        view = peer.view
        peer.view = PeerView(
            peer_id=view.peer_id,
            address=view.address,
            status="gone",
            reachability=view.reachability,
            last_seen_wall_s=view.last_seen_wall_s,
            metrics_url=view.metrics_url,
            problem=view.problem,
        )
        peer.gone_since_wall_s = now
        self._event(now, "gone", view.peer_id, detail)

    def _event(self, now: float, kind: str, peer_id: str, detail: str = "") -> None:
        self._events.append(SwarmEvent(wall_s=now, kind=kind, peer_id=peer_id, detail=detail))

    def _record_links(self, snapshot: SwarmSnapshot, now: float) -> None:
        # Each peer reports its own side; sent by A to B is the best figure for A -> B, and
        # received by B from A stands in where A does not report.
        totals: dict[tuple[str, str], float] = {}
        for peer_id, sample in snapshot.samples.items():
            for remote, num_bytes in sample.bytes_received.items():
                totals[(remote, peer_id)] = num_bytes
        for peer_id, sample in snapshot.samples.items():
            for remote, num_bytes in sample.bytes_sent.items():
                totals[(peer_id, remote)] = num_bytes
        for key, total in totals.items():
            link = self._links.get(key)
            if link is None:
                self._links[key] = _Link(bytes_total=total, updated_wall_s=now)
                continue
            elapsed = now - link.updated_wall_s
            if elapsed > 0:
                # A counter that went down was reset (the peer restarted): no rate this time.
                delta = total - link.bytes_total
                link.bytes_per_s = delta / elapsed if delta >= 0 else None
            link.bytes_total = total
            link.updated_wall_s = now
        for key, link in list(self._links.items()):
            if key[0] not in self._peers and key[1] not in self._peers:
                del self._links[key]
            elif key not in totals:
                link.bytes_per_s = None  # no longer reported: its last rate is not the rate now
                if now - link.updated_wall_s >= self.config.forget_after_s:
                    # (a peer's remotes come and go: kept, they grew the table and the page
                    # by a link a second for as long as the dashboard ran)
                    del self._links[key]
        if len(self._links) > self.config.num_links:
            self._drop_links_past_the_cap(totals)

    def _drop_links_past_the_cap(self, reported: dict[tuple[str, str], float]) -> None:
        def worth(item: tuple[tuple[str, str], _Link]) -> tuple[int, bool, float, float]:
            (source, target), link = item
            num_known_ends = (source in self._peers) + (target in self._peers)
            return (num_known_ends, item[0] in reported, link.updated_wall_s, link.bytes_total)

        kept = sorted(self._links.items(), key=worth, reverse=True)[: self.config.num_links]
        self._links = dict(kept)

    def state(self) -> dict[str, Any]:
        """The JSON-ready view the page draws (peers, links, curves, swarm totals, events)."""
        now = self._last_wall_s
        peers: list[dict[str, Any]] = []
        curves = {}
        total_tokens_per_s = 0.0
        trainers: list[PeerSample] = []
        for peer_id, peer in sorted(self._peers.items()):
            view, sample = peer.view, peer.sample
            alive = view.status == "alive"
            seen = view.last_seen_wall_s
            if alive:
                total_tokens_per_s += sample.tokens_per_second or 0.0
                # Only peers that train: a bootstrap or relay peer (or a trainer before its
                # first step) exports a goodput of 0, and pulled the swarm's figure down.
                if (sample.tokens_total or 0) > 0:
                    trainers.append(sample)
            peers.append(
                {
                    "peer_id": peer_id,
                    "address": view.address,
                    "status": view.status,
                    "reachability": view.reachability,
                    "last_seen_s_ago": (
                        _json_number(max(0.0, now - seen), 1) if now and seen else None
                    ),
                    "metrics_url": view.metrics_url,
                    "step": _json_number(sample.step),
                    "loss": _json_number(sample.loss),
                    "validation_loss": _json_number(sample.validation_loss),
                    "tokens_per_second": _json_number(sample.tokens_per_second if alive else 0.0),
                    "tokens_total": _json_number(sample.tokens_total),
                    "goodput_ratio": _json_number(sample.goodput_ratio),
                    "problem": view.problem,
                    "phase_seconds": {
                        k: _json_number(v) for k, v in sorted(sample.phase_seconds.items())
                    },
                }
            )
            curves[peer_id] = {
                "t": list(peer.times),
                "loss": [_json_number(v) for v in peer.loss],
                "tokens_per_second": [_json_number(v) for v in peer.tokens_per_second],
            }
        num_alive = sum(1 for p in peers if p["status"] == "alive")
        links = [
            {
                "source": source,
                "target": target,
                "bytes_total": _json_number(link.bytes_total, 0),
                "bytes_per_s": _json_number(link.bytes_per_s, 1),
            }
            for (source, target), link in sorted(self._links.items())
        ]
        return {
            "now_wall_s": now,
            "num_snapshots": self.num_snapshots,
            "swarm": {
                "num_alive": num_alive,
                "num_gone": len(peers) - num_alive,
                "tokens_per_second": _json_number(total_tokens_per_s),
                "goodput_ratio": _json_number(swarm_goodput_ratio(trainers)),
            },
            "peers": peers,
            "links": links,
            "curves": curves,
            "events": [
                {"wall_s": e.wall_s, "kind": e.kind, "peer_id": e.peer_id, "detail": e.detail}
                for e in reversed(self._events)
            ],
        }
