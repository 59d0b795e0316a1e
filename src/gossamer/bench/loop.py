"""`gossamer bench loop`: Gossamer's one-peer loop against a plain hand-written PyTorch loop.

Both train the same model (same config, same seed, same initial weights) on the same token array,
with the same optimizer settings, batch shape and gradient clipping, in one process, taking turns
so that drift in the machine's speed hits both alike. Each side's throughput is measured over the
steps after its warm-up, between the end of one step and the end of another, so evaluation,
checkpoints and start-up are outside both measurements. The result is the ratio of Gossamer's
tokens per second to the plain loop's, with the spread of the pairs' ratios beside it: on a busy
machine the pairs disagree, and one median then hides that the figure means little.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from gossamer.core.config import CheckpointConfig, RunConfig, TrainConfig
from gossamer.core.errors import ConfigError
from gossamer.data import Corpus, load_corpus
from gossamer.models import GPT
from gossamer.obs.metrics import PeerMetrics
from gossamer.obs.trace import SpanRecorder
from gossamer.train import ProgressEvent, Trainer, TrainingListener
from gossamer.train.optim import learning_rate_at

__all__ = [
    "NOISY_SPREAD",
    "LoopBenchResult",
    "PairSpread",
    "gossamer_tokens_per_s",
    "pair_spread",
    "run_loop_bench",
]

NOISY_SPREAD = 2.0
"""Largest over smallest pair ratio above which a result is flagged as noisy. Both sides of a pair
run the same work back to back, so on a quiet machine their ratios agree within a few percent; a
factor of 2 between pairs means the load changed under the measurement (0.109 to 20.6 was seen
on a shared machine), and their median is then no figure to quote."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PairSpread:
    """How far apart the back-to-back pairs' ratios are."""

    ratios: list[float]
    """Each pair's ratio, in the order measured."""
    smallest: float
    """The smallest pair ratio."""
    largest: float
    """The largest pair ratio."""

    @property
    def noisy(self) -> bool:
        """True when the largest ratio is more than :data:`NOISY_SPREAD` times the smallest."""
        return self.largest > NOISY_SPREAD * self.smallest

    def to_json(self) -> dict[str, Any]:
        """Fields for ``--json``: the ratios, their range, and whether the range flags noise."""
        return {
            "pair_ratios": self.ratios,
            "pair_ratio_min": self.smallest,
            "pair_ratio_max": self.largest,
            "noisy": self.noisy,
        }


def pair_spread(ratios: Sequence[float]) -> PairSpread:
    """The spread of back-to-back pairs' ratios (at least one).

    Raises:
        ValueError: no ratio, or one that is not positive (a throughput is never zero).
    """
    if not ratios or min(ratios) <= 0:
        raise ValueError(f"pair ratios must be positive and at least one, got {list(ratios)}")
    return PairSpread(ratios=list(ratios), smallest=min(ratios), largest=max(ratios))


@dataclass(frozen=True, kw_only=True, slots=True)
class LoopBenchResult:
    """Throughput of both loops, per repeat, and their ratio."""

    gossamer_tokens_per_s: list[float]
    """Gossamer's loop, one figure per repeat."""
    plain_tokens_per_s: list[float]
    """The plain PyTorch loop, one figure per repeat."""
    steps: int
    """Measured steps per repeat (after warm-up)."""
    tokens_per_step: int
    """Batch size x sequence length."""
    threads: int
    """Torch intra-op threads."""

    @property
    def spread(self) -> PairSpread:
        """Each repeat's ratio of Gossamer's throughput over the plain loop's, and their range."""
        return pair_spread(
            [
                g / p
                for g, p in zip(self.gossamer_tokens_per_s, self.plain_tokens_per_s, strict=True)
            ]
        )

    @property
    def ratio(self) -> float:
        """Median over repeats of Gossamer's throughput over the plain loop's (1.0 = equal).

        Each repeat measures both loops back to back, so the ratio of a pair sees the same load
        on the machine; the median of those ratios resists load that comes and goes, as long as
        it comes and goes slowly (:attr:`spread` says when it did not).
        """
        return statistics.median(self.spread.ratios)

    def to_json(self) -> dict[str, Any]:
        """Fields for ``--json``."""
        return {
            "gossamer_tokens_per_s": statistics.median(self.gossamer_tokens_per_s),
            "plain_tokens_per_s": statistics.median(self.plain_tokens_per_s),
            "ratio": self.ratio,
            "slowdown_percent": (1.0 - self.ratio) * 100.0,
            "gossamer_runs": self.gossamer_tokens_per_s,
            "plain_runs": self.plain_tokens_per_s,
            "steps": self.steps,
            "tokens_per_step": self.tokens_per_step,
            "threads": self.threads,
            **self.spread.to_json(),
        }


