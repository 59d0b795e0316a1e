"""`gossamer demo` off a terminal (a pipe, a log file) prints progress lines as it runs.

The live table is drawn there only at the end: the demo printed nothing for minutes after
"dashboard at ...".
"""

from __future__ import annotations

import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gossamer.cli import train as train_cli
from gossamer.cli.main import app


def test_the_demo_prints_progress_lines_off_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [100.0]
    fake_time = types.SimpleNamespace(monotonic=lambda: clock[0])
    monkeypatch.setattr(train_cli, "time", fake_time, raising=False)  # (the demo's clock)

    def fake_demo(*, view: Callable[[dict[str, dict[str, Any]], str], None], **_: Any) -> None:
        statuses = {"peer0": {"state": "training", "step": 10, "max_steps": 840, "loss": 3.5}}
        view(statuses, "3 peers training")
        for _ in range(20):  # two seconds of refreshes, every 0.1 s
            clock[0] += 0.1
            view(statuses, "3 peers training")
        clock[0] += 10.0  # (a progress line every 10 s)
        view({"peer0": {**statuses["peer0"], "step": 200}}, "3 peers training")
        view(statuses, "peer1 killed with SIGKILL at step 200")
        raise RuntimeError("stopped by the test")

    monkeypatch.setattr(train_cli, "run_swarm_demo", fake_demo)
    result = CliRunner().invoke(app, ["demo", "--runs-dir", str(tmp_path / "runs")])
    lines = [line for line in result.output.splitlines() if line.startswith("swarm: ")]
    assert lines == [
        "swarm: 3 peers training: peer0 training step 10/840 loss 3.500",
        "swarm: 3 peers training: peer0 training step 200/840 loss 3.500",
        "swarm: peer1 killed with SIGKILL at step 200: peer0 training step 10/840 loss 3.500",
    ], result.output
