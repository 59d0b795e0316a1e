"""`gossamer bench diloco`'s defaults: what the quality comparison trains unless flags say so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gossamer.bench.diloco import DiLoCoBenchResult, MethodResult, bench_diloco_config
from gossamer.cli import bench, bench_transport
from gossamer.core.config import RunConfig


def _capture(seen: dict[str, Any]) -> Any:
    def fake_bench(*, config: RunConfig, peers: int, inner_steps: int, steps: int, **_: Any) -> Any:
        seen.update(config=config, peers=peers, inner_steps=inner_steps, steps=steps)
        method = MethodResult(name="m", val_loss=2.0, bytes_per_peer=1, seconds=1.0)
        return DiLoCoBenchResult(
            peers=peers,
            inner_steps=inner_steps,
            steps=steps,
            tokens_per_peer=1,
            methods={"sync": method, "diloco": method},
            outer=bench_diloco_config(config, inner_steps),
        )

    return fake_bench


def test_the_quality_comparison_takes_the_small_gpt_for_100_outer_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(bench, "run_diloco_bench", _capture(seen))
    result = CliRunner().invoke(bench.app, ["diloco", "--json"])
    assert result.exit_code == 0, result.output
    config: RunConfig = seen["config"]
    assert (seen["peers"], seen["inner_steps"], seen["steps"]) == (4, 50, 5000)
    model = config.model
    assert (model.num_layers, model.num_heads, model.width, model.context) == (2, 2, 64, 64)
    assert config.train.batch_size == 8
    assert config.train.eval_batches == 32


def test_config_flags_win_over_the_quality_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(bench, "run_diloco_bench", _capture(seen))
    argv = ["diloco", "--steps", "400", "--json", "--model.width", "128", "--model.num-layers", "4"]
    result = CliRunner().invoke(bench.app, argv)
    assert result.exit_code == 0, result.output
    config: RunConfig = seen["config"]
    assert seen["steps"] == 400
    assert (config.model.num_layers, config.model.width, config.model.context) == (4, 128, 64)


class _Captured(Exception):
    """Stops the command once the thin-link part's arguments are seen."""


def test_the_thin_link_keeps_its_own_step_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    thin: dict[str, Any] = {}

    def fake_thin_link(**kwargs: Any) -> Any:
        thin.update(kwargs)
        raise _Captured

    monkeypatch.setattr(bench, "run_diloco_bench", _capture(seen))
    monkeypatch.setattr(bench, "run_thin_link_bench", fake_thin_link)
    monkeypatch.setattr(bench, "check_thin_link_inputs", lambda **_: None)  # (root and tools)
    result = CliRunner().invoke(bench.app, ["diloco", "--rate", "20mbit", "--json"])
    assert isinstance(result.exception, _Captured)
    # The time-to-target race keeps the learning-rate schedule it was measured with (400
    # steps) while the quality part trains 5000.
    assert (seen["steps"], thin["max_steps"]) == (5000, 400)
    result = CliRunner().invoke(
        bench.app, ["diloco", "--rate", "20mbit", "--thin-link-steps", "600"]
    )
    assert isinstance(result.exception, _Captured)
    assert thin["max_steps"] == 600


def test_a_missing_lab_tool_is_one_line_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from gossamer.cli import bench_allreduce
    from gossamer.core.errors import MissingDependencyError

    def missing(**_: Any) -> Any:
        raise MissingDependencyError(
            "the lab needs iptables; install with `apt-get install iptables` (as root)"
        )

    monkeypatch.setattr(bench_allreduce, "run_allreduce_sweep", missing)
    result = CliRunner().invoke(bench.app, ["allreduce", "--rate", "100mbit"])
    assert result.exit_code == 1
    assert "apt-get install iptables" in result.output
    assert "Traceback" not in result.output


def test_a_congestion_control_without_a_lab_is_refused_with_the_reason() -> None:
    result = CliRunner().invoke(bench.app, ["allreduce", "--tcp-congestion", "cubic"])
    assert result.exit_code == 2
    assert "give --rate too" in result.output


@pytest.mark.parametrize("command", ["loop", "obs", "diloco", "transport"])
def test_an_out_path_that_cannot_be_written_is_refused_before_the_run(
    command: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The result went with a traceback after the whole run (5,000 steps for diloco).
    def never(**_: Any) -> Any:
        raise AssertionError("the benchmark ran")

    for runner in ("run_loop_bench", "run_obs_overhead_bench", "run_diloco_bench"):
        monkeypatch.setattr(bench, runner, never)
    monkeypatch.setattr(bench_transport, "run_transport_bench", never)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for out, fragment in ((tmp_path, "is a folder"), (a_file / "r.json", "is a file")):
        result = CliRunner().invoke(bench.app, [command, "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert f"--out: {out if fragment == 'is a folder' else a_file}" in result.output
        assert fragment in result.output
