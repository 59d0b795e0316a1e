"""Who reduces what: parts sized by bandwidth, chunks, and the flat layout of a tensor list.

Every member of a group computes the same :class:`PartPlan` from the same inputs (the agreed member
list and bandwidth weights), so parts need no negotiation. A round's id hashes the group, the
round key and the tensor layout: members that disagree on any of them never mix their messages.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gossamer.comm.codecs import CodecChoice, CodecPolicy

__all__ = [
    "MAX_CHUNK_ELEMENTS",
    "MIN_CHUNK_ELEMENTS",
    "ROUND_KEY_TAG_NBYTES",
    "FlatLayout",
    "PartPlan",
    "Segment",
    "chunk_elements_for",
    "round_id_of",
    "round_key_tag",
]


@dataclass(frozen=True, slots=True)
class Segment:
    """The piece of one tensor that falls inside a flat range."""

    tensor_index: int
    """Which tensor."""
    tensor_offset: int
    """First element, counted inside the tensor."""
    flat_start: int
    """First element, counted in the flat buffer."""
    flat_end: int
    """One past the last element in the flat buffer."""


class FlatLayout:
    """A list of tensors seen as one flat float32 buffer, with a codec per tensor.

    Args:
        tensors: the tensors (their shapes and dtypes; values are not read here).
        policy: picks each tensor's codec by size.
        names: stable names for error-feedback state (default: the positions).
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        policy: CodecPolicy,
        names: Sequence[str] | None = None,
    ) -> None:
        if not tensors:
            raise ValueError("nothing to average: the tensor list is empty")
        for t in tensors:
            if not t.is_floating_point():
                raise ValueError(f"only float tensors can be averaged, got {t.dtype}")
        self.shapes = [tuple(t.shape) for t in tensors]
        self.dtypes = [t.dtype for t in tensors]
        self.numels = [t.numel() for t in tensors]
        self.names = list(names) if names is not None else [str(i) for i in range(len(tensors))]
        if len(self.names) != len(tensors):
            raise ValueError(f"{len(self.names)} names for {len(tensors)} tensors")
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        self.total = self.offsets[-1]
        self.choices: list[CodecChoice] = [policy.choose(n) for n in self.numels]

    def signature(self) -> bytes:
        """Bytes that differ whenever shapes or codecs differ."""
        parts = [
            f"{s}|{c.codec.name}|{c.block_size}"
            for s, c in zip(self.shapes, self.choices, strict=True)
        ]
        return "/".join(parts).encode()

    def segments(self, start: int, end: int) -> list[Segment]:
        """The tensor pieces that make up flat elements ``start..end``."""
        found: list[Segment] = []
        for index, (lo, hi) in enumerate(itertools.pairwise(self.offsets)):
            a, b = max(lo, start), min(hi, end)
            if a < b:
                found.append(Segment(index, a - lo, a, b))
        return found

    def fp32_nbytes(self) -> int:
        """Bytes of the whole buffer in float32."""
        return 4 * self.total


MIN_CHUNK_ELEMENTS = 1 << 19
"""Values per message of a round of up to 32 MiB: 2 MiB in float32."""
MAX_CHUNK_ELEMENTS = 1 << 20
"""Values per message of a round of 64 MiB or more: 4 MiB in float32, one bulk chunk."""


