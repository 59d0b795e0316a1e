"""`gossamer bench obs`: what metrics and tracing cost the training loop.

The same run is measured with observability off (no metrics, spans disabled) and full (Prometheus
metrics updated every step, spans recorded and appended to a file), taking turns in one process so
that drift in the machine's speed hits both alike. The figure is the ratio of their throughputs,
with the spread of the pairs' ratios beside it (a busy machine shows as pairs that disagree).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from gossamer.bench.loop import PairSpread, gossamer_tokens_per_s, pair_spread
from gossamer.core.config import RunConfig
from gossamer.core.errors import ConfigError
from gossamer.data import load_corpus

__all__ = ["ObsOverheadResult", "run_obs_overhead_bench"]

Mode = Literal["off", "full"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ObsOverheadResult:
    """Throughput with observability off and full, per repeat."""

    off_tokens_per_s: list[float]
    """No metrics, spans disabled."""
    full_tokens_per_s: list[float]
    """Metrics updated every step, spans recorded to memory and a file."""
    steps: int
    """Measured steps per repeat."""
    threads: int
    """Torch intra-op threads."""

    @property
    def spread(self) -> PairSpread:
        """Each repeat's ratio of the 'full' throughput over the 'off' one, and their range."""
        return pair_spread(
            [f / o for f, o in zip(self.full_tokens_per_s, self.off_tokens_per_s, strict=True)]
        )

    @property
    def overhead_percent(self) -> float:
        """How much slower full observability is, in percent of the 'off' throughput.

        The median over repeats of each back-to-back pair's ratio, which resists changing load
        as long as it changes slowly (:attr:`spread` says when it did not).
        """
        return (1.0 - statistics.median(self.spread.ratios)) * 100.0

    def to_json(self) -> dict[str, Any]:
        """Fields for ``--json``."""
        return {
            "off_tokens_per_s": statistics.median(self.off_tokens_per_s),
            "full_tokens_per_s": statistics.median(self.full_tokens_per_s),
            "overhead_percent": self.overhead_percent,
            "off_runs": self.off_tokens_per_s,
            "full_runs": self.full_tokens_per_s,
            "steps": self.steps,
            "threads": self.threads,
            **self.spread.to_json(),
        }


def run_obs_overhead_bench(
    *, config: RunConfig | None = None, steps: int = 60, warmup_steps: int = 5, repeats: int = 3
) -> ObsOverheadResult:
    """Measure both settings ``repeats`` times each, alternating which goes first.

    Raises:
        ConfigError: no warm-up step (the first measured step needs a start mark).
    """
    if warmup_steps < 1:
        raise ConfigError(f"--warmup-steps must be at least 1, got {warmup_steps}")
    base = config or RunConfig()
    base = replace(
        base,
        train=replace(
            base.train,
            max_steps=warmup_steps + steps,
            max_seconds=0.0,
            eval_every=0,
            eval_batches=1,
        ),
    )
    corpus = load_corpus(base.data)
    off: list[float] = []
    full: list[float] = []
    for repeat in range(repeats):
        modes: tuple[Mode, Mode] = ("off", "full") if repeat % 2 == 0 else ("full", "off")
        for mode in modes:
            rate = gossamer_tokens_per_s(base, corpus, warmup_steps, steps, observability=mode)
            (off if mode == "off" else full).append(rate)
    return ObsOverheadResult(
        off_tokens_per_s=off, full_tokens_per_s=full, steps=steps, threads=torch.get_num_threads()
    )
