"""How the all-reduce bench judges its figures: paired ratios to gloo, a wrong result, the ring
bound of a compressing codec (no workers run: their result files are made up here)."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gossamer.bench import allreduce as allreduce_bench
from gossamer.bench import loop
from gossamer.bench.allreduce import (
    NOISY_SPREAD,
    AllReduceBenchResult,
    error_tolerance,
    run_allreduce_sweep,
)
from gossamer.bench.allreduce_worker import _round_order, _worst_error
from gossamer.cli import bench, bench_allreduce


def _worker_row(
    seconds: dict[str, list[float]],
    gloo: list[float],
    errors: dict[str, float] | None = None,
    input_absmax: float = 5.0,
) -> dict[str, Any]:
    """A worker's result file (see ``_p2p_rounds``) with these times, per codec and gloo's."""
    repeats = len(gloo)
    codecs = {
        codec: {
            "seconds": each,
            "cpu": [0.5] * repeats,
            "link": [1_000_000] * repeats,
            "wire": [4_000_000] * repeats,
            "error": (errors or {}).get(codec, 0.0),
            "memory": 0,
            "ring_left": [],
        }
        for codec, each in seconds.items()
    }
    return {
        "gloo": gloo,
        "gloo_cpu": [0.1] * repeats,
        "gloo_link": [1_000_000] * repeats,
        "gloo_memory": 0,
        "codecs": codecs,
        "tcp_congestion_control": "",
        "input_absmax": input_absmax,
    }


@contextlib.contextmanager
def _loopback(*_: Any, **__: Any) -> Iterator[allreduce_bench._Placement]:
    yield allreduce_bench._Placement(["127.0.0.1"] * 2, ["", ""], [[], []])


def _sweep(
    monkeypatch: pytest.MonkeyPatch, rows: list[dict[str, Any]], **options: Any
) -> list[AllReduceBenchResult]:
    monkeypatch.setattr(allreduce_bench, "_run_workers", lambda placement, opts: rows)
    monkeypatch.setattr(allreduce_bench, "_placement", _loopback)  # (a rate needs no lab here)
    monkeypatch.setattr(allreduce_bench, "aes_gcm_bytes_per_s", lambda: 1e10)
    settings: dict[str, Any] = {"peers": 2, "size_bytes": 4_000_000, "backend": "p2p", "repeats": 1}
    return run_allreduce_sweep(**(settings | options))


def test_speedup_is_the_median_of_ratios_paired_by_repeat_with_their_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Repeat by repeat the two sides run alike (the machine slows down and speeds up under
    # both), but the two medians fall on different repeats: their ratio read 0.67x.
    gloo = [1.0, 3.0, 2.0]
    ours = [1.0, 3.0, 4.0]
    rows = [_worker_row({"none": ours}, gloo), _worker_row({"none": ours}, gloo)]
    (result,) = _sweep(monkeypatch, rows, repeats=3)
    assert result.speedup_vs_gloo == pytest.approx(1.0)  # ratios 1.0, 1.0, 0.5
    assert result.speedup_vs_gloo_range == pytest.approx([0.5, 1.0])
    assert (result.seconds, result.gloo_seconds) == (3.0, 2.0)  # (the medians stay)
    assert "speedup           1.00x vs gloo (median of the repeats' ratios, 0.50..1.00x)" in (
        result.table()
    )
    assert json.loads(result.to_json())["speedup_vs_gloo_range"] == [0.5, 1.0]
    assert "warning" not in result.table()  # (within twice: no warning)


def test_ratios_more_than_twice_apart_are_warned_of_as_bench_loop_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert NOISY_SPREAD == loop.NOISY_SPREAD  # (not imported: one threshold all the same)
    rows = [_worker_row({"none": [1.0, 1.0, 1.0]}, [0.5, 1.2, 1.0])] * 2
    (result,) = _sweep(monkeypatch, rows, repeats=3)
    assert result.noisy
    assert (
        "  warning: the repeats' ratios to gloo differ by more than 2x (0.50..1.20x, codec "
        "none): the machine was busy, so the median is not to be trusted; run again on a quiet "
        "machine"
    ) in result.table().splitlines()


def test_gloo_goes_first_in_even_repeats_and_last_in_odd_ones() -> None:
    # Gloo was always first: a control timing gloo's same work twice read 1.08x at 100 MB.
    assert _round_order(0, ["none", "int8"]) == [None, "none", "int8"]
    assert _round_order(1, ["none", "int8"]) == ["none", "int8", None]
    assert _round_order(2, ["none"]) == [None, "none"]
    assert _round_order(3, ["none"]) == ["none", None]


def test_a_compressing_codec_has_no_share_of_the_fp32_ring_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # int8 sends a quarter of the bound's bytes: "322.6% of the ring bound" read as a figure.
    rows = [_worker_row({"none": [1.0], "int8": [0.25]}, [1.0])] * 2
    plain, int8 = _sweep(monkeypatch, rows, codecs=["none", "int8"], rate_bits_per_s=32e6)
    assert plain.ring_bound_seconds == pytest.approx(1.0)  # 2(N-1)/N * 4 MB * 8 / 32 Mbit/s
    assert plain.share_of_bound == pytest.approx(1.0)
    assert int8.share_of_bound is None
    assert int8.gloo_share_of_bound == pytest.approx(1.0)
    assert json.loads(int8.to_json())["share_of_bound"] is None
    assert (
        "  ring bound    n/a for int8 (the bound counts fp32 bytes); gloo 100.0% of 1.00 s"
        in int8.table().splitlines()
    )
    assert "  ring bound    100.0% (gloo 100.0%) of 1.00 s" in plain.table().splitlines()


def test_each_codec_s_tolerance_holds_its_honest_error_and_not_a_wrong_round() -> None:
    # 20 MB of randn: the largest magnitude about 5.3; measured honest errors (2 and 4 peers)
    # fp32 under 1e-6, int8 about 0.02; a round that skipped communication is off by about 4.
    scale = 5.3
    none, fp16, bf16, int8 = (error_tolerance(c, scale) for c in ("none", "fp16", "bf16", "int8"))
    assert none is not None
    assert 1e-6 < none < 1e-4
    assert fp16 is not None
    assert 2 * 2**-11 * scale < fp16 < 0.02
    assert bf16 is not None
    assert 2 * 2**-8 * scale < bf16 < 0.2
    assert int8 is not None
    assert 2 * scale / 254 < int8 < 0.1
    assert error_tolerance("none", 0.0) == pytest.approx(1e-6)  # (all zeros: a floor)
    assert error_tolerance("mine", scale) is None  # (a codec registered elsewhere: unknown)


def test_a_result_off_by_more_than_its_tolerance_or_not_finite_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = [_worker_row({"none": [1.0]}, [1.0], errors={"none": 3e-7}, input_absmax=5.0)] * 2
    (honest,) = _sweep(monkeypatch, rows)
    assert honest.error_tolerance == pytest.approx(5.1e-5)
    assert honest.error_problem() is None
    assert "max |error|   3.00e-07 vs gloo's mean (tolerance 5.10e-05)" in honest.table()
    wrong = replace(honest, max_abs_error_vs_gloo=3.9)
    assert wrong.error_problem() == (
        "Gossamer's result is wrong (2 peers, backend p2p, codec none): its largest difference "
        "from gloo's mean is 3.9, past its tolerance 5.1e-05"
    )
    nan = replace(honest, max_abs_error_vs_gloo=math.inf, error_tolerance=None)
    assert "is not finite (NaN or infinite values), past any tolerance" in str(nan.error_problem())


def test_a_figure_that_is_not_finite_is_null_in_json() -> None:
    # json.dumps wrote `Infinity`, which no JSON parser but Python's reads.
    result = replace(_honest_result(), max_abs_error_vs_gloo=math.inf, all_seconds=[math.nan])

    def refuse(constant: str) -> None:
        raise AssertionError(f"not JSON: {constant}")

    parsed = json.loads(result.to_json(), parse_constant=refuse)
    assert parsed["max_abs_error_vs_gloo"] is None
    assert parsed["all_seconds"] == [None]


def test_a_worst_error_keeps_a_nan_seen_after_a_finite_one() -> None:
    # (max(0.0, nan) is 0.0: the torch backend's rounds lost a NaN that way)
    torch = pytest.importorskip("torch")
    reference = torch.zeros(4)
    result = torch.tensor([0.0, 0.5, math.nan, 0.0])
    assert _worst_error(0.0, result, reference) == math.inf
    assert _worst_error(0.25, torch.full((4,), 0.5), reference) == 0.5


def _honest_result() -> AllReduceBenchResult:
    return AllReduceBenchResult(
        peers=2, size_bytes=4_000_000, codec="none", backend="p2p", rate_bits_per_s=None,
        seconds=1.0, gloo_seconds=1.0, speedup_vs_gloo=1.0, speedup_vs_gloo_range=[0.9, 1.1],
        algorithm_bandwidth_bytes_per_s=4e6, share_of_bound=None, gloo_share_of_bound=None,
        ring_bound_seconds=None, wire_bytes_per_peer=4_000_000, header_overhead=0.0,
        max_abs_error_vs_gloo=2e-7, repeats=1, all_seconds=[1.0], all_gloo_seconds=[1.0],
        error_tolerance=5.1e-5,
    )  # fmt: skip


@pytest.mark.parametrize("as_json", [False, True])
def test_the_command_prints_the_figures_then_fails_on_a_wrong_result(
    monkeypatch: pytest.MonkeyPatch, as_json: bool
) -> None:
    # A round that skipped communication exited 0 with "speedup_vs_gloo": 35.3.
    wrong = replace(_honest_result(), max_abs_error_vs_gloo=3.9, speedup_vs_gloo=35.3)
    monkeypatch.setattr(bench_allreduce, "run_allreduce_sweep", lambda **_: [wrong])
    monkeypatch.setattr(bench_allreduce, "remove_abandoned_runs", lambda **_: None)
    args = ["allreduce", "--peers", "2", "--size", "4MB", "--backend", "p2p"]
    result = CliRunner().invoke(bench.app, args + (["--json"] if as_json else []))
    assert result.exit_code == 1, result.output
    assert "35.3" in result.stdout  # the figures first
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {wrong.error_problem()}"]
    if as_json:
        assert json.loads(result.stdout)["max_abs_error_vs_gloo"] == 3.9


def test_a_plot_that_fails_after_a_wrong_result_leaves_the_wrong_round_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The plot was written first, and its failure exited before the wrong round was named.
    wrong = replace(_honest_result(), max_abs_error_vs_gloo=3.9, speedup_vs_gloo=35.3)
    monkeypatch.setattr(bench_allreduce, "run_allreduce_sweep", lambda **_: [wrong])
    monkeypatch.setattr(bench_allreduce, "remove_abandoned_runs", lambda **_: None)
    monkeypatch.setattr(bench_allreduce, "_check_plot_path", lambda _: None)

    def fail_to_plot(*_: object) -> str:
        raise OSError("No space left on device")

    monkeypatch.setattr(bench_allreduce, "write_throughput_plot", fail_to_plot)
    args = ["allreduce", "--peers", "2", "--size", "4MB", "--backend", "p2p"]
    result = CliRunner().invoke(bench.app, [*args, "--plot", str(tmp_path / "t.png")])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {wrong.error_problem()}",
        "error: the plot could not be written: No space left on device",
    ]


def test_the_command_succeeds_on_a_right_result_and_warns_of_noise_on_stderr_with_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    noisy = replace(_honest_result(), speedup_vs_gloo_range=[0.4, 1.2])
    monkeypatch.setattr(bench_allreduce, "run_allreduce_sweep", lambda **_: [noisy])
    monkeypatch.setattr(bench_allreduce, "remove_abandoned_runs", lambda **_: None)
    args = ["allreduce", "--peers", "2", "--size", "4MB", "--backend", "p2p", "--json"]
    result = CliRunner().invoke(bench.app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["speedup_vs_gloo_range"] == [0.4, 1.2]
    assert result.stderr.strip() == noisy.noise_warning()
