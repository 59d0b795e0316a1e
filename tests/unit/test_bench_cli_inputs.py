"""`gossamer bench ...`: impossible settings are refused up front, before any worker runs."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from gossamer.bench import allreduce as allreduce_bench
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
        # Two rounds a repeat under one round key, and repeat 0's two read as repeats 0 and 1.
        (["allreduce", "--codec", "none,int8,none"], "none named more than once"),
        (["allreduce", "--peers", "1"], "--peers"),
        (["allreduce", "--peers", "65"], "from 2 to 64"),  # (workers on this machine)
        (["allreduce", "--peers", "2,100", "--rate", "100mbit"], "from 2 to 64"),  # before 2 runs
        (["allreduce", "--peers", "2,64", "--size", "1GB"], "GB available"),  # before 2 runs
        (["allreduce", "--plot", "out.txt"], "ending in .png"),
        (["allreduce", "--plot", "/nonexistent/folder/out.png"], "is not a folder"),
        (["allreduce", "--repeats", "0"], "--repeats"),
        (["diloco", "--peers", "0"], "--peers"),
        # One peer averages nothing: "DiLoCo sends 0x fewer bytes than sync".
        (["diloco", "--peers", "1"], "--peers"),
        (["diloco", "--inner-steps", "0"], "--inner-steps"),
        (["diloco", "--steps", "0"], "--steps"),
        (["diloco", "--rate", "abc"], "'abc' is not a rate"),
        # The rows were labelled 4 streams and ran over 1; 65 streams was a traceback.
        (["transport", "--payload-mib", "8", "--streams", "4"], "at most 2 stream(s)"),
        (["transport", "--payload-mib", "300", "--streams", "65"], "at most 64 stream(s)"),
        (["transport", "--payload-mib", "2000"], "at most 1024 MiB"),
        # Refused only after the quality part, an hour or more, with a traceback.
        (["diloco", "--rate", "20mbit", "--peers", "1"], "--peers"),
        (["diloco", "--rate", "20mbit", "--thin-link-steps", "10"], "--thin-link-steps 10"),
    ],
)
def test_bad_bench_settings_are_refused_before_running(args: list[str], fragment: str) -> None:
    result = CliRunner().invoke(bench.app, args)
    output = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2, output
    assert fragment in output
    assert "Traceback" not in output


def test_a_run_that_would_not_fit_in_memory_is_refused_before_any_worker_starts() -> None:
    # 1000 GB: worker 0 died allocating it and worker 1 waited for it in the store for 600 s.
    with pytest.raises(ValueError, match="GB available"):
        allreduce_bench.run_allreduce_sweep(peers=2, size_bytes=10**12)


class _Stop(Exception):
    pass


def test_auto_averages_over_p2p_when_a_codec_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    # (the issue's own `--codec int8` with the default backend was refused: auto meant torch)
    seen: list[dict[str, Any]] = []

    def run_workers(placement: Any, options: dict[str, Any]) -> Any:
        seen.append(options)
        raise _Stop

    monkeypatch.setattr(allreduce_bench, "_run_workers", run_workers)
    with pytest.raises(_Stop):
        allreduce_bench.run_allreduce_sweep(peers=2, size_bytes=4096, codecs=["none", "int8"])
    assert seen[0]["backend"] == "p2p"


def test_transport_s_default_streams_fit_a_small_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, ...]] = []

    def run(**options: Any) -> Any:
        seen.append(options["streams"])
        raise _Stop

    monkeypatch.setattr(bench_transport, "run_transport_bench", run)
    CliRunner().invoke(bench.app, ["transport", "--payload-mib", "2"])
    CliRunner().invoke(bench.app, ["transport", "--payload-mib", "64"])
    assert seen == [(1,), (1, 4)]
