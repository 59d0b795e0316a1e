"""The settings of a :class:`~gossamer.train.swarm_averager.SwarmAverager`'s rounds."""

from __future__ import annotations

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
    """Deadline of the all-reduce."""
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
        """The longest a member's averaging may run on after its round closed: the grace, a
        torch.distributed attempt (up to half the round's timeout, twice) where this peer may
        use one, the all-reduce over p2p, and 10 s for the node's work around them."""
        torch_s = self.round_timeout_s if self.backend != "p2p" and self.codec == "none" else 0.0
        return self.propagation_grace_s + torch_s + self.round_timeout_s + 10.0

    @property
    def entry_ttl_s(self) -> float:
        """How long a round's entries and closes live: past any formation of the round (with
        the fixed 300 s before, a join window over about 300 s let the first entries expire
        while late peers still read them, and members agreed on different lists)."""
        return max(_ENTRY_TTL_S, self.formation_bound_s + 60.0)
