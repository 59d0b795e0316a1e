"""`gossamer bench` stopped by SIGTERM cleans up as on Ctrl-C (real processes, really signalled)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def test_a_loop_bench_stopped_by_sigterm_leaves_no_temporary_folder(tmp_path: Path) -> None:
    # (SIGTERM ended the driver at once: no `finally` ran, the run's folder stayed)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "gossamer.cli", "bench", "loop", "--steps", "100000",
         "--model.num-layers", "1", "--model.width", "32", "--model.num-heads", "2",
         "--model.context", "32", "--train.batch-size", "2"],
        env=dict(os.environ, TMPDIR=str(scratch)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not list(scratch.glob("gossamer-bench-*")):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "the bench never started its run"
            time.sleep(0.05)  # polling a condition with a deadline
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode != 0
    assert list(scratch.glob("gossamer-bench-*")) == [], err


def test_a_diloco_bench_stopped_by_ctrl_c_stops_its_peers_and_exits_130(tmp_path: Path) -> None:
    # (the peers' threads were left training: `terminate called without an active exception`,
    # SIGABRT, exit 134)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "gossamer.cli", "-v", "bench", "diloco", "--peers", "2",
         "--steps", "100000", "--inner-steps", "5", "--no-int8", "--no-overlap"],
        env=dict(os.environ, TMPDIR=str(scratch)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    lines: list[str] = []
    assert process.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(process.stderr or ()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any(" step 20/" in line for line in lines):  # the peers are training
            assert process.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "the bench never started training"
            time.sleep(0.05)  # polling a condition with a deadline
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        reader.join(timeout=10)
        process.stderr.close()
    err = "".join(lines)
    assert "terminate called" not in err
    assert process.returncode == 130, err
    assert "stopped" in lines[-1], err
    assert list(scratch.glob("gossamer-bench-*")) == [], err
