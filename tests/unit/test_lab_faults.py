"""Fault schedules: parsing, checking, and playing them on time with a fake clock."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import pytest

from gossamer.core.clock import FakeClock
from gossamer.core.errors import ConfigError
from gossamer.lab.config import LabConfig, format_rate
from gossamer.lab.control import LabControl
from gossamer.lab.faults import (
    AppliedFault,
    Fault,
    FaultPlayer,
    fault_log_writer,
    faults_in_force,
    load_schedule,
    parse_schedule,
    play_schedule,
    schedule_text,
)
from gossamer.lab.lifecycle import lab_up
from gossamer.lab.runner import FakeCommandRunner

SCHEDULE = """
[[fault]]
at_s = 2.0
action = "set_rate"
peer = "p1"
rate = "10mbit"

[[fault]]
at_s = 0.5
action = "pause"
peer = "p0"

[[fault]]
at_s = 1
action = "kill"
peer = "p0"

[[fault]]
at_s = 1.5
action = "cut"
peer = "p1"

[[fault]]
at_s = 3
action = "partition"
side = ["p0"]

[[fault]]
at_s = 3.5
action = "heal"
"""


@pytest.fixture
def runner() -> FakeCommandRunner:
    return FakeCommandRunner(pids_by_namespace={"gsl-t1-p0": [7]})


@pytest.fixture
def lab(runner: FakeCommandRunner, tmp_path: Path) -> LabControl:
    return lab_up(LabConfig(num_peers=3, name="t1"), runner=runner, state_dir=tmp_path)


def test_parse_schedule_orders_faults_by_time() -> None:
    faults = parse_schedule(SCHEDULE)
    assert [f.at_s for f in faults] == [0.5, 1.0, 1.5, 2.0, 3.0, 3.5]
    assert faults[3] == Fault(at_s=2.0, action="set_rate", peer="p1", rate_bps=10_000_000)
    assert faults[4].side == ("p0",)
    assert faults[3].describe() == "set_rate p1 10mbit"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[[fault]]\nat_s = 1\naction = "explode"\npeer = "p0"', "unknown action"),
        ('[[fault]]\nat_s = 1\naction = "kill"', "needs a peer"),
        ('[[fault]]\nat_s = 1\naction = "heal"\npeer = "p0"', "takes no a peer"),
        ('[[fault]]\nat_s = 1\naction = "set_rate"\npeer = "p0"', "set_rate"),
        ('[[fault]]\nat_s = 1\naction = "set_rate"\npeer = "p0"\nrate = "9mbps"', "bits"),
        ('[[fault]]\nat_s = 1\naction = "partition"', "side"),
        ('[[fault]]\nat_s = -1\naction = "heal"', "at_s"),
        ('[[fault]]\nat_s = "soon"\naction = "heal"', "number of seconds"),
        ('[[fault]]\naction = "heal"', "needs at_s"),
        ('[[fault]]\nat_s = 1\naction = "heal"\nwhen = 3', "unknown keys"),
        ("[faults]\nx = 1", "top-level"),
        ("not toml = = =", "not valid TOML"),
        ("fault = [1, 2]", "a fault is a"),
        ('[[fault]]\nat_s = inf\naction = "heal"', "finite"),
        ('[[fault]]\nat_s = nan\naction = "heal"', "finite"),
        # (a 400-digit integer was an OverflowError traceback)
        (
            f'[[fault]]\nat_s = {"9" * 400}\naction = "heal"',
            r"at_s = 999999999999\.\.\. \(400 digits\)",
        ),
        ('[[fault]]\nat_s = 86401\naction = "heal"', r"from 0 to 86400 \(a day\)"),
        ('[[fault]]\nat_s = 1e300\naction = "heal"', "at_s = 1e.300 is out of range"),
        ("[[fault]]\nat_s = 1\naction = 5", "action must be a string"),
        ('[[fault]]\nat_s = 1\naction = "kill"\npeer = 3', "peer must be"),
        ('[[fault]]\nat_s = 1\naction = "set_rate"\npeer = "p0"\nrate = [1]', "rate must be"),
    ],
)
def test_bad_schedules_are_refused_with_the_reason(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_schedule(text)


def test_load_schedule_reads_a_file_and_names_a_missing_one(tmp_path: Path) -> None:
    path = tmp_path / "faults.toml"
    path.write_text(SCHEDULE)
    assert len(load_schedule(path)) == 6
    with pytest.raises(ConfigError, match="cannot read"):
        load_schedule(tmp_path / "missing.toml")


def test_play_applies_every_fault_at_its_time_and_logs_it(
    lab: LabControl, runner: FakeCommandRunner, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="gossamer.lab.faults"):
        applied = play_schedule(lab, parse_schedule(SCHEDULE), clock=clock)
    assert [a.fault.action for a in applied] == [
        "pause", "kill", "cut", "set_rate", "partition", "heal",
    ]  # fmt: skip
    assert all(a.ok for a in applied)
    assert all(a.late_s == pytest.approx(0.0, abs=1e-9) for a in applied)
    assert clock.monotonic() == pytest.approx(3.5)
    assert runner.signals == [(7, signal.SIGSTOP), (7, signal.SIGKILL)]
    assert applied[0].detail == "pids [7]"
    lines = [r.getMessage() for r in caplog.records if r.name == "gossamer.lab.faults"]
    assert lines[0] == "fault pause p0: planned at 0.500 s, applied at 0.500 s (+0.000 s)"
    assert len(lines) == 6


def test_a_failing_fault_is_recorded_and_the_rest_still_play(
    lab: LabControl, runner: FakeCommandRunner, caplog: pytest.LogCaptureFixture
) -> None:
    runner.answer(["ip", "-n", "gsl-t1-switch", "link", "set", "gsl-p1", "down"], returncode=2)
    with caplog.at_level(logging.ERROR, logger="gossamer.lab.faults"):
        applied = play_schedule(lab, parse_schedule(SCHEDULE), clock=FakeClock())
    assert [a.ok for a in applied] == [True, True, False, True, True, True]
    assert "exited with 2" in applied[2].detail
    assert "FAILED" in caplog.text


def test_unknown_peers_are_refused_before_anything_is_played(
    lab: LabControl, runner: FakeCommandRunner
) -> None:
    faults = (
        Fault(at_s=0, action="kill", peer="p0"),
        Fault(at_s=1, action="partition", side=("p0", "p8")),
    )
    with pytest.raises(ConfigError, match="no peer 'p8'"):
        play_schedule(lab, faults, clock=FakeClock())
    assert runner.signals == []


def test_fault_log_is_one_json_line_per_applied_fault(lab: LabControl, tmp_path: Path) -> None:
    log = tmp_path / "faults.jsonl"
    play_schedule(
        lab, parse_schedule(SCHEDULE), clock=FakeClock(), on_applied=fault_log_writer(log)
    )
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["action"] for r in records][:2] == ["pause", "kill"]
    assert records[3]["rate_bps"] == 10_000_000
    assert records[3]["planned_at_s"] == 2.0
    assert all(abs(r["late_s"]) < 1e-9 for r in records)


def test_a_fault_log_that_cannot_be_written_is_refused_before_any_fault(tmp_path: Path) -> None:
    # The first record's write raised after its fault was applied: a cut stayed in force, its
    # restore never played.
    with pytest.raises(ConfigError, match="cannot write the fault log"):
        fault_log_writer(tmp_path / "missing" / "faults.jsonl")


def test_player_runs_in_the_background_and_can_be_stopped(lab: LabControl) -> None:
    with FaultPlayer(lab, parse_schedule(SCHEDULE), clock=FakeClock()) as player:
        applied = player.wait(timeout_s=10.0)
    assert len(applied) == 6


def test_a_binary_schedule_file_is_refused_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "faults.toml"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_schedule(path)


def test_a_partition_of_every_peer_is_refused_before_anything_is_played(
    lab: LabControl, runner: FakeCommandRunner
) -> None:
    faults = (
        Fault(at_s=0, action="kill", peer="p0"),
        Fault(at_s=1, action="partition", side=("p0", "p1", "p2")),
    )
    with pytest.raises(ConfigError, match="every peer on one side"):
        play_schedule(lab, faults, clock=FakeClock())
    assert runner.signals == []  # (the kill had been played before the partition failed)


def _played(*faults: Fault, failed: tuple[int, ...] = ()) -> list[AppliedFault]:
    return [
        AppliedFault(fault, fault.at_s, fault.at_s, index not in failed, "")
        for index, fault in enumerate(faults)
    ]


def test_what_a_schedule_stopped_part_way_left_in_force_is_undone_by_its_undo(
    lab: LabControl,
) -> None:
    applied = _played(
        Fault(at_s=0.1, action="pause", peer="p0"),
        Fault(at_s=0.2, action="pause", peer="p1"),
        Fault(at_s=0.3, action="kill", peer="p1"),  # a killed peer has nothing to resume
        Fault(at_s=0.4, action="cut", peer="p2"),
        Fault(at_s=0.5, action="cut", peer="p1"),
        Fault(at_s=0.6, action="restore", peer="p1"),
        Fault(at_s=0.7, action="partition", side=("p0",)),
        Fault(at_s=0.8, action="set_rate", peer="p1", rate_bps=10_000_000),
        Fault(at_s=0.9, action="set_rate", peer="p2", rate_bps=5_000_000),
        Fault(at_s=1.0, action="set_rate", peer="p2", rate_bps=lab.peer("p2").rate_bps),
        Fault(at_s=1.1, action="cut", peer="p0"),  # failed: nothing to undo
        failed=(10,),
    )
    undo = faults_in_force(lab, applied)
    assert [fault.describe() for fault in undo] == [
        "resume p0",
        "restore p2",
        "heal",
        f"set_rate p1 {format_rate(lab.peer('p1').rate_bps)}",
    ]
    assert parse_schedule(schedule_text(undo)) == undo  # printed for the user to play
    assert faults_in_force(lab, [*applied, *_played(*undo)]) == ()


def test_a_healed_partition_and_a_killed_pause_are_not_in_force(lab: LabControl) -> None:
    applied = _played(*parse_schedule(SCHEDULE))
    assert faults_in_force(lab, applied) == (
        Fault(at_s=0.0, action="restore", peer="p1"),
        Fault(at_s=0.0, action="set_rate", peer="p1", rate_bps=lab.peer("p1").rate_bps),
    )
