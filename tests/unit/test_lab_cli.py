"""`gossamer lab`'s handling of bad input, before it touches the system."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from gossamer.cli.lab import app


def test_a_bad_rate_is_one_line_with_the_fix() -> None:
    result = CliRunner().invoke(app, ["up", "--peers", "2", "--rate", "100mbps"])
    assert result.exit_code == 2
    assert "bytes per second" in result.output
    assert "Traceback" not in result.output


def test_too_many_rates_for_the_peers_is_refused() -> None:
    result = CliRunner().invoke(app, ["up", "--peers", "2", "--rates", "1mbit,2mbit,3mbit"])
    assert result.exit_code == 2
    assert "one rate per peer" in result.output


def test_commands_on_a_lab_that_is_not_up_say_how_to_start_one(tmp_path: Path) -> None:
    common = ["--name", "absent", "--state-dir", str(tmp_path)]
    for argv in (["exec", "p0", *common, "--", "true"], ["iperf", "p0", "p1", *common]):
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 2
        assert "gossamer lab up --name absent" in result.output


def test_a_bad_schedule_is_refused_before_play(tmp_path: Path) -> None:
    schedule = tmp_path / "faults.toml"
    schedule.write_text('[[fault]]\nat_s = 1\naction = "explode"\n')
    result = CliRunner().invoke(app, ["faults", str(schedule), "--state-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown action 'explode'" in result.output


def test_down_removes_the_default_lab_unless_told_all(monkeypatch: pytest.MonkeyPatch) -> None:
    # A bare `down` (which `up` advised) removed every lab: benchmarks' and other users' too.
    asked: list[str | None] = []
    monkeypatch.setattr("gossamer.cli.lab.lab_down", lambda name, **_: asked.append(name) or [])
    for argv in (["down"], ["down", "--name", "mine"], ["down", "--all"]):
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, result.output
    assert asked == ["lab", "mine", None]


def test_a_rate_too_large_to_hold_is_refused_in_one_line() -> None:
    result = CliRunner().invoke(app, ["up", "--peers", "2", "--rate", "9" * 400 + "mbit"])
    assert result.exit_code == 2
    assert "outside what the lab shapes" in result.output


def test_a_schedule_with_a_huge_time_is_one_line_naming_the_key(tmp_path: Path) -> None:
    # (a 400-digit at_s was an OverflowError traceback)
    schedule = tmp_path / "faults.toml"
    schedule.write_text(f'[[fault]]\nat_s = {"9" * 400}\naction = "heal"\n')
    result = CliRunner().invoke(app, ["faults", str(schedule), "--state-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "at_s = 999999999999... (400 digits) is out of range" in result.output
    assert "Traceback" not in result.output