class _StepTimer(TrainingListener):
    """Records the time at the end of the warm-up step and of the last step."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.marks: dict[int, float] = {}

    def on_step(self, event: ProgressEvent) -> None:
        self.marks[event.step] = time.perf_counter()


def gossamer_tokens_per_s(
    config: RunConfig,
    corpus: Corpus,
    warmup: int,
    steps: int,
    *,
    observability: Literal["off", "default", "full"] = "default",
) -> float:
    """Throughput of Gossamer's loop over ``steps`` steps after ``warmup``.

    Args:
        config: the run; its checkpoint folder is replaced by a temporary one.
        corpus: the data, loaded once for every measurement.
        warmup: unmeasured steps first.
        steps: measured steps.
        observability: ``default`` as :class:`Trainer` runs when given nothing (spans kept in
            memory, no metrics); ``full`` with Prometheus metrics and spans appended to a file
            (as ``gossamer train --metrics-port --trace`` runs); ``off`` with neither.
    """
    with tempfile.TemporaryDirectory(prefix="gossamer-bench-") as tmp:
        run_config = replace(
            config,
            # No checkpoint inside the measured steps: the plain loop writes none.
            checkpoint=CheckpointConfig(
                directory=str(Path(tmp) / "ckpt"), resume=False, every_steps=0
            ),
        )
        timer = _StepTimer(warmup)
        metrics = PeerMetrics() if observability == "full" else None
        spans = SpanRecorder(
            peer="bench",
            path=Path(tmp) / "spans.jsonl" if observability == "full" else None,
            enabled=observability != "off",
        )
        with Trainer(
            run_config, corpus=corpus, listener=timer, metrics=metrics, spans=spans
        ) as trainer:
            trainer.run()
        spans.close()
    elapsed = timer.marks[warmup + steps] - timer.marks[warmup]
    micro_batches = steps * config.train.grad_accum_steps
    return micro_batches * config.train.batch_size * config.model.context / elapsed


def _plain_tokens_per_s(config: RunConfig, corpus: Corpus, warmup: int, steps: int) -> float:
    """What a user would write by hand: random windows, AdamW, clipping, the same schedule."""
    torch.manual_seed(config.train.seed)
    model = GPT(config.model)
    optim = config.optim
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
    )
    tokens = corpus.train.tokens
    seq_len, batch_size = config.model.context, config.train.batch_size
    rng = np.random.default_rng(config.train.seed)
    model.train()
    started = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config=optim, max_steps=config.train.max_steps)
        starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
        window = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(window)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        loss.backward()  # type: ignore[no-untyped-call]
        loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * batch_size * seq_len / (time.perf_counter() - started)


def _check_measurable(config: RunConfig, warmup_steps: int) -> None:
    """Refuse settings the measurement cannot honour.

    Raises:
        ConfigError: no warm-up step (the first measured step needs a start mark), or gradient
            accumulation (the plain loop takes one micro-batch per step).
    """
    if warmup_steps < 1:
        raise ConfigError(f"--warmup-steps must be at least 1, got {warmup_steps}")
    if config.train.grad_accum_steps != 1:
        raise ConfigError(
            "the loop benchmarks take one micro-batch per step on both sides: drop "
            f"--train.grad-accum-steps (got {config.train.grad_accum_steps})"
        )


def run_loop_bench(
    *, config: RunConfig | None = None, steps: int = 60, warmup_steps: int = 5, repeats: int = 3
) -> LoopBenchResult:
    """Measure both loops ``repeats`` times each, alternating which goes first.

    Args:
        config: model, data and optimizer settings; the default run config if None.
        steps: measured steps per repeat.
        warmup_steps: unmeasured steps before them.
        repeats: measurements per side.
    """
    base = config or RunConfig()
    _check_measurable(base, warmup_steps)
    total = warmup_steps + steps
    base = replace(
        base,
        train=replace(base.train, max_steps=total, max_seconds=0.0, eval_every=0, eval_batches=1),
    )
    assert isinstance(base.train, TrainConfig)
    corpus = load_corpus(base.data)
    gossamer: list[float] = []
    plain: list[float] = []
    for repeat in range(repeats):
        if repeat % 2 == 0:
            gossamer.append(gossamer_tokens_per_s(base, corpus, warmup_steps, steps))
            plain.append(_plain_tokens_per_s(base, corpus, warmup_steps, steps))
        else:
            plain.append(_plain_tokens_per_s(base, corpus, warmup_steps, steps))
            gossamer.append(gossamer_tokens_per_s(base, corpus, warmup_steps, steps))
    return LoopBenchResult(
        gossamer_tokens_per_s=gossamer,
        plain_tokens_per_s=plain,
        steps=steps,
        tokens_per_step=base.train.batch_size * base.model.context,
        threads=torch.get_num_threads(),
    )
