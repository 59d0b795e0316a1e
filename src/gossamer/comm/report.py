"""What an averaging round reports: who contributed to which part, bytes, phases, failures."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

__all__ = ["AllReduceReport", "AllReduceResult", "PartOutcome", "PartReport"]


class PartOutcome(enum.StrEnum):
    """How one part ended up on this member."""

    AVERAGED = "averaged"
    """Its owner averaged it and every chunk arrived here."""
    REASSIGNED = "reassigned"
    """Its owner failed; a backup member averaged it among the survivors instead."""
    PARTIAL = "partial"
    """Some chunks never arrived by the deadline; those keep this member's own values."""
    KEPT_LOCAL = "kept_local"
    """Nothing arrived for it by the deadline; it keeps this member's own values."""


@dataclass(slots=True)
class PartReport:
    """One part of the flat buffer."""

    index: int
    """Part index (= the index of its owner in the member list)."""
    owner: str
    """Peer id of the member it was assigned to."""
    reducer: str
    """Peer id of the member whose average this member took (the owner or its backup)."""
    num_elements: int
    """Elements in the part."""
    outcome: PartOutcome
    """How it ended up."""
    contributors: list[str] = field(default_factory=list)
    """Members whose values are in every chunk of the average."""
    partial_contributors: list[str] = field(default_factory=list)
    """Members whose values are in some chunks only (a stream broke part-way)."""


@dataclass(slots=True)
class AllReduceReport:
    """Everything a caller may want to know about one round, from one member's view."""

    round_id: str
    """Hex id of the round."""
    peer_id: str
    """The member that wrote this report."""
    members: list[str]
    """The group in its agreed order."""
    codec: str
    """The codec of large tensors."""
    in_steps: bool = False
    """Whether this member sent in pairwise steps (else to everyone at once)."""
    round_the_ring: bool = False
    """Whether its averages were to go round the ring (see :mod:`gossamer.comm.steps`)."""
    ring_left: str | None = None
    """Why its averages stopped going round the ring and went directly: ``stalled`` (one
    gained no holder for ``AllReduceConfig.ring_stall_s``), ``result deadline`` or ``member
    failed``; None while they went round it (or were never to)."""
    parts: list[PartReport] = field(default_factory=list)
    """One entry per part."""
    failed: dict[str, str] = field(default_factory=dict)
    """Members seen failing, with why (never this member itself)."""
    own_non_finite: str | None = None
    """Set where this member's own values of a part it reduced were NaN or infinite: they
    were left out of that part's average (the others' finite values were averaged, and every
    member got the same result), with which chunk. Not a failure of a member: no one was
    dropped."""
    bytes_sent: int = 0
    """Message bytes this member sent (frame headers and piece headers included; the
    header-only words that steer a round are not)."""
    bytes_received: int = 0
    """Message bytes this member received (counted as :attr:`bytes_sent` is)."""
    fp32_bytes_sent: int = 0
    """What the values sent would have taken as plain float32."""
    reduce_scatter_s: float = 0.0
    """Start until this member's contributions were delivered and its own part was averaged."""
    all_gather_s: float = 0.0
    """From there until every part had arrived (the phases overlap chunk by chunk)."""
    total_s: float = 0.0
    """The whole round."""
    encode_s: float = 0.0
    """Thread time spent encoding."""
    decode_s: float = 0.0
    """Thread time spent decoding and reducing."""
    deadline_hit: bool = False
    """Whether the round ended at its deadline rather than complete."""
    excluded: str | None = None
    """Why the other members dropped this one from the round (a send to it failed, so they
    declared it failed), or None. Such a member keeps only the averages it received from the
    others' reducers: the parts it reduced itself are ``kept_local``, as the others took a
    backup's average of them."""
    send_bytes_per_s: float | None = None
    """This member's send throughput measured on the round's traffic (see
    :mod:`gossamer.comm.bandwidth`); None when too little was sent to tell."""

    @property
    def compression_ratio(self) -> float:
        """float32 bytes over wire bytes sent (1.0 with no codec, a little less with headers)."""
        return self.fp32_bytes_sent / self.bytes_sent if self.bytes_sent else 1.0

    def outcome_counts(self) -> dict[str, int]:
        """How many parts ended each way."""
        counts: dict[str, int] = {}
        for part in self.parts:
            counts[part.outcome.value] = counts.get(part.outcome.value, 0) + 1
        return counts


@dataclass(slots=True)
class AllReduceResult:
    """The averaged tensors and the report of the round that made them."""

    tensors: list[torch.Tensor]
    """The averages, with the shapes and dtypes of the inputs."""
    report: AllReduceReport
    """How the round went."""
