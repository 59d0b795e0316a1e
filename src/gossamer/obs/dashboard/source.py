"""What the dashboard shows, and the seam it gets it through: :class:`SwarmSource`.

A source takes a :class:`SwarmSnapshot` of the swarm on demand: the peers it knows (alive or gone,
how they are reached, when they were last seen, where their metrics are) and the latest metric
values of each. The web app keeps the history; a source only says what is true now. Sources:
:class:`~gossamer.obs.dashboard.scrape.ScrapeSwarmSource` (a list of ``/metrics`` URLs),
``gossamer.net.swarm_view`` (peers found through the DHT) and
:class:`~gossamer.obs.dashboard.fake.FakeSwarmSource` (in memory, for tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

__all__ = [
    "PeerSample",
    "PeerStatus",
    "PeerView",
    "Reachability",
    "SwarmSnapshot",
    "SwarmSource",
]

PeerStatus = Literal["alive", "gone"]
Reachability = Literal["direct", "relayed", "unknown"]


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerView:
    """One peer as the source sees it now."""

    peer_id: str
    """The peer's id (or its metrics address where the id is not known)."""
    address: str
    """Where it is reached (``host:port``), or an empty string."""
    status: PeerStatus
    """Whether it answered within the source's failure-detection time."""
    reachability: Reachability = "unknown"
    """Whether others reach it directly or through a relay."""
    last_seen_wall_s: float | None = None
    """Wall time of its last sign of life; None if it never answered."""
    metrics_url: str | None = None
    """Its Prometheus endpoint, if it has one."""
    problem: str | None = None
    """Why its metrics could not be read at the last try, in part or at all (a page cut at
    its line limit, one not in the exposition format, no answer); None when read whole."""

    def __post_init__(self) -> None:
        if not self.peer_id:
            raise ValueError("PeerView.peer_id: must not be empty")
        if self.status not in ("alive", "gone"):
            raise ValueError(f"PeerView.status: must be 'alive' or 'gone', not {self.status!r}")
        if self.reachability not in ("direct", "relayed", "unknown"):
            raise ValueError(
                "PeerView.reachability: must be 'direct', 'relayed' or 'unknown', "
                f"not {self.reachability!r}"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerSample:
    """The metric values of one peer at one moment; None where the peer does not export it."""

    step: float | None = None
    """Optimizer steps taken (``gossamer_train_step``)."""
    loss: float | None = None
    """Training loss of the last step (``gossamer_train_loss``)."""
    validation_loss: float | None = None
    """Validation loss at the last evaluation (``gossamer_validation_loss``)."""
    tokens_total: float | None = None
    """Training tokens processed (``gossamer_train_tokens_total``)."""
    tokens_per_second: float | None = None
    """Training throughput since the peer's run started, over its training time
    (``gossamer_train_tokens_per_second``)."""
    goodput_ratio: float | None = None
    """Kept tokens per wall second over the compute-only rate (``gossamer_goodput_ratio``)."""
    goodput_kept_tokens: float | None = None
    """Tokens of steps whose result was kept (``gossamer_goodput_kept_tokens``)."""
    goodput_wall_s: float | None = None
    """Wall seconds goodput is measured over (``gossamer_goodput_wall_seconds``)."""
    compute_tokens_per_second: float | None = None
    """The compute-only rate: tokens per second of compute
    (``gossamer_compute_tokens_per_second``)."""
    num_resyncs: float | None = None
    """Times the peer resynced its state (``gossamer_resyncs_total``)."""
    phase_seconds: Mapping[str, float] = field(default_factory=dict)
    """Seconds per phase (``gossamer_time_seconds_total{phase}``)."""
    bytes_sent: Mapping[str, float] = field(default_factory=dict)
    """Bytes sent, by remote peer id (``gossamer_net_sent_bytes_total{peer}``)."""
    bytes_received: Mapping[str, float] = field(default_factory=dict)
    """Bytes received, by remote peer id (``gossamer_net_received_bytes_total{peer}``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SwarmSnapshot:
    """The swarm as one source saw it at one moment."""

    taken_at_wall_s: float
    """Wall time of the snapshot."""
    peers: tuple[PeerView, ...]
    """Every peer the source knows, alive or gone."""
    samples: Mapping[str, PeerSample] = field(default_factory=dict)
    """Latest metric values by peer id (only peers that have metrics)."""
    problem: str | None = None
    """Why part of the swarm could not be seen this time (no bootstrap peer answered, say):
    shown on the page as a failed snapshot is; None when nothing was in the way."""

    def __post_init__(self) -> None:
        ids = [p.peer_id for p in self.peers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"SwarmSnapshot.peers: peer ids must be unique, got {ids}")
        unknown = set(self.samples) - set(ids)
        if unknown:
            raise ValueError(f"SwarmSnapshot.samples: samples of unlisted peers {sorted(unknown)}")


class SwarmSource(Protocol):
    """Where the dashboard learns the state of the swarm."""

    async def snapshot(self) -> SwarmSnapshot:
        """The swarm now. Must return within the source's own deadlines; may raise
        :class:`~gossamer.core.errors.GossamerError` when the swarm cannot be seen at all."""
        ...
