"""Nothing is left behind: not after a failing test, not after a crashed process, not by the CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from netlab_support import MakeLab, lab_namespaces
from typer.testing import CliRunner

from gossamer.cli.lab import app
from gossamer.lab import lab_down
from gossamer.lab.state import LabState, load_state


def test_open_lab_removes_everything_when_the_body_raises(make_lab: MakeLab, lab_name: str) -> None:
    with pytest.raises(RuntimeError, match="test failure"), make_lab(num_peers=2, num_nat=1):
        raise RuntimeError("test failure")
    assert lab_namespaces(f"gsl-{lab_name}-") == []


def _crash_after_up(lab_name: str, state_dir: Path) -> None:
    """Build a lab and start a process in it from a child that then dies by SIGKILL."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from gossamer.lab import LabConfig, lab_up
        lab = lab_up(LabConfig(num_peers=2, num_nat=1, name={lab_name!r}),
                     state_dir=Path({str(state_dir)!r}))
        lab.spawn_in("p0", ["sleep", "60"])
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    child = subprocess.run([sys.executable, "-c", script], timeout=60, check=False)
    assert child.returncode == -9


@pytest.mark.parametrize("record_lost", [False, True])
def test_down_removes_a_crashed_labs_leftovers(
    lab_name: str, state_dir: Path, record_lost: bool
) -> None:
    _crash_after_up(lab_name, state_dir)
    leftovers = lab_namespaces(f"gsl-{lab_name}-")
    assert len(leftovers) == 4  # switch, p0, p1 and p1's router
    if record_lost:
        (state_dir / f"{lab_name}.json").unlink()
    removed = lab_down(lab_name, state_dir=state_dir)
    assert sorted(removed) == leftovers
    assert lab_namespaces(f"gsl-{lab_name}-") == []
    assert not list(state_dir.glob("*.json"))


def test_cli_up_status_exec_faults_down(lab_name: str, state_dir: Path, tmp_path: Path) -> None:
    cli = CliRunner()
    common = ["--name", lab_name, "--state-dir", str(state_dir)]
    built = cli.invoke(
        app, ["up", "--peers", "3", "--rates", "20mbit,50mbit,100mbit", "--nat", "1", *common]
    )
    try:
        assert built.exit_code == 0, built.output
        assert "NOT emulated" in built.output
        assert "10.213.0.10" in built.output

        shown = cli.invoke(app, ["status", "--json", "--state-dir", str(state_dir)])
        assert shown.exit_code == 0, shown.output
        (lab,) = [item for item in json.loads(shown.output)["labs"] if item["name"] == lab_name]
        assert lab["healthy"]
        assert lab["latency_emulated"] is False
        peers = {peer["name"]: peer for peer in lab["peers"]}
        assert peers["p0"]["rate_bps"] == 20_000_000
        assert peers["p0"]["namespace"] == f"gsl-{lab_name}-p0"
        assert peers["p2"]["behind_nat"]
        assert peers["p2"]["address"] == "10.213.102.2"

        ran = cli.invoke(app, ["exec", "p0", *common, "--", "sh", "-c", "exit 3"])
        assert ran.exit_code == 3

        schedule = tmp_path / "faults.toml"
        schedule.write_text('[[fault]]\nat_s = 0.1\naction = "cut"\npeer = "p1"\n'
                            '[[fault]]\nat_s = 0.2\naction = "set_rate"\npeer = "p1"\n'
                            'rate = "10mbit"\n')  # fmt: skip
        played = cli.invoke(app, ["faults", str(schedule), *common])
        assert played.exit_code == 0, played.output
        assert "cut p1" in played.output
        assert "planned 0.200 s" in played.output
        shown = cli.invoke(app, ["status", "--json", "--state-dir", str(state_dir)])
        (lab,) = [item for item in json.loads(shown.output)["labs"] if item["name"] == lab_name]
        p1 = next(peer for peer in lab["peers"] if peer["name"] == "p1")
        assert p1["link"] == "cut"
        assert p1["rate_bps"] == 10_000_000
    finally:
        removed = cli.invoke(app, ["down", *common])
    assert removed.exit_code == 0, removed.output
    assert "removed 5 namespaces" in removed.output


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gossamer.cli", "lab", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigterm_stops_exec_s_command_and_says_what_faults_it_left(
    make_lab: MakeLab, lab_name: str, state_dir: Path, tmp_path: Path
) -> None:
    common = ["--name", lab_name, "--state-dir", str(state_dir)]
    with make_lab(num_peers=2) as lab:
        # `lab exec` stopped by SIGTERM (a timeout, a supervisor) left its command running.
        execed = _cli("exec", "p0", *common, "--", "sleep", "60")
        deadline = time.monotonic() + 30
        while not lab.pids_in("p0"):
            assert time.monotonic() < deadline, "the command never started in p0"
            time.sleep(0.05)  # polling a condition with a deadline
        execed.send_signal(signal.SIGTERM)
        execed.communicate(timeout=30)
        deadline = time.monotonic() + 10
        while lab.pids_in("p0"):
            assert time.monotonic() < deadline, "exec's command outlived it"
            time.sleep(0.05)  # polling a condition with a deadline

        # `lab faults` stopped before its undo half: it says what is in force and how to undo.
        schedule = tmp_path / "faults.toml"
        schedule.write_text(
            '[[fault]]\nat_s = 0\naction = "cut"\npeer = "p1"\n'
            '[[fault]]\nat_s = 0\naction = "set_rate"\npeer = "p0"\nrate = "10mbit"\n'
            '[[fault]]\nat_s = 60\naction = "restore"\npeer = "p1"\n'
        )
        played = _cli("faults", str(schedule), *common)
        assert played.stdout is not None
        seen = [played.stdout.readline(), played.stdout.readline()]
        assert "cut p1" in seen[0]
        assert "set_rate p0" in seen[1]
        played.send_signal(signal.SIGTERM)
        _, err = played.communicate(timeout=30)
        assert played.returncode == 130, err
        assert "faults in force" in err
        undo = tmp_path / "undo.toml"
        undo.write_text(err[err.index("[[fault]]") :])
        replayed = CliRunner().invoke(app, ["faults", str(undo), *common])
        assert replayed.exit_code == 0, replayed.output
        peers = {p.name: p for p in lab.topology.peers}
        state = lab_state(lab_name, state_dir)
        assert state.cut_peers == []
        assert state.rates_bps.get("p0", peers["p0"].rate_bps) == peers["p0"].rate_bps


def lab_state(name: str, state_dir: Path) -> LabState:
    state = load_state(name, state_dir)
    assert state is not None
    return state


def test_exec_in_a_lab_whose_namespaces_are_gone_says_what_to_do(
    make_lab: MakeLab, lab_name: str, state_dir: Path
) -> None:
    # It said a bare "Cannot open network namespace" (the namespaces deleted by hand, or by a
    # `down --all` that raced the lab's `up`).
    with make_lab(num_peers=2) as lab:
        subprocess.run(["ip", "netns", "del", lab.peer("p0").namespace], check=True, timeout=10)
        ran = CliRunner().invoke(
            app, ["exec", "p0", "--name", lab_name, "--state-dir", str(state_dir), "--", "true"]
        )
    assert ran.exit_code == 2, ran.output
    assert f"namespaces gsl-{lab_name}-p0 are gone" in ran.output
    assert f"gossamer lab down --name {lab_name}" in ran.output
