"""``gossamer bench allreduce``: wiring only (see gossamer.bench.allreduce)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Annotated

import typer

from gossamer.bench.allreduce import (
    AllReduceBenchResult,
    check_fits_in_memory,
    remove_abandoned_runs,
    run_allreduce_sweep,
    write_throughput_plot,
)
from gossamer.cli.errors import EXIT_FAILED, exit_on_gossamer_errors, stop_signals_as_ctrl_c
from gossamer.cli.preflight import expand_home
from gossamer.comm.codecs import codec_by_name
from gossamer.lab import parse_rate
from gossamer.lab.config import MAX_PEERS

__all__ = ["register"]

_UNITS = {
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "kib": 1024.0,
    "mib": 1024.0**2,
    "gib": 1024.0**3,
    "b": 1.0,
}


def _parse_size(text: str) -> int:
    """Bytes in ``text`` (``100MB``, ``64MiB``, ``4096``): at least one float32, finite."""
    lowered = text.strip().lower()
    number, scale = lowered, 1.0
    for unit in sorted(_UNITS, key=len, reverse=True):
        if lowered.endswith(unit):
            number, scale = lowered[: -len(unit)].strip(), _UNITS[unit]
            break
    try:
        size = float(number) * scale
    except ValueError:
        raise typer.BadParameter(
            f"size like 100MB, 64MiB or 4096, got {text!r}", param_hint="--size"
        ) from None
    if not math.isfinite(size) or size < 4:
        raise typer.BadParameter(
            f"{text!r} is not a size of at least 4 bytes (one float32); write e.g. 100MB",
            param_hint="--size",
        )
    return int(size)


def _check_codecs(codecs: list[str]) -> None:
    if not codecs:
        raise typer.BadParameter("name at least one codec, e.g. none", param_hint="--codec")
    repeated = sorted({name for name in codecs if codecs.count(name) > 1})
    if repeated:  # (its rounds would share round keys and its results run together)
        raise typer.BadParameter(
            f"{', '.join(repeated)} named more than once; name each codec once",
            param_hint="--codec",
        )
    for name in codecs:
        try:
            codec_by_name(name)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--codec") from None


def _check_plot_path(path: Path) -> None:
    """Refuse, before the run, a plot that could not be written after it."""
    if path.suffix.lower() != ".png":
        raise typer.BadParameter(
            f"a PNG file name ending in .png, got {str(path)!r}", param_hint="--plot"
        )
    folder = path.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise typer.BadParameter(
            f"{str(folder)!r} is not a folder this user can write", param_hint="--plot"
        )
    if importlib.util.find_spec("matplotlib") is None:
        raise typer.BadParameter(
            "needs matplotlib: pip install 'gossamer[plot]' (make test installs it)",
            param_hint="--plot",
        )


def register(app: typer.Typer) -> None:
    """Add the ``allreduce`` command to the bench Typer app."""

    @app.command("allreduce")
    def allreduce_command(
        peers: Annotated[
            str, typer.Option("--peers", help="Worker processes; several for a sweep: 2,3,4.")
        ] = "4",
        size: Annotated[str, typer.Option("--size", help="Tensor size (float32), e.g. 100MB.")] = (
            "100MB"
        ),
        rate: Annotated[
            str | None, typer.Option("--rate", help="Link rate, e.g. 100mbit (lab, root).")
        ] = None,
        codec: Annotated[
            str, typer.Option("--codec", help="none, fp16, bf16 or int8; several: none,int8.")
        ] = "none",
        backend: Annotated[str, typer.Option("--backend", help="auto, p2p or torch.")] = "auto",
        repeats: Annotated[
            int, typer.Option("--repeats", help="Timed repeats; figures are medians.", min=1)
        ] = 3,
        tcp_congestion: Annotated[
            str,
            typer.Option(
                "--tcp-congestion",
                help="TCP congestion control in the lab's namespaces (cubic, bbr, ...); "
                "default: the host's. Needs --rate.",
            ),
        ] = "",
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON, not a table.")] = False,
        plot: Annotated[
            Path | None,
            typer.Option(
                "--plot",
                help="Write a PNG of throughput by codec (needs matplotlib).",
                callback=expand_home,
            ),
        ] = None,
    ) -> None:
        """Time Gossamer's all-reduce against plain gloo on the same links, in one run."""
        # Every input is checked here, before any worker process is spawned.
        with exit_on_gossamer_errors():
            rate_bits = float(parse_rate(rate, key="--rate")) if rate else None
        codecs = [c.strip() for c in codec.split(",") if c.strip()]
        _check_codecs(codecs)
        size_bytes = _parse_size(size)
        try:
            counts = [int(p) for p in peers.split(",") if p.strip()]
        except ValueError:
            counts = []
        if not counts or min(counts) < 2 or max(counts) > MAX_PEERS:
            raise typer.BadParameter(
                f"a number from 2 to {MAX_PEERS} or a list like 2,4; got {peers!r}",
                param_hint="--peers",
            )
        try:  # (the largest count of a sweep, before its first runs)
            check_fits_in_memory(max(counts), size_bytes)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--size") from None
        if plot is not None:
            _check_plot_path(plot)
        try:
            with (
                stop_signals_as_ctrl_c(),
                exit_on_gossamer_errors(),
            ):  # a worker that failed: one line
                cleaned = remove_abandoned_runs(labs=rate_bits is not None)
                if cleaned:
                    typer.echo(cleaned, err=True)
                results = [
                    result
                    for count in counts
                    for result in run_allreduce_sweep(
                        peers=count,
                        size_bytes=size_bytes,
                        codecs=codecs,
                        backend=backend,
                        rate_bits_per_s=rate_bits,
                        repeats=repeats,
                        tcp_congestion_control=tcp_congestion,
                    )
                ]
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        if as_json:
            rows = [json.loads(r.to_json()) for r in results]
            typer.echo(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
            for result in results:  # (in the table already; stdout holds JSON only)
                warning = result.noise_warning()
                if warning:
                    typer.echo(warning, err=True)
        else:
            typer.echo("\n\n".join(r.table() for r in results))
        wrong = _name_wrong_results(results)  # (before a plot that may fail: both are said)
        if plot is not None:
            try:
                message = write_throughput_plot(results, plot)
            except OSError as exc:
                typer.echo(f"error: the plot could not be written: {exc}", err=True)
                raise typer.Exit(EXIT_FAILED) from exc
            typer.echo(message, err=True)
        if wrong:
            raise typer.Exit(EXIT_FAILED)


def _name_wrong_results(results: list[AllReduceBenchResult]) -> bool:
    """Say, after the figures, each round whose result was wrong, and whether there was one:
    the run then exits 1, as its timing measured nothing worth reporting (a round that
    skipped communication read 35x gloo's speed)."""
    problems = [p for p in (r.error_problem() for r in results) if p]
    for problem in problems:
        typer.echo(f"error: {problem}", err=True)
    return bool(problems)
