"""Child process of test_checkpoint_kill: saves sizeable checkpoints in a loop until killed.

Usage: ``python checkpoint_writer.py DIRECTORY FIRST_STEP NUM_FLOATS``. Every tensor of the
checkpoint of step ``s`` is filled with ``s``; every third step is saved twice (``meta["version"]``
1, then 2) so that replacing a checkpoint of the same step is killed too. After each save returns,
the step is printed on its own line.
"""

from __future__ import annotations

import sys

import torch

from gossamer.store import CheckpointState, CheckpointStore


def _state(step: int, num_floats: int, version: int) -> CheckpointState:
    value = float(step)
    return CheckpointState(
        step=step,
        tensors={
            "model": {
                "embedding": torch.full((num_floats // 2,), value),
                "head": torch.full((num_floats // 8,), value, dtype=torch.bfloat16),
                "step": torch.tensor(step, dtype=torch.int64),
            },
            "optimizer": {"exp_avg": torch.full((num_floats // 2,), value)},
        },
        meta={"step": step, "version": version},
    )


def main() -> None:
    directory, first_step, num_floats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    store = CheckpointStore(directory, keep_last=2)
    step = first_step
    while True:
        store.save(_state(step, num_floats, version=1))
        if step % 3 == 0:
            store.save(_state(step, num_floats, version=2))
        print(step, flush=True)
        step += 1


if __name__ == "__main__":
    main()
