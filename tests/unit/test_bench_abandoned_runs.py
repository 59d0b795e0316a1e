"""What a benchmark driver killed outright (SIGKILL) leaves behind, removed at the next run: its
lab (recorded with the driver's pid) and its temporary folder. No root: a fake lab runner."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from gossamer.bench.allreduce import _write_driver, remove_abandoned_runs
from gossamer.lab.config import LabConfig
from gossamer.lab.lifecycle import lab_up, remove_abandoned_labs
from gossamer.lab.runner import FakeCommandRunner
from gossamer.lab.state import (
    LabState,
    load_state,
    pid_namespace,
    process_ended,
    process_start_ticks,
)


def _ended_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    done = subprocess.Popen(["true"])
    done.wait(timeout=30)
    return done.pid


def test_a_process_is_ended_when_its_pid_is_gone_or_was_given_to_another() -> None:
    me = os.getpid()
    started = process_start_ticks(me)
    assert started is not None
    assert not process_ended(me, started)
    assert not process_ended(me, None)  # (start time unknown: the pid alone)
    assert process_ended(me, started + 1)  # the pid given again, to a later process
    gone = _ended_pid()
    assert process_start_ticks(gone) is None
    assert process_ended(gone, started)


def test_a_lab_records_its_owner_and_is_abandoned_only_once_the_owner_ended(
    tmp_path: Path,
) -> None:
    runner = FakeCommandRunner()
    lab_up(LabConfig(num_peers=2, name="own"), runner=runner, state_dir=tmp_path)
    lab_up(
        LabConfig(num_peers=2, name="live"),
        runner=runner,
        state_dir=tmp_path,
        owner_pid=os.getpid(),
    )
    lab_up(
        LabConfig(num_peers=2, name="dead"),
        runner=runner,
        state_dir=tmp_path,
        owner_pid=_ended_pid(),
    )
    live = load_state("live", tmp_path)
    assert live is not None
    assert (live.owner_pid, live.owner_start_ticks) == (
        os.getpid(),
        process_start_ticks(os.getpid()),
    )
    assert not live.owner_gone()
    dead = load_state("dead", tmp_path)
    assert dead is not None
    assert dead.owner_gone()
    own = load_state("own", tmp_path)
    assert own is not None
    assert own.owner_pid is None  # `lab up`'s lab stays until `lab down`
    assert not own.owner_gone()

    assert remove_abandoned_labs(runner=runner, state_dir=tmp_path) == ["dead"]
    assert load_state("dead", tmp_path) is None
    assert not [ns for ns in runner.namespaces if ns.startswith("gsl-dead-")]
    assert {ns.split("-")[1] for ns in runner.namespaces} == {"own", "live"}
    assert remove_abandoned_labs(runner=runner, state_dir=tmp_path) == []


def test_a_record_written_before_labs_had_owners_still_loads(tmp_path: Path) -> None:
    runner = FakeCommandRunner()
    lab_up(LabConfig(num_peers=2, name="old"), runner=runner, state_dir=tmp_path)
    path = tmp_path / "old.json"
    record = json.loads(path.read_text())
    del record["owner_pid"], record["owner_start_ticks"]
    path.write_text(json.dumps(record))
    state = load_state("old", tmp_path)
    assert state is not None
    assert state.owner_pid is None
    assert LabState.from_json(state.to_json()) == state


def test_the_next_run_removes_folders_whose_driver_ended_and_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ended, mine, starting, other = (
        tmp_path / name
        for name in ("gossamer-bench-a1", "gossamer-bench-b2", "gossamer-bench-c3", "keep-d4")
    )
    for folder in (ended, mine, starting, other):
        folder.mkdir()
        (folder / "worker-0.log").write_text("output\n")
    _write_driver(mine)
    (ended / "driver.json").write_text(json.dumps({"pid": _ended_pid(), "start_ticks": 1}))
    _write_driver(other)  # (not a bench folder by its name, whatever it holds)
    (other / "driver.json").write_text(json.dumps({"pid": _ended_pid(), "start_ticks": 1}))
    said = remove_abandoned_runs(labs=False, temp_dir=tmp_path)
    assert said == f"removed what killed benchmark runs left behind: folder {ended}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gossamer-bench-b2",
        "gossamer-bench-c3",  # (no driver recorded yet: a run starting now)
        "keep-d4",
    ]
    assert remove_abandoned_runs(labs=False, temp_dir=tmp_path) is None


def test_the_next_run_with_a_rate_removes_abandoned_labs_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("gossamer.lab.remove_abandoned_labs", lambda: ["ar1b2c3"])
    said = remove_abandoned_runs(labs=True, temp_dir=tmp_path)
    assert said == "removed what killed benchmark runs left behind: lab ar1b2c3"


def test_an_owner_of_another_pid_namespace_is_never_taken_for_ended(tmp_path: Path) -> None:
    # A bench in a container records its own namespace's pids (its driver is pid 2 there):
    # a bench on the host sharing /tmp read pid 2 as kthreadd's, took the live run's folder
    # for abandoned and removed it under its workers.
    elsewhere = (pid_namespace() or 0) + 1
    assert not process_ended(_ended_pid(), None, elsewhere)
    assert process_ended(_ended_pid(), None, pid_namespace())
    folder = tmp_path / "gossamer-bench-container"
    folder.mkdir()
    (folder / "driver.json").write_text(
        json.dumps({"pid": _ended_pid(), "start_ticks": 1, "pid_namespace": elsewhere})
    )
    assert remove_abandoned_runs(labs=False, temp_dir=tmp_path) is None
    assert folder.is_dir()
    runner = FakeCommandRunner()
    lab_up(
        LabConfig(num_peers=2, name="boxed"),
        runner=runner,
        state_dir=tmp_path,
        owner_pid=_ended_pid(),
    )
    state = load_state("boxed", tmp_path)
    assert state is not None
    assert state.owner_pid_namespace == pid_namespace()
    assert state.owner_gone()
    record = dict(state.to_json(), owner_pid_namespace=elsewhere)
    assert not LabState.from_json(record).owner_gone()


def test_a_lab_that_will_not_go_stops_neither_the_run_nor_the_others_removal(
    tmp_path: Path,
) -> None:
    runner = FakeCommandRunner()
    for name in ("a1", "b2"):
        lab_up(
            LabConfig(num_peers=2, name=name),
            runner=runner,
            state_dir=tmp_path,
            owner_pid=_ended_pid(),
        )
    runner.answer(["ip", "netns", "del", "gsl-a1-p0"], returncode=1)
    assert remove_abandoned_labs(runner=runner, state_dir=tmp_path) == ["b2"]
    assert load_state("b2", tmp_path) is None