def chunk_elements_for(total: int, align: int = 1) -> int:
    """Values per message for a round of ``total`` values: a sixteenth of the tensor, at least
    :data:`MIN_CHUNK_ELEMENTS` and at most :data:`MAX_CHUNK_ELEMENTS`, a multiple of ``align``.

    A message costs per-call CPU whatever its size, so fewer, larger messages are faster where
    the CPU is the limit (loopback, 100 MB, 4 peers, alternating in one session: 0.67-0.74 s a
    round in 4 MiB messages against 0.83-0.95 s in 2 MiB ones, 2026-12-04; on 100 Mbit/s links
    the two did not differ beyond the runs' spread). But the messages in flight (a few per peer,
    on both ends) add to a peer's peak memory whatever the tensor's size: fixed 4 MiB messages
    added 3.12x a 40 MB tensor (the target is 3x). Sized by the tensor, a 40 MB round adds
    1.96x (4 peers) and 2.03-2.05x (2 peers), a 100 MB one 1.48-1.67x (docs/comm.md).
    """
    if total < 0 or align < 1:
        raise ValueError(f"total must be >= 0 and align positive, got {total} and {align}")
    wanted = min(MAX_CHUNK_ELEMENTS, max(MIN_CHUNK_ELEMENTS, total // 16))
    return max(align, wanted // align * align)


@dataclass(frozen=True, slots=True)
class PartPlan:
    """Which member reduces which flat range, and how parts are cut into chunks."""

    members: tuple[str, ...]
    """Peer ids in the agreed order."""
    bounds: tuple[int, ...]
    """Part ``i`` (owned by member ``i``) is flat elements ``bounds[i]..bounds[i+1]``."""
    chunk_elements: int
    """Most elements per chunk (one message)."""

    @classmethod
    def create(
        cls,
        members: Sequence[str],
        total: int,
        *,
        bandwidth_weights: Sequence[float] | None = None,
        chunk_elements: int = 1 << 19,
        align: int = 4096,
    ) -> PartPlan:
        """Parts sized in proportion to ``bandwidth_weights`` (equal when omitted).

        Boundaries fall on multiples of ``align`` elements; a member with weight 0 owns nothing,
        and every other one at least one block of ``align`` where there are enough of them (so
        rounding leaves no member with a small weight out of a small tensor).
        """
        if not members or len(set(members)) != len(members):
            raise ValueError("members must be a non-empty list of distinct peer ids")
        weights = list(bandwidth_weights) if bandwidth_weights is not None else [1.0] * len(members)
        if len(weights) != len(members):
            raise ValueError(f"{len(weights)} bandwidth weights for {len(members)} members")
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"bandwidth weights must be finite, >= 0, not all 0: {weights}")
        if chunk_elements < 1 or align < 1:
            raise ValueError("chunk_elements and align must be positive")
        positive = [w > 0 for w in weights]  # (before scaling: 5e-324 / 1e300 is 0)
        top = max(weights)  # scaled to at most 1: figures near the float limit would sum to inf
        weights = [w / top for w in weights]
        # Correctly rounded: Python 3.12's sum() compensates its rounding and 3.11's does not,
        # and members on either must cut the same bounds.
        total_weight = math.fsum(weights)
        blocks = total // align  # (the last part takes what is left over them too)
        owners = sum(positive)
        floor = 1 if blocks >= owners else 0
        spare = blocks - floor * owners  # shared in proportion to the weights
        bounds = [0]
        cumulative = 0.0
        floors = 0
        for w, owns in zip(weights[:-1], positive[:-1], strict=True):
            cumulative += w
            floors += floor if owns else 0
            cut = (int(spare * cumulative / total_weight) + floors) * align
            bounds.append(min(max(cut, bounds[-1]), total))
        bounds.append(total)
        # What is left over the blocks goes to the last member that owns anything: the last
        # member took it whatever its weight (a weight-0 one all of a tensor under one block).
        last = len(weights) - 1
        while not positive[last]:
            bounds[last] = total
            last -= 1
        return cls(tuple(members), tuple(bounds), chunk_elements)

    @property
    def num_parts(self) -> int:
        """One part per member."""
        return len(self.members)

    def part_range(self, part: int) -> tuple[int, int]:
        """Flat range of a part."""
        return self.bounds[part], self.bounds[part + 1]

    def chunks(self, part: int) -> list[tuple[int, int]]:
        """Flat ranges of a part's chunks, in order."""
        start, end = self.part_range(part)
        return [
            (a, min(a + self.chunk_elements, end)) for a in range(start, end, self.chunk_elements)
        ]

    def backup_of(self, part: int, failed: set[int]) -> int | None:
        """The member that reduces ``part`` when its owner failed: the next live one in order."""
        n = len(self.members)
        for step in range(1, n):
            candidate = (part + step) % n
            if candidate not in failed:
                return candidate
        return None


ROUND_KEY_TAG_NBYTES = 4
"""Leading bytes of a round id that depend on the round key alone (see :func:`round_id_of`)."""


def round_key_tag(round_key: str) -> bytes:
    """The leading bytes of the ids of every round under ``round_key`` (see :func:`round_id_of`)."""
    return hashlib.sha256(b"gossamer.comm.round-key/" + round_key.encode()).digest()[
        :ROUND_KEY_TAG_NBYTES
    ]


def round_id_of(round_key: str, plan: PartPlan, layout: FlatLayout) -> bytes:
    """16 bytes naming one round of one group over one tensor layout.

    The first :data:`ROUND_KEY_TAG_NBYTES` hash the round key alone, the rest the key, the
    members, the parts and the layout. Members that agree on the group compute the same id; a
    peer that gets a message whose id shares the key's bytes with a round of its own but not
    the rest knows that the sender formed another group under that key (see
    :class:`~gossamer.comm.transport.CommMailbox`).
    """
    key = round_key.encode()
    tag = round_key_tag(round_key)
    digest = hashlib.sha256()
    for item in (key, *(m.encode() for m in plan.members)):
        digest.update(len(item).to_bytes(8, "little") + item)
    digest.update(repr((plan.bounds, plan.chunk_elements)).encode())
    digest.update(layout.signature())
    return tag + digest.digest()[: 16 - ROUND_KEY_TAG_NBYTES]
