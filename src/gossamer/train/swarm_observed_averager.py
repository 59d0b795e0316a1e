"""A swarm averager whose rounds are counted in a peer's metrics.

:class:`ObservedAverager` wraps a :class:`~gossamer.train.swarm_averager.SwarmAverager` for a
swarm peer's strategy (DiLoCo or synchronous) and records every round it runs (its outcome,
bytes, group size and compression ratio) in the peer's :class:`~gossamer.obs.metrics.SwarmMetrics`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gossamer.comm.codecs import CodecPolicy
from gossamer.obs.metrics import SwarmMetrics
from gossamer.train.averaging import AverageOutcome, PendingRound
from gossamer.train.swarm_averager import SwarmAverager

__all__ = ["ObservedAverager"]


class ObservedAverager:
    """A :class:`SwarmAverager` whose rounds are counted in a peer's metrics (observation only).

    Args:
        averager: does the averaging.
        metrics: where each round is recorded.
    """

    def __init__(self, averager: SwarmAverager, metrics: SwarmMetrics) -> None:
        self.averager = averager
        self.metrics = metrics
        self._policy = CodecPolicy(codec=averager.config.codec)
        self._ratios: dict[tuple[int, ...], float] = {}

    def compression_ratio(self, tensors: Sequence[torch.Tensor]) -> float:
        """float32 bytes over the codec's encoded bytes for these tensors' sizes (cached)."""
        sizes = tuple(t.numel() for t in tensors)
        ratio = self._ratios.get(sizes)
        if ratio is None:
            encoded = 0
            for numel in sizes:
                choice = self._policy.choose(numel)
                encoded += choice.codec.encoded_nbytes(numel, choice.block_size)
            ratio = 4 * sum(sizes) / encoded if encoded else 1.0
            self._ratios = {sizes: ratio}  # one shape set per run; never grows
        return ratio

    def average(
        self, tensors: list[torch.Tensor], *, round_key: str, weight: float
    ) -> AverageOutcome:
        outcome = self.averager.average(tensors, round_key=round_key, weight=weight)
        self.record(outcome, tensors)
        return outcome

    def begin(self, round_key: str) -> PendingRound:
        """Start forming ``round_key``'s group (see :meth:`SwarmAverager.begin`)."""
        return _ObservedPendingRound(self, self.averager.begin(round_key))

    def record(self, outcome: AverageOutcome, tensors: Sequence[torch.Tensor]) -> None:
        """Count a round of ``tensors`` in the metrics."""
        if outcome.excluded:
            kind = "excluded"
        elif outcome.group_size < 2:
            kind = "alone"
        elif outcome.failed_peers or outcome.missing_peers:
            kind = "shrunk"
        else:
            kind = "complete"
        self.metrics.record_round(
            seconds=outcome.seconds,
            group_size=outcome.group_size,
            outcome=kind,
            bytes_sent=outcome.bytes_sent,
            bytes_received=outcome.bytes_received,
            compression_ratio=self.compression_ratio(tensors),
            num_dropped=len(outcome.failed_peers),
            num_missing=len(outcome.missing_peers),
            backend=outcome.backend,
        )


class _ObservedPendingRound:
    """A pending round whose outcome an :class:`ObservedAverager` counts."""

    def __init__(self, observer: ObservedAverager, pending: PendingRound) -> None:
        self._observer = observer
        self._pending = pending

    def ready(self) -> bool:
        return self._pending.ready()

    def average(self, tensors: list[torch.Tensor], *, weight: float) -> AverageOutcome:
        outcome = self._pending.average(tensors, weight=weight)
        self._observer.record(outcome, tensors)
        return outcome

    def cancel(self) -> None:
        self._pending.cancel()
