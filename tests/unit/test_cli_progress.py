"""The terminal progress listener: what a run's lines say."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from gossamer.cli.progress import RichProgressListener


def test_a_checkpoint_written_again_at_its_step_says_why() -> None:
    # A swarm peer's run saved its last step, then its last round replaced the weights and the
    # step was saved again: two identical "step 8: checkpoint" lines.
    out = io.StringIO()
    listener = RichProgressListener(Console(file=out, width=200))
    for step in (4, 8, 8):
        listener.on_checkpoint(step=step, path=Path(f"ckpt/step-{step:09d}"))
    lines = out.getvalue().splitlines()
    assert lines[:2] == [
        "step 4: checkpoint ckpt/step-000000004",
        "step 8: checkpoint ckpt/step-000000008",
    ]
    assert lines[2].startswith("step 8: checkpoint ckpt/step-000000008 (written again:")
    assert "replaced the weights" in lines[2]


def test_a_run_with_nothing_left_to_train_says_so() -> None:
    out = io.StringIO()
    listener = RichProgressListener(Console(file=out, width=200))
    listener.on_start(start_step=10, max_steps=4, num_parameters=20_000)
    assert "already at step 10 of train.max_steps 4: nothing to train" in out.getvalue()
    assert "10 -> 4" not in out.getvalue()
