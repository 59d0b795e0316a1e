"""`gossamer bench ...`: impossible settings are refused up front, before any worker runs."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from gossamer.cli import bench, bench_allreduce, bench_transport


def _never(*_: Any, **__: Any) -> Any:
    raise AssertionError("the benchmark ran: the bad input should have been refused first")


@pytest.fixture(autouse=True)
def _no_benchmark_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_allreduce, "run_allreduce_sweep", _never)
    monkeypatch.setattr(bench_transport, "run_transport_bench", _never)
    for name in ("run_loop_bench", "run_obs_overhead_bench", "run_diloco_bench"):
        monkeypatch.setattr(bench, name, _never)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["transport", "--payload-mib", "-1"], "--payload-mib"),
        (["transport", "--payload-mib", "0"], "--payload-mib"),
        (["transport", "--repeats", "0"], "--repeats"),
        (["transport", "--pings", "0"], "--pings"),
        (["transport", "--streams", "0"], "--streams"),
        (["loop", "--repeats", "0"], "--repeats"),
        (["loop", "--steps", "0"], "--steps"),
        (["obs", "--repeats", "0"], "--repeats"),
        (["obs", "--steps", "0"], "--steps"),
        (["allreduce", "--rate", "abc"], "'abc' is not a rate"),
        (["allreduce", "--size", "infMB"], "at least 4 bytes"),
        (["allreduce", "--size", "-100MB"], "at least 4 bytes"),
        (["allreduce", "--size", "much"], "size like 100MB"),
        (["allreduce", "--codec", "xyz"], "unknown codec 'xyz'"),
        (["allreduce", "--codec", "none,xyz"], "unknown codec 'xyz'"),
        (["allreduce", "--peers", "1"], "--peers"),
        (["allreduce", "--repeats", "0"], "--repeats"),
        (["diloco", "--peers", "0"], "--peers"),
        (["diloco", "--inner-steps", "0"], "--inner-steps"),
        (["diloco", "--steps", "0"], "--steps"),
        (["diloco", "--rate", "abc"], "'abc' is not a rate"),
    ],
)
def test_bad_bench_settings_are_refused_before_running(args: list[str], fragment: str) -> None:
    result = CliRunner().invoke(bench.app, args)
    output = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2, output
    assert fragment in output
    assert "Traceback" not in output
