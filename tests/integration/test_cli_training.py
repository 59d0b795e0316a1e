"""The `gossamer` command end to end on a tiny config, as a user runs it."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest

GOSSAMER = [sys.executable, "-m", "gossamer.cli"]


def run(args: list[str], cwd: Path, *, timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOSSAMER_")}
    env["COLUMNS"] = "120"
    return subprocess.run(
        [*GOSSAMER, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "corpus.txt").write_text(
        "def square(x):\n    return x * x\n\n" * 300 + "import os\nprint(os.getcwd())\n" * 100
    )
    (tmp_path / "tiny.toml").write_text(
        """
name = "tiny"
[model]
num_layers = 1
num_heads = 2
width = 32
context = 32
[data]
source = "text"
path = "corpus.txt"
[train]
max_steps = 30
batch_size = 4
eval_batches = 2
eval_every = 10
[checkpoint]
directory = "ckpt"
every_steps = 10
"""
    )
    return tmp_path


def test_help_and_version(workdir: Path) -> None:
    help_result = run(["--help"], workdir)
    assert help_result.returncode == 0
    for command in ("train", "eval", "sample", "demo", "version", "bench", "lab"):
        assert command in help_result.stdout
    version = run(["version"], workdir)
    assert version.returncode == 0
    assert version.stdout.strip() == "0.1.0"


def test_train_eval_sample_and_resume(workdir: Path) -> None:
    first = run(
        ["train", "--config", "tiny.toml", "--train.max-steps", "20", "--summary-json", "s.json"],
        workdir,
    )
    assert first.returncode == 0, first.stderr
    summary = json.loads((workdir / "s.json").read_text())
    assert summary["steps"] == 20
    assert summary["val_loss_after"] < summary["val_loss_before"]
    assert Path(workdir / summary["checkpoint_path"]).is_dir()

    # Same directory, longer schedule: resumes from step 20 rather than starting over.
    second = run(
        ["train", "--config", "tiny.toml", "--train.max_steps=30", "--summary-json", "s2.json"],
        workdir,
    )
    assert second.returncode == 0, second.stderr
    resumed = json.loads((workdir / "s2.json").read_text())
    assert resumed["start_step"] == 20
    assert resumed["steps"] == 30

    evaluation = run(["eval", "--checkpoint", "ckpt", "--json"], workdir)
    assert evaluation.returncode == 0, evaluation.stderr
    measured = json.loads(evaluation.stdout)
    assert measured["step"] == 30
    # The checkpoint's own eval_batches by default: the loss training reported at its end.
    assert measured["val_loss"] == pytest.approx(resumed["val_loss_after"], rel=1e-6)

    sample = run(["sample", "--checkpoint", "ckpt", "--prompt", "def ", "--tokens", "40"], workdir)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("def ")
    assert len(sample.stdout) > 10


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_checkpoints_the_step_reached_and_the_run_resumes(
    workdir: Path, sig: signal.Signals
) -> None:
    # A spot instance's notice (SIGTERM) or Ctrl-C killed the run: every step since the last
    # checkpoint (up to a whole run with checkpoint.every_steps 0) was lost, without a word.
    process = _start_endless_run(
        workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_stop_signals_as_a_terminal_gives_them,
    )
    try:
        _wait_for_steps(process, workdir)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait(timeout=30)  # (reaped: a process left to the collector warns later)
    assert process.returncode == 130, stderr.decode()
    summary = json.loads((workdir / "s.json").read_text())
    assert summary["interrupted"] is True
    assert summary["val_loss_after"] is None  # (none measured at the stop: not the first one)
    reached = summary["steps"]
    assert reached >= 5
    assert f"interrupted at step {reached}" in stderr.decode()
    assert (workdir / "ckpt" / f"step-{reached:09d}").is_dir()
    resumed = run(
        ["train", "--config", "tiny.toml", "--train.max-steps", str(reached + 2)], workdir
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"steps {reached} -> {reached + 2}" in resumed.stdout + resumed.stderr


def test_a_stop_signal_the_run_was_started_ignoring_stays_ignored(workdir: Path) -> None:
    # `nohup gossamer train &` stopped when its terminal closed: the SIGHUP its shell had it
    # ignore was taken as a stop.
    process = _start_endless_run(
        workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),  # (as nohup does)
    )
    try:
        _wait_for_steps(process, workdir)
        process.send_signal(signal.SIGHUP)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait(timeout=30)  # (reaped: a process left to the collector warns later)
    assert process.returncode == 130
    assert "SIGTERM: stopping" in stderr.decode()
    assert "SIGHUP" not in stderr.decode()


def test_a_run_whose_terminal_closes_checkpoints_the_step_reached(workdir: Path) -> None:
    # The terminal's hangup (SIGHUP) made every write to it fail: the run died of its next
    # progress line, exit 1, with no checkpoint and no summary.
    master, terminal = os.openpty()

    def on_the_terminal() -> None:  # (its controlling terminal, as a shell's job has)
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        _stop_signals_as_a_terminal_gives_them()

    process = _start_endless_run(
        workdir, stdin=terminal, stdout=terminal, stderr=terminal, preexec_fn=on_the_terminal
    )
    os.close(terminal)
    try:
        _wait_for_steps(process, workdir, drain=master)
        os.close(master)  # the terminal closes: the kernel sends SIGHUP
        assert process.wait(timeout=120) == 130
    finally:
        process.kill()
        process.wait(timeout=30)  # (reaped: a process left to the collector warns later)
    summary = json.loads((workdir / "s.json").read_text())
    assert summary["interrupted"] is True
    assert (workdir / "ckpt" / f"step-{summary['steps']:09d}").is_dir()


def _start_endless_run(workdir: Path, **popen: Any) -> subprocess.Popen[bytes]:
    """`gossamer train` on the tiny config until it is stopped, its steps traced to
    spans.jsonl, its summary in s.json, no checkpoint before its end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOSSAMER_")}
    args = ["train", "--config", "tiny.toml", "--train.max-steps", "100000"]
    args += ["--checkpoint.every-steps", "0", "--trace", "spans.jsonl", "--summary-json", "s.json"]
    return subprocess.Popen([*GOSSAMER, *args], cwd=workdir, env=env, **popen)


