"""``gossamer bench transport``: wiring only (see gossamer.bench.transport)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gossamer.bench.transport import run_transport_bench
from gossamer.cli.errors import exit_on_gossamer_errors, stop_signals_as_ctrl_c
from gossamer.cli.output import stdout_console
from gossamer.cli.preflight import check_result_file, expand_home
from gossamer.core.errors import ConfigError
from gossamer.net.config import LimitsConfig

__all__ = ["register"]

_MiB = 1 << 20
_MAX_STREAMS = 64
"""Streams of one transfer at most (net's bulk receiver refuses more)."""


def _stream_counts(payload_mib: int, streams: list[int] | None) -> tuple[int, ...]:
    """The stream counts to measure (1 and 4 by default, fewer where the payload has fewer
    chunks): a transfer runs over at most one stream per chunk and 64 in all, so a row
    labelled with more was run over fewer.

    Raises:
        ConfigError: a count over that, or a payload over net's largest transfer (which every
            peer refuses).
    """
    limits = LimitsConfig()
    if payload_mib * _MiB > limits.max_bulk_transfer_bytes:
        raise ConfigError(
            f"--payload-mib {payload_mib}: a transfer holds at most "
            f"{limits.max_bulk_transfer_bytes // _MiB} MiB"
        )
    most = max(1, min(_MAX_STREAMS, payload_mib * _MiB // limits.bulk_chunk_bytes))
    counts = tuple(streams or sorted({1, min(4, most)}))
    for count in counts:
        if count > most:
            raise ConfigError(
                f"--streams {count}: a {payload_mib} MiB transfer runs over at most {most} "
                f"stream(s) (one per {limits.bulk_chunk_bytes // _MiB} MiB chunk, "
                f"{_MAX_STREAMS} in all); give fewer streams or a larger --payload-mib"
            )
    return counts


def transport(
    payload_mib: Annotated[int, typer.Option(help="MiB per transfer.", min=1)] = 64,
    streams: Annotated[
        list[int] | None, typer.Option(help="Parallel streams (repeatable).", min=1)
    ] = None,
    repeats: Annotated[
        int, typer.Option(help="Transfers per setting; the best counts.", min=1)
    ] = 3,
    pings: Annotated[int, typer.Option(help="RPC round trips measured.", min=1)] = 300,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
    out: Annotated[
        Path | None, typer.Option(help="Also write the JSON result here.", callback=expand_home)
    ] = None,
) -> None:
    """Bulk stream throughput vs plain TCP on loopback (same bytes, same run), RPC p50/p99."""
    with exit_on_gossamer_errors(), stop_signals_as_ctrl_c():
        check_result_file(out, "--out")
        result = run_transport_bench(
            payload_bytes=payload_mib * _MiB,
            streams=_stream_counts(payload_mib, streams),
            repeats=repeats,
            num_pings=pings,
        )
    fields = result.to_json()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(fields, indent=2) + "\n")
    if json_output:
        typer.echo(json.dumps(fields))
        return
    from rich.table import Table

    table = Table(title=f"transport on loopback, {payload_mib} MiB per transfer")
    for column in ("what", "MiB/s", "ratio to TCP"):
        table.add_column(column, justify="right")
    for num_streams, rate in result.stream_bytes_per_s.items():
        ratio = rate / result.tcp_bytes_per_s
        table.add_row(f"gossamer, {num_streams} streams", f"{rate / _MiB:,.0f}", f"{ratio:.3f}")
    table.add_row("plain TCP", f"{result.tcp_bytes_per_s / _MiB:,.0f}", "1.000")
    stdout_console().print(table)
    typer.echo(
        f"RPC round trip: p50 {result.rpc_p50_s * 1e3:.2f} ms, p99 {result.rpc_p99_s * 1e3:.2f} ms"
    )


def register(app: typer.Typer) -> None:
    """Add the ``transport`` command to the bench app."""
    app.command("transport")(transport)
