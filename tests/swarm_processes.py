"""`gossamer train` swarm peers as real processes, for the fault tests.

Each peer trains a tiny GPT on a small text corpus with DiLoCo (H = 5), writes its status to
``ROOT/NAME.json``, its summary to ``ROOT/NAME.summary.json`` and its log to ``ROOT/NAME.log``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["SwarmProcesses"]

_LAUNCHER = Path(__file__).with_name("swarm_peer_launcher.py")


class SwarmProcesses:
    """Peer processes of one run, their status files and logs.

    Args:
        root: a fresh folder for the corpus, checkpoints, status files and logs.
        run_name: the run all peers join.
        extra_args: config flags every peer gets (steps, checkpoints, metrics port, ...).
    """

    def __init__(self, root: Path, *, run_name: str, extra_args: Sequence[str] = ()) -> None:
        self.root = root
        self.run_name = run_name
        self.extra_args = list(extra_args)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._prepared: dict[str, Path] = {}
        """Peers whose processes wait for their go file (see :meth:`prepare`)."""
        self._logs: list[Any] = []
        corpus = root / "corpus.txt"
        corpus.write_text("def area(r):\n    return 3.14 * r * r\n" * 400 + "import math\n" * 300)

    def prepare(self, name: str) -> None:
        """Start peer ``name``'s process now, its imports under way, to train once
        :meth:`start` names it: a process started only then may take tens of seconds to import
        torch (a cold file cache), and a run can end meanwhile."""
        go = self.root / f"{name}.go"
        self._open(name, [sys.executable, str(_LAUNCHER), str(go), *self._arguments(name)])
        self._prepared[name] = go

    def start(self, name: str, bootstrap: str | None = None) -> None:
        """Start peer ``name``, joining through ``bootstrap`` if given (at once where it was
        prepared)."""
        go = self._prepared.pop(name, None)
        if go is not None:
            written = go.with_suffix(".go.tmp")
            written.write_text(bootstrap or "")
            written.replace(go)  # whole, never half-written
            return
        command = [sys.executable, "-m", "gossamer.cli", *self._arguments(name)]
        if bootstrap:
            command += ["--bootstrap", bootstrap]
        self._open(name, command)

    def _arguments(self, name: str) -> list[str]:
        return [
            "--verbose", "train",
            "--name", self.run_name,
            "--model.num-layers", "1", "--model.num-heads", "2",
            "--model.width", "32", "--model.context", "32",
            "--data.source", "text", "--data.path", str(self.root / "corpus.txt"),
            "--train.eval-every", "0", "--train.num-threads", "1",
            "--swarm.strategy", "diloco", "--swarm.inner-steps", "5",
            "--swarm.join-window-s", "8",
            "--swarm.status-file", str(self.root / f"{name}.json"),
            "--checkpoint.directory", str(self.root / name),
            "--summary-json", str(self.root / f"{name}.summary.json"),
            *self.extra_args,
        ]  # fmt: skip

    def _open(self, name: str, command: list[str]) -> None:
        log = (self.root / f"{name}.log").open("ab")
        self._logs.append(log)
        self.processes[name] = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )

    def status(self, name: str) -> dict[str, Any]:
        """The peer's last status, or {} before it wrote one."""
        try:
            status: dict[str, Any] = json.loads((self.root / f"{name}.json").read_text())
        except (OSError, ValueError):
            return {}
        return status

    def wait_for(self, condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
        """Poll ``condition`` until it is true; at the deadline, fail with the logs."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.1)  # polling interval of a condition with a deadline
        logs = {
            n: (self.root / f"{n}.log").read_text(errors="replace")[-2000:] for n in self.processes
        }
        raise AssertionError(f"{what} within {timeout_s} s; logs: {logs}")

    def log_excerpt(self, name: str, *, last: int = 40) -> str:
        """The peer's last ``last`` log lines about failures: warnings, failed members and
        rounds that took over a second (for failure messages)."""
        try:
            lines = (self.root / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        slow_round = re.compile(r" round \S+: \d+ peers, .* (\d+\.\d+) s$")

        def about_failures(line: str) -> bool:
            if " WARNING " in line or " failed" in line:
                return True
            match = slow_round.search(line)
            return match is not None and float(match.group(1)) > 1.0

        return "\n".join([line for line in lines if about_failures(line)][-last:])

    def address(self, name: str) -> str:
        """The peer's PEER_ID@HOST:PORT once it listens."""
        return str(self.wait_for(lambda: self.status(name).get("address"), 60, f"{name} listening"))

    def kill(self, name: str) -> None:
        """SIGKILL the peer and reap it."""
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait(timeout=10)

    def stop(self) -> None:
        """Kill whatever still runs and close the logs."""
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        for log in self._logs:
            log.close()
