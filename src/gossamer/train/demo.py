"""The demo: the built-in GPT trained on the embedded corpus for a fixed time budget.

It shows the whole spine in about two minutes on two CPU cores: data, model, the loop, evaluation
before and after, a verified checkpoint, and text sampled from the trained model.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gossamer.core.config import CheckpointConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from gossamer.train.inference import load_model, sample_text
from gossamer.train.loop import Trainer
from gossamer.train.run_events import TrainingListener

__all__ = ["DemoSummary", "demo_config", "run_demo"]

DEMO_PROMPT = "def "


def demo_config(*, budget_s: float, run_dir: Path, max_steps: int = 1200) -> RunConfig:
    """The demo's run: the default small GPT on the standard-library corpus.

    Args:
        budget_s: wall-time budget for training (evaluation and checkpoints included).
        run_dir: where this demo run's checkpoints go.
        max_steps: the schedule's length; the budget usually ends the run a little earlier.
    """
    return RunConfig(
        name="demo",
        model=ModelConfig(),
        optim=OptimConfig(lr=3e-3, warmup_steps=30),
        train=TrainConfig(
            max_steps=max_steps,
            max_seconds=budget_s,
            batch_size=16,
            eval_every=max(1, max_steps // 4),
            eval_batches=8,
            log_every=50,
        ),
        checkpoint=CheckpointConfig(
            directory=str(run_dir / "checkpoints"), every_steps=max(1, max_steps // 3), resume=False
        ),
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoSummary:
    """What the demo did, as printed and as written to JSON."""

    val_loss_before: float
    val_loss_after: float
    tokens_trained: int
    tokens_per_s: float
    seconds: float
    steps: int
    num_parameters: int
    checkpoint_path: str
    sample_prompt: str
    sample: str

    def to_json(self) -> dict[str, Any]:
        """The summary as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def write_json(self, path: Path) -> None:
        """Write the summary to ``path`` (parents created)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")


def run_demo(
    *,
    budget_s: float = 100.0,
    max_steps: int = 1200,
    runs_dir: Path = Path("runs"),
    listener: TrainingListener | None = None,
    sample_tokens: int = 300,
) -> DemoSummary:
    """Train the demo run, then reload its checkpoint and sample text from it.

    Args:
        budget_s: wall-time budget for training.
        max_steps: the schedule's length.
        runs_dir: parent folder of the demo's run folder (a new one per run, never overwritten).
        listener: receives progress events.
        sample_tokens: how many bytes of text to sample at the end.
    """
    started = time.monotonic()
    run_dir = runs_dir / "demo" / time.strftime("%Y%m%d-%H%M%S")
    suffix = 0
    while run_dir.exists():
        suffix += 1
        run_dir = run_dir.with_name(f"{run_dir.name.split('.')[0]}.{suffix}")
    config = demo_config(budget_s=budget_s, run_dir=run_dir, max_steps=max_steps)
    with Trainer(config, listener=listener) as trainer:
        result = trainer.run()
    assert result.checkpoint_path is not None
    loaded = load_model(result.checkpoint_path)  # the sample comes from the verified checkpoint
    sample = sample_text(loaded.model, DEMO_PROMPT, num_tokens=sample_tokens, seed=0)
    return DemoSummary(
        val_loss_before=result.val_loss_before,
        val_loss_after=result.val_loss_after,
        tokens_trained=result.tokens_trained,
        tokens_per_s=result.tokens_per_s,
        seconds=time.monotonic() - started,
        steps=result.steps_done,
        num_parameters=result.num_parameters,
        checkpoint_path=str(result.checkpoint_path),
        sample_prompt=DEMO_PROMPT,
        sample=sample,
    )
