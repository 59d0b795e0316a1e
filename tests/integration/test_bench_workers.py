"""`gossamer bench allreduce`'s driver: a worker that dies ends the run at once, named."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gossamer.bench import allreduce as allreduce_bench
from gossamer.bench.allreduce import BenchWorkerError


def _options() -> dict[str, Any]:
    return {
        "timeout_s": 300.0,
        "budget_s": 300.0,
        "num_elements": 1024,
        "codecs": ["none"],
        "backend": "p2p",
        "chunk_elements": None,
        "bulk_chunk_bytes": 4 << 20,
        "repeats": 1,
    }


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("wrap", "said"),
    [
        (["false"], "exited with 1"),  # (false ignores the worker's command line)
        (["sh", "-c", 'kill -9 "$$"'], "was killed by SIGKILL"),
    ],
)
def test_a_worker_that_dies_ends_the_run_at_once_and_is_named(wrap: list[str], said: str) -> None:
    # Worker 0 then waits in gloo for worker 1 to its timeout: the driver waited for it first,
    # up to 600 s with no output, and blamed worker 0 in a traceback.
    placement = allreduce_bench._Placement(["127.0.0.1"] * 2, ["", ""], [[], wrap])
    started = time.monotonic()
    with pytest.raises(BenchWorkerError, match=f"worker 1 {said}"):
        allreduce_bench._run_workers(placement, _options())
    assert time.monotonic() - started < 30.0


@pytest.mark.timeout(90)
def test_a_run_past_its_time_is_stopped_and_says_so() -> None:
    placement = allreduce_bench._Placement(
        ["127.0.0.1"] * 2, ["", ""], [["sh", "-c", "exec sleep 60"]] * 2
    )
    with pytest.raises(BenchWorkerError, match="ran past its 2 s"):
        allreduce_bench._run_workers(placement, _options() | {"budget_s": 2.0})


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().split()[3]) == pid:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_run_leaves_no_worker_behind(stop: signal.Signals, tmp_path: Path) -> None:
    # SIGTERM (kill, timeout, a cancelled CI job) ended the driver and left the workers running
    # and the run's folder in place; SIGKILL leaves the driver no say: the kernel ends them.
    argv = [sys.executable, "-m", "gossamer.cli", "bench", "allreduce", "--peers", "2",
            "--size", "4MB", "--backend", "p2p", "--repeats", "1000"]  # fmt: skip
    env = dict(os.environ, TMPDIR=str(tmp_path))
    driver = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        workers: list[int] = []
        while len(workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            workers = _children(driver.pid)
        assert len(workers) == 2, "the workers did not start"
        driver.send_signal(stop)  # (as they start: any later moment is cleaned up alike)
        driver.wait(timeout=30)
        deadline = time.monotonic() + 15
        while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [w for w in workers if Path(f"/proc/{w}/stat").exists()]
        assert not [w for w in left if (Path(f"/proc/{w}/stat").read_text().split()[2]) != "Z"]
        if stop == signal.SIGTERM:
            assert list(tmp_path.iterdir()) == []  # the run's folder went with it
        else:  # the driver had no say: its folder stays, and the next run removes it
            (folder,) = tmp_path.iterdir()
            said = allreduce_bench.remove_abandoned_runs(labs=False, temp_dir=tmp_path)
            assert said == f"removed what killed benchmark runs left behind: folder {folder}"
            assert list(tmp_path.iterdir()) == []
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


class _Ended:
    def __init__(self, returncode: int) -> None:
        self.returncode = returncode


def test_of_workers_seen_ending_together_the_one_killed_is_named(tmp_path: Path) -> None:
    # Worker 1 killed and worker 0 failing on the connection it reset, seen in the same poll:
    # the lower rank was named.
    for rank in range(3):
        (tmp_path / f"worker-{rank}.log").write_text(f"output of {rank}\n")
    processes: Any = [_Ended(1), _Ended(-9), _Ended(0)]
    error = allreduce_bench._worker_failure(processes, [5.0, 5.0, 6.0], [0, 1], tmp_path, 60.0)
    assert str(error).startswith("benchmark worker 1 was killed by SIGKILL (and worker 0 with it)")
    assert "output of 1" in str(error)
