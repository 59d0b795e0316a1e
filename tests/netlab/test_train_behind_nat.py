"""A training peer behind NAT averages with a reachable one through a relay (root).

Two `gossamer train` processes run DiLoCo in the lab: p0 on a public link, p1 behind NAT. p1
listens on its private address, which nobody outside its NAT can dial; it must find out by
dial-back that it cannot be reached, reserve a relay (p0, whose relay service is on by default)
and publish it, so that p0's sends of the rounds reach it. Before, training peers never asked:
p1 published its private address as reachable, and every round p0 formed with it failed on p0's
sends to it.

The peers train until both have averaged with each other, then are stopped (SIGTERM): a fixed
time budget ended them before two rounds on a busy machine (p1 spent most of 25 s starting and
taking the swarm's state while p0 trained at a seventh of its quiet speed).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from netlab_support import MakeLab

from gossamer.lab.runner import RunningProcess

_GOSSAMER = Path(sys.executable).parent / "gossamer"
_TINY = [
    "--model.num-layers", "1", "--model.num-heads", "2", "--model.width", "32",
    "--model.context", "32", "--train.batch-size", "2", "--train.eval-batches", "1",
    "--train.num-threads", "1", "--train.max-steps", "100000", "--train.max-seconds", "300",
    "--swarm.strategy", "diloco", "--swarm.inner-steps", "20",
]  # fmt: skip


def _wait_for(what: str, found: Any, timeout_s: float, processes: list[RunningProcess]) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        for process in processes:
            assert process.poll() is None, f"a peer exited early ({process.poll()}) before {what}"
        time.sleep(0.1)  # polling files the peers write, under a deadline
    raise AssertionError(f"{what} within {timeout_s} s")


def _status(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):  # (not written yet, or being replaced)
        return {}


def _logs(tmp_path: Path) -> dict[str, str]:
    return {n: (tmp_path / f"{n}.log").read_text()[-4000:] for n in ("p0", "p1")}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_training_peer_behind_nat_averages_through_a_relay(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def square(x):\n    return x * x\n\n" * 2000)
    processes: list[RunningProcess] = []
    with make_lab(num_peers=2, num_nat=1, rate_bps=1_000_000_000) as lab:
        try:

            def spawn(name: str, *extra: str) -> None:
                argv = [
                    str(_GOSSAMER), "train", *_TINY,
                    "--data.source", "text", "--data.path", str(corpus),
                    "--checkpoint.directory", str(tmp_path / name),
                    "--swarm.listen", f"{lab.peer(name).address}:0",
                    "--swarm.status-file", str(tmp_path / f"{name}.status.json"),
                    *extra,
                ]  # fmt: skip
                with (tmp_path / f"{name}.log").open("w") as log:
                    processes.append(
                        subprocess.Popen(lab.command_in(name, argv), stdout=log, stderr=log)
                    )

            spawn("p0")
            address = _wait_for(
                "p0's address",
                lambda: re.search(r"peer address: (\S+)", (tmp_path / "p0.log").read_text()),
                60,
                processes,
            ).group(1)
            spawn("p1", "--bootstrap", address)
            statuses_path = {n: tmp_path / f"{n}.status.json" for n in ("p0", "p1")}

            def averaged_together() -> bool:
                # p1 averaged with p0: rounds with another member (a round alone counts under
                # no backend), and bytes both ways. (Before: none, and p1 waited out join
                # windows for 60 steps.)
                for path in statuses_path.values():
                    status = _status(path)
                    if (status.get("rounds_by_backend") or {}).get("p2p", 0) < 2:
                        return False
                    if not status.get("bytes_received"):
                        return False
                return True

            try:
                _wait_for("two rounds of p0 and p1 together", averaged_together, 120, processes)
            except AssertionError as exc:
                statuses = {n: _status(path) for n, path in statuses_path.items()}
                raise AssertionError(f"{exc}: {statuses}, {_logs(tmp_path)}") from None
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                process.wait(timeout=60)
        finally:
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    try:
                        process.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait(timeout=10)
    logs = _logs(tmp_path)
    for name in ("p0", "p1"):  # (stopped by SIGTERM: each checkpoints where it is and says so)
        assert processes[("p0", "p1").index(name)].returncode == 130, logs[name]
        assert _status(tmp_path / f"{name}.status.json").get("state") == "interrupted", logs[name]
