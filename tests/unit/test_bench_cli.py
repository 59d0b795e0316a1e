"""`gossamer bench`: diloco's defaults, what loop and obs print beside their headline, inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gossamer.bench.diloco import DiLoCoBenchResult, MethodResult, bench_diloco_config
from gossamer.bench.loop import LoopBenchResult
from gossamer.bench.obs_overhead import ObsOverheadResult
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
    # 16 validation batches of 16 sequences: the 256 its figures were measured on (as 32 batches
    # of 8 before validation batches were 16 sequences whatever the batch size; 32 took 512)
    assert config.train.eval_batches == 16


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


def _fake_loop_and_obs(monkeypatch: pytest.MonkeyPatch, off: list[float], on: list[float]) -> None:
    """Both benches answer with these timings instead of training (the loop: plain = off)."""

    def fake_loop(**_: Any) -> LoopBenchResult:
        return LoopBenchResult(
            gossamer_tokens_per_s=on, plain_tokens_per_s=off, steps=60, tokens_per_step=2048,
            threads=2,
        )  # fmt: skip

    def fake_obs(**_: Any) -> ObsOverheadResult:
        return ObsOverheadResult(off_tokens_per_s=off, full_tokens_per_s=on, steps=60, threads=2)

    monkeypatch.setattr(bench, "run_loop_bench", fake_loop)
    monkeypatch.setattr(bench, "run_obs_overhead_bench", fake_obs)


@pytest.mark.parametrize("command", ["loop", "obs"])
def test_a_headline_from_pairs_that_disagree_comes_with_their_spread_and_a_warning(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Seen under shared load: pairs at 0.109..20.6 gave "173% faster" and nothing else.
    _fake_loop_and_obs(
        monkeypatch,
        off=[28003.0, 4428.0, 1282.0, 27371.0, 10043.0],
        on=[3041.0, 26312.0, 26351.0, 26604.0, 27454.0],
    )
    result = CliRunner().invoke(bench.app, [command])
    assert result.exit_code == 0, result.output
    assert "pair ratios 0.109..20.555 over 5 pairs" in result.output
    assert "warning: the pairs' ratios differ by more than 2x (0.109..20.555)" in result.output
    assert "not to be trusted" in result.output

    result = CliRunner().invoke(bench.app, [command, "--json"])
    assert result.exit_code == 0, result.output
    fields = json.loads(result.stdout)
    assert fields["noisy"] is True
    assert fields["pair_ratio_min"] == pytest.approx(0.1086, abs=1e-4)
    assert fields["pair_ratio_max"] == pytest.approx(20.555, abs=1e-3)
    assert "not to be trusted" in result.stderr


@pytest.mark.parametrize("command", ["loop", "obs"])
def test_pairs_that_agree_show_their_spread_without_a_warning(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_loop_and_obs(monkeypatch, off=[27000.0, 26800.0], on=[26000.0, 26500.0])
    result = CliRunner().invoke(bench.app, [command])
    assert result.exit_code == 0, result.output
    assert "pair ratios 0.963..0.989 over 2 pairs" in result.output
    assert "warning" not in result.output
    result = CliRunner().invoke(bench.app, [command, "--json"])
    assert json.loads(result.stdout)["noisy"] is False
    assert result.stderr == ""


def test_the_diloco_table_shows_tenths_of_a_second_on_short_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A 2.6 s method and a 3.4 s one both read "3" before.
    def fake_bench(*, config: RunConfig, peers: int, inner_steps: int, **_: Any) -> Any:
        short = MethodResult(name="sync", val_loss=2.0, bytes_per_peer=1, seconds=2.6)
        long = MethodResult(name="diloco", val_loss=2.0, bytes_per_peer=1, seconds=1234.4)
        return DiLoCoBenchResult(
            peers=peers, inner_steps=inner_steps, steps=8, tokens_per_peer=1,
            methods={"sync": short, "diloco": long}, outer=bench_diloco_config(config, inner_steps),
        )  # fmt: skip

    monkeypatch.setattr(bench, "run_diloco_bench", fake_bench)
    result = CliRunner().invoke(bench.app, ["diloco"])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if "│" in line}
    assert rows["sync"].rstrip(" │").endswith("2.6")
    assert rows["diloco"].rstrip(" │").endswith("1234")
