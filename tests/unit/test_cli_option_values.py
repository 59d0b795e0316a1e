"""What every command makes of its path and seconds options, read where the flag is parsed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from gossamer.cli.main import app


def _options(command: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(command path, click command, parameter)`` for every parameter of every command."""
    name = f"{prefix} {command.name}".strip()
    for param in command.params:
        yield name, command, param
    for sub in getattr(command, "commands", {}).values():
        yield from _options(sub, name)


def _path_options() -> list[tuple[str, Any, Any]]:
    found = []
    for name, command, param in _options(typer.main.get_command(app)):
        annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
        if annotation is Path or annotation == list[Path]:
            found.append((name, command, param))
    return found


def test_every_path_option_reads_a_leading_tilde_as_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Checked expanded but written as given: `train --summary-json=~/s.json` trained to its end
    # and died writing it; `peer start --status-file=~/s.json` wrote into a folder named "~".
    monkeypatch.setenv("HOME", str(tmp_path))
    options = _path_options()
    assert len(options) >= 20  # (every command's: train, eval, peer, bench, lab, trace, ...)
    unexpanded = []
    for name, command, param in options:
        ctx = typer.Context(command)
        value = param.process_value(ctx, ["~/x"] if param.multiple or param.nargs != 1 else "~/x")
        values = value if isinstance(value, list | tuple) else [value]
        if values != [tmp_path / "x"]:
            unexpanded.append(f"{name} {param.name}: {values}")
    assert not unexpanded


def test_a_path_starting_with_a_tilde_and_no_such_user_is_taken_as_written() -> None:
    # pathlib's expanduser raises RuntimeError for "~name" with no user of that name: a file
    # or run folder named so ("-o ~out.json", "-c ./~run.toml") got a traceback.
    given = "~no-such-user-here/out.json"
    failed = []
    for name, command, param in _path_options():
        ctx = typer.Context(command)
        value = param.process_value(ctx, [given] if param.multiple or param.nargs != 1 else given)
        values = value if isinstance(value, list | tuple) else [value]
        if values != [Path(given)]:
            failed.append(f"{name} {param.name}: {values}")
    assert not failed


_SECONDS = [
    ["peers", "--bootstrap", "127.0.0.1:1", "--wait-s"],
    ["peer", "start", "--record-ttl-s"],
    ["peer", "start", "--refresh-interval-s"],
    ["dashboard", "--scrape", "127.0.0.1:1", "--gone-after-s"],
    ["dashboard", "--scrape", "127.0.0.1:1", "--poll-interval-s"],
    ["lab", "iperf", "--duration-s"],
]


@pytest.mark.parametrize("value", ["1e10", "1e300", "86401"])
@pytest.mark.parametrize("args", _SECONDS, ids=[args[-1] for args in _SECONDS])
def test_a_wait_or_interval_past_a_day_is_refused_as_the_flag_is_read(
    args: list[str], value: str
) -> None:
    # `peers --wait-s 1e10` passed (finite, > 0) and overflowed a thread's wait in a traceback;
    # 1e300 as a dashboard's poll interval or a peer's refresh interval waited for ever.
    result = CliRunner().invoke(app, [*args, value])
    output = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2, output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in output
    assert args[-1] in output
    assert "at most 86400 (a day)" in output


def test_every_positive_float_option_in_seconds_is_bounded() -> None:
    unbounded = []
    for name, command, param in _options(typer.main.get_command(app)):
        annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
        if annotation is float and param.name.endswith("_s") and "_per_" not in param.name:
            try:
                param.process_value(typer.Context(command), "1e10")
            except typer.BadParameter:
                continue
            unbounded.append(f"{name} {param.name}")
    assert not unbounded


@pytest.mark.parametrize(
    "command", [[], ["train"], ["peer", "start"], ["lab", "up"], ["trace", "export"]]
)
def test_dash_h_is_help_for_the_root_and_every_command(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "-h"])
    assert result.exit_code == 0, result.output
    assert f"Usage: gossamer {' '.join(command)}".strip() in " ".join(result.output.split())


def test_dash_dash_version_prints_the_version_as_the_version_command_does() -> None:
    from gossamer._version import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"{__version__}\n"
    assert CliRunner().invoke(app, ["version"]).output == result.output