def _wait_for_steps(
    process: subprocess.Popen[bytes], workdir: Path, *, drain: int | None = None
) -> None:
    """Wait (120 s at most) for 5 steps done in its trace (spans reach the file within 1 s),
    reading what it writes to ``drain`` meanwhile, so that it is never blocked on it."""
    deadline = time.monotonic() + 120
    while _steps_traced(workdir / "spans.jsonl") < 5:
        assert process.poll() is None, "the run ended before it was stopped"
        assert time.monotonic() < deadline, "no steps traced in 120 s"
        if drain is None:
            time.sleep(0.1)  # polling another process's file under a deadline
        elif select.select([drain], [], [], 0.1)[0]:
            os.read(drain, 1 << 16)


def _stop_signals_as_a_terminal_gives_them() -> None:
    """(In the child) Ctrl-C, SIGTERM and SIGHUP as a terminal's job has them: a suite run in
    the background of a script (SIGINT ignored) or under nohup passes its SIG_IGN on."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _steps_traced(path: Path) -> int:
    """Steps done by the run whose trace is at ``path``: those whose compute spans were traced,
    less the last (its optimizer's span may still be running). Each step has two compute spans
    (forward and backward, then the optimizer): counting lines read 5 at step 2, and a stop
    then came before the 5 steps the tests expect."""
    if not path.exists():
        return 0
    steps = set()
    for line in path.read_text().splitlines():
        if '"compute"' in line:
            try:
                steps.add(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):  # (a line being written)
                continue
    return max(0, len(steps) - 1)


def test_bad_config_fails_before_training(workdir: Path) -> None:
    result = run(["train", "--config", "tiny.toml", "--model.num_heads", "3"], workdir)
    assert result.returncode == 2
    assert "model.num_heads" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir / "ckpt").exists()

    unknown = run(["train", "--config", "tiny.toml", "--train.max_stepz", "3"], workdir)
    assert unknown.returncode == 2
    assert "did you mean 'train.max_steps'" in unknown.stderr


def test_corrupted_checkpoint_is_reported_and_previous_used(workdir: Path) -> None:
    assert run(["train", "--config", "tiny.toml"], workdir).returncode == 0
    checkpoints = sorted((workdir / "ckpt").glob("step-*"))
    newest = checkpoints[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # torn write
    evaluation = run(["eval", "--checkpoint", str(newest), "--batches", "1"], workdir)
    assert evaluation.returncode == 1
    assert "model.safetensors" in evaluation.stderr
    fallback = run(["eval", "--checkpoint", "ckpt", "--json", "--batches", "1"], workdir)
    assert fallback.returncode == 0, fallback.stderr
    assert json.loads(fallback.stdout)["step"] == 20


def test_missing_data_is_a_clear_error(workdir: Path) -> None:
    shutil.move(workdir / "corpus.txt", workdir / "elsewhere.txt")
    result = run(["train", "--config", "tiny.toml"], workdir)
    assert result.returncode == 2  # a wrong path, found before anything ran (as for a flag)
    assert "corpus.txt" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_show_and_keys(workdir: Path) -> None:
    shown = run(["config", "show", "--config", "tiny.toml", "--train.seed", "7"], workdir)
    assert shown.returncode == 0, shown.stderr
    assert "seed = 7" in shown.stdout
    keys = run(["config", "keys"], workdir)
    assert keys.returncode == 0
    assert "train.max_steps" in keys.stdout


def test_demo_at_reduced_budget(workdir: Path) -> None:
    result = run(
        [
            "demo",
            "--seconds",
            "20",
            "--max-steps",
            "40",
            "--summary-json",
            "demo.json",
            "--runs-dir",
            "runs",
        ],
        workdir,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((workdir / "demo.json").read_text())
    for key in ("val_loss_before", "val_loss_after", "tokens_trained", "tokens_per_s", "seconds"):
        assert key in summary
    assert 0.0 < summary["longest_pause_s"] < summary["seconds"]
    assert summary["killed_peer_rounds"] > 0  # the peer killed was averaging with the others
    assert "longest pause of a survivor" in result.stdout
    # (off a terminal the summary's title went on the live table's last line)
    title = "Gossamer demo: a swarm of peers on this machine"
    assert any(line.strip() == title for line in result.stdout.splitlines())
    assert summary["val_loss_after"] < summary["val_loss_before"] - 0.5
    assert Path(workdir / summary["checkpoint_path"]).is_dir()
    assert summary["tokens_trained"] > 0
    assert "sample" in result.stdout
