"""The settings of a :class:`~gossamer.train.swarm_averager.SwarmAverager`'s rounds."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gossamer.train.swarm_round_records import _ENTRY_TTL_S

__all__ = ["SwarmAveragerConfig"]


@dataclass(frozen=True, kw_only=True, slots=True)
class SwarmAveragerConfig:
    """Rounds across machines."""

    run_id: str
    """Peers of the same run average together; others never."""
    codec: str = "none"
    """Codec of large tensors."""
    join_window_s: float = 30.0
    """Longest a round waits, from its first announcement, for the previous round's peers."""
    propagation_grace_s: float = 0.5
    """Extra wait before reading the members, so late announcements have spread."""
    round_timeout_s: float = 60.0
    """The shortest deadline of a round's all-reduce: each round's own follows its members'
    links (twice the ring bound of the buffer at the slowest member's published send rate,
    see :func:`~gossamer.train.swarm_round_formation.round_deadline_s`), never below this."""
    max_round_timeout_s: float = 900.0
    """The longest deadline of a round's all-reduce, whatever its members' figures say: what
    a slow link, or a member that publishes a figure far too low, can stretch a round to."""
    max_group_size: int = 16
    """Peers per group; larger rounds split into several groups."""
    poll_interval_s: float = 0.1
    """How often a peer waiting for a round's members reads the DHT again when no nudge came
    (half of it while it waits for the others' closes)."""
    clock_tolerance_s: float | None = None
    """A round entry stamped further ahead of this peer's time than this is not believed: its
    writer is neither waited for nor counted (it would come after any close). Bounds how long a
    clock set wrong (or a peer that lies) holds the others; ``join_window_s`` if None (a peer
    ahead by less holds the others as long as a join window would, and still averages)."""
    backend: str = "auto"
    """``p2p`` (comm's all-reduce over the peers' authenticated links), ``torch`` (a
    torch.distributed gloo or NCCL group of the agreed members, fp32) or ``auto``: torch where
    the codec is none and every member published a direct loopback or private address, p2p
    otherwise."""

    def __post_init__(self) -> None:
        if not self.poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be positive, got {self.poll_interval_s}")
        if self.max_group_size < 1:  # (0 divided by zero at the first round)
            raise ValueError(f"max_group_size must be at least 1, got {self.max_group_size}")
        for name in ("join_window_s", "round_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        # (finite: it is what a member's unusable figure gives a round)
        if not (
            math.isfinite(self.max_round_timeout_s)
            and self.max_round_timeout_s >= self.round_timeout_s
        ):
            raise ValueError(
                f"max_round_timeout_s ({self.max_round_timeout_s}) must be finite and at least "
                f"round_timeout_s ({self.round_timeout_s}): raise it, or lower round_timeout_s"
            )
        if not self.propagation_grace_s >= 0:
            raise ValueError(f"propagation_grace_s must be >= 0, got {self.propagation_grace_s}")
        if self.clock_tolerance_s is not None and not self.clock_tolerance_s > 0:
            raise ValueError(f"clock_tolerance_s must be positive, got {self.clock_tolerance_s}")
        if self.backend not in ("auto", "p2p", "torch"):
            raise ValueError(f"backend must be auto, p2p or torch, got {self.backend!r}")
        if self.backend == "torch" and self.codec != "none":
            raise ValueError(
                f"backend torch averages in fp32 and cannot use codec {self.codec!r}: "
                "set the codec to none, or the backend to p2p or auto"
            )

    @property
    def formation_bound_s(self) -> float:
        """The longest a round's formation can take: its join window from the first entry,
        an entry stamped up to the clock tolerance ahead that is waited for, and the grace."""
        tolerance_s = self.clock_tolerance_s or self.join_window_s
        return self.join_window_s + max(self.join_window_s, tolerance_s) + self.propagation_grace_s

    @property
    def averaging_bound_s(self) -> float:
        """The longest a member's averaging may run on after its round closed, where the
        round's own deadline is not known (it follows the members' links): see
        :meth:`averaging_bound_within_s`, with ``max_round_timeout_s``."""
        return self.averaging_bound_within_s(self.max_round_timeout_s)

    def averaging_bound_within_s(self, round_deadline_s: float) -> float:
        """The longest a member's averaging may run on after its round closed, for a round
        whose all-reduce has ``round_deadline_s`` at most: the grace, a torch.distributed
        attempt (up to half of ``round_timeout_s``, twice) where this peer may use one and the
        round's deadline is the floor (a longer one goes over p2p alone), the all-reduce over
        p2p, and 10 s for the node's work around them."""
        torch_s = (
            self.round_timeout_s
            if self.backend != "p2p"
            and self.codec == "none"
            and round_deadline_s <= self.round_timeout_s
            else 0.0
        )
        return self.propagation_grace_s + torch_s + round_deadline_s + 10.0

    @property
    def entry_ttl_s(self) -> float:
        """How long a round's entries and closes live where no round's deadline is known yet:
        :meth:`entry_ttl_within_s` of ``max_round_timeout_s``."""
        return self.entry_ttl_within_s(self.max_round_timeout_s)

    def entry_ttl_within_s(self, round_deadline_s: float) -> float:
        """How long a round's entries and closes live, for a round whose all-reduce has
        ``round_deadline_s`` at most: past any formation of the round (with the fixed 300 s
        before, a join window over about 300 s let the first entries expire while late peers
        still read them, and members agreed on different lists) and past any averaging of it
        (a peer asking whether a round failed everywhere reads its entries, and with them gone
        mid-round it waited out its whole bound), 300 s at least. The averager passes the
        longest deadline of its recent rounds, not the cap: see
        :meth:`SwarmAverager._entry_ttl_s
        <gossamer.train.swarm_averager.SwarmAverager._entry_ttl_s>`."""
        return max(
            _ENTRY_TTL_S,
            self.formation_bound_s + self.averaging_bound_within_s(round_deadline_s) + 60.0,
        )
