"""A checkpoint writer SIGKILLed at random moments never leaves a torn or lost checkpoint."""

from __future__ import annotations

import os
import queue
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from gossamer.store import CheckpointState, CheckpointStore

_WRITER = Path(__file__).with_name("checkpoint_writer.py")
_NUM_FLOATS = 8 * 2**20  # ~36 MiB a checkpoint: 16 MiB + 4 MiB bf16 + 16 MiB
_NUM_KILLS = 5
_KEEP_LAST = 2
_DEADLINE_S = 50.0


def _start_writer(directory: Path, first_step: int, stderr_path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with stderr_path.open("a") as stderr:
        return subprocess.Popen(
            [sys.executable, str(_WRITER), str(directory), str(first_step), str(_NUM_FLOATS)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )


def _pump_lines(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line.strip())
    lines.put(None)


def _check_contents(state: CheckpointState, *, last_reported: int) -> None:
    step = state.step
    # A save that returned is visible; at most one more may have completed unreported.
    assert last_reported <= step <= last_reported + 1, (step, last_reported)
    assert state.meta["step"] == step
    if step == last_reported and step % 3 == 0:
        assert state.meta["version"] == 2  # both saves of this step returned
    else:
        assert state.meta["version"] in ((1, 2) if step % 3 == 0 else (1,))
    model, optimizer = state.tensors["model"], state.tensors["optimizer"]
    assert set(state.tensors) == {"model", "optimizer"}
    assert model["embedding"].shape == (_NUM_FLOATS // 2,)
    assert bool((model["embedding"] == step).all())
    assert model["head"].dtype == torch.bfloat16
    assert bool((model["head"] == step).all())
    assert int(model["step"]) == step
    assert bool((optimizer["exp_avg"] == step).all())


def test_writer_killed_at_random_moments_leaves_only_whole_checkpoints(tmp_path: Path) -> None:
    seed = random.SystemRandom().randrange(2**32)  # independent of tests that seed `random`
    rng = random.Random(seed)
    directory = tmp_path / "checkpoints"
    stderr_path = tmp_path / "writer-stderr.txt"
    store = CheckpointStore(directory, keep_last=_KEEP_LAST)
    started = time.monotonic()
    deadline = started + _DEADLINE_S
    next_step = 1
    num_killed_mid_write = 0

    for kill in range(_NUM_KILLS):
        proc = _start_writer(directory, next_step, stderr_path)
        lines: queue.Queue[str | None] = queue.Queue()
        pump = threading.Thread(target=_pump_lines, args=(proc, lines), daemon=True)
        pump.start()
        try:
            # Let it finish one save, so each round makes progress; then kill it at a random
            # moment of the saves that follow.
            first = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert first is not None, f"writer exited early: {stderr_path.read_text()}"
            time.sleep(rng.uniform(0.0, 1.5))  # a random moment, not a synchronisation
        finally:
            proc.kill()
            proc.wait(timeout=10)
            pump.join(timeout=10)
            assert proc.stdout is not None
            proc.stdout.close()
        reported = [int(first)]
        while (line := lines.get(timeout=10)) is not None:
            reported.append(int(line))

        leftovers = [p.name for p in directory.iterdir() if p.name.startswith((".tmp", ".old"))]
        num_killed_mid_write += bool(leftovers)
        state = store.load_latest()
        context = f"seed {seed}, kill {kill}, reported {reported}, leftovers {leftovers}"
        assert state is not None, context
        assert store.skipped == [], context
        _check_contents(state, last_reported=reported[-1])
        assert all(info.valid for info in store.list()), context
        assert len(list(directory.glob("step-*"))) <= _KEEP_LAST + 1, context
        next_step = state.step + 1

    # The next save clears what the killed writers left and prunes to keep_last.
    store.save(CheckpointState(step=next_step, tensors={}, meta={}))
    names = sorted(p.name for p in directory.iterdir())
    assert not [name for name in names if name.startswith((".tmp", ".old"))], names
    assert len([name for name in names if name.startswith("step-")]) == _KEEP_LAST, names
    assert time.monotonic() - started < _DEADLINE_S + 10
    print(f"seed {seed}: {num_killed_mid_write} of {_NUM_KILLS} kills landed mid-write")
