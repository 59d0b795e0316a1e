"""`gossamer train` as a one-peer DiLoCo swarm, run again once finished and extended."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gossamer.store import CheckpointStore

GOSSAMER = [sys.executable, "-m", "gossamer.cli"]

FLAGS = [
    *("--data.source", "text", "--data.path", "corpus.txt"),
    *("--model.num-layers", "1", "--model.width", "32", "--model.num-heads", "2"),
    *("--model.context", "32", "--train.batch-size", "4", "--train.eval-batches", "2"),
    *("--train.eval-every", "0", "--optim.warmup-steps", "2", "--checkpoint.every-steps", "0"),
    *("--swarm.strategy", "diloco", "--swarm.inner-steps", "4", "--swarm.join-window-s", "0.2"),
    *("--checkpoint.directory", "ck"),
]


def _train(cwd: Path, max_steps: int) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOSSAMER_")}
    env["COLUMNS"] = "200"
    return subprocess.run(
        [*GOSSAMER, "train", *FLAGS, "--train.max-steps", str(max_steps)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def _outer_step(cwd: Path) -> tuple[int, int]:
    state = CheckpointStore(cwd / "ck").load_latest()
    assert state is not None
    return state.step, int(state.meta["strategy"]["state"]["outer_step"])


def test_a_finished_diloco_peer_run_again_trains_nothing_and_extended_says_what_changed(
    tmp_path: Path,
) -> None:
    # 10 steps, H = 4, training while the group forms (the swarm's default): run again, the
    # finished peer ran another empty last round each time, bumped its outer step and wrote
    # its final checkpoint again.
    (tmp_path / "corpus.txt").write_text(
        "def square(x):\n    return x * x\n\n" * 300 + "import os\nprint(os.getcwd())\n" * 100
    )
    first = _train(tmp_path, 10)
    assert first.returncode == 0, first.stderr
    assert _outer_step(tmp_path) == (10, 3)
    manifest = next((tmp_path / "ck").glob("step-*/manifest.json"))
    written = manifest.read_bytes()
    again = _train(tmp_path, 10)
    assert again.returncode == 0, again.stderr
    assert "nothing to train" in again.stdout + again.stderr
    assert _outer_step(tmp_path) == (10, 3)
    assert manifest.read_bytes() == written
    assert "WARNING" not in again.stderr, again.stderr
    # Extended, the learning rate warms up again: the resume says so (it said nothing).
    extended = _train(tmp_path, 14)
    assert extended.returncode == 0, extended.stderr
    assert "train.max_steps 10 -> 14" in extended.stderr
    assert "the learning rate goes from" in extended.stderr
    assert _outer_step(tmp_path) == (14, 5)
