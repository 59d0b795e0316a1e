"""`gossamer bench ...`: benchmark programs that report ratios against a reference."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gossamer.bench.diloco import run_diloco_bench
from gossamer.bench.loop import run_loop_bench
from gossamer.bench.obs_overhead import run_obs_overhead_bench
from gossamer.cli.bench_allreduce import register as register_allreduce
from gossamer.cli.bench_transport import register as register_transport
from gossamer.cli.errors import exit_on_gossamer_errors
from gossamer.core.config_loader import load_run_config, parse_flag_overrides

app = typer.Typer(help="Benchmarks: Gossamer against its reference, measured in the same run.")
register_allreduce(app)
register_transport(app)
_console = Console()
_OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}


def _write_json(fields: dict[str, Any], out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(fields, indent=2) + "\n")


def _runs_table(title: str, rows: list[tuple[str, list[float]]]) -> Table:
    table = Table(title=title)
    table.add_column("variant")
    table.add_column("tokens/s (median)", justify="right")
    table.add_column("runs", justify="right")
    for name, runs in rows:
        table.add_row(name, f"{statistics.median(runs):,.0f}", ", ".join(f"{v:,.0f}" for v in runs))
    return table


@app.command(context_settings=_OVERRIDES)
def loop(
    ctx: typer.Context,
    steps: Annotated[int, typer.Option(help="Measured steps per repeat.")] = 60,
    warmup_steps: Annotated[int, typer.Option(help="Unmeasured steps first.")] = 5,
    repeats: Annotated[int, typer.Option(help="Measurements per side (alternating).")] = 3,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON result here.")] = None,
) -> None:
    """Gossamer's one-peer loop vs a plain PyTorch loop: same model, data, optimizer, process.

    Config flags (--model.width 256, ...) change both sides alike.
    """
    with exit_on_gossamer_errors():
        config = load_run_config(None, parse_flag_overrides(ctx.args))
        result = run_loop_bench(
            config=config, steps=steps, warmup_steps=warmup_steps, repeats=repeats
        )
    fields = result.to_json()
    _write_json(fields, out)
    if json_output:
        typer.echo(json.dumps(fields))
        return
    title = f"one-peer loop, {steps} steps x {repeats} repeats, {result.threads} threads"
    _console.print(
        _runs_table(
            title,
            [
                ("gossamer", result.gossamer_tokens_per_s),
                ("plain torch", result.plain_tokens_per_s),
            ],
        )
    )
    change = "slower" if result.ratio < 1 else "faster"
    _console.print(
        f"ratio gossamer / plain = {result.ratio:.3f}: Gossamer's loop is "
        f"{abs(fields['slowdown_percent']):.1f}% {change} (target: at most 5% slower)"
    )


@app.command(context_settings=_OVERRIDES)
def obs(
    ctx: typer.Context,
    steps: Annotated[int, typer.Option(help="Measured steps per repeat.")] = 60,
    warmup_steps: Annotated[int, typer.Option(help="Unmeasured steps first.")] = 5,
    repeats: Annotated[int, typer.Option(help="Measurements per side (alternating).")] = 3,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON result here.")] = None,
) -> None:
    """What metrics and tracing cost training: the same run with both off and with both on."""
    with exit_on_gossamer_errors():
        config = load_run_config(None, parse_flag_overrides(ctx.args))
        result = run_obs_overhead_bench(
            config=config, steps=steps, warmup_steps=warmup_steps, repeats=repeats
        )
    fields = result.to_json()
    _write_json(fields, out)
    if json_output:
        typer.echo(json.dumps(fields))
        return
    title = f"observability overhead, {steps} steps x {repeats} repeats, {result.threads} threads"
    _console.print(
        _runs_table(
            title,
            [
                ("metrics + tracing off", result.off_tokens_per_s),
                ("metrics + tracing on", result.full_tokens_per_s),
            ],
        )
    )
    _console.print(f"overhead = {result.overhead_percent:+.2f}% of throughput (target: at most 2%)")


@app.command(context_settings=_OVERRIDES)
def diloco(
    ctx: typer.Context,
    peers: Annotated[int, typer.Option(help="Peers training together.")] = 4,
    inner_steps: Annotated[int, typer.Option(help="DiLoCo's H: inner steps per outer step.")] = 50,
    steps: Annotated[int, typer.Option(help="Inner steps per peer, for every method.")] = 400,
    int8: Annotated[bool, typer.Option(help="Also run DiLoCo with the 8-bit codec.")] = True,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON result here.")] = None,
) -> None:
    """DiLoCo vs synchronous data parallel on the same token budget: loss and bytes sent.

    Peers are threads of this process averaging through the same codecs as on the wire; the
    thin-link comparison (`--rate`) needs the lab and is not part of this command yet.
    """
    with exit_on_gossamer_errors():
        config = load_run_config(None, parse_flag_overrides(ctx.args))
        result = run_diloco_bench(
            config=config, peers=peers, inner_steps=inner_steps, steps=steps, with_int8=int8
        )
    fields = result.to_json()
    _write_json(fields, out)
    if json_output:
        typer.echo(json.dumps(fields))
        return
    table = Table(
        title=f"{peers} peers, {steps} steps each ({result.tokens_per_peer:,} tokens per peer), "
        f"H = {inner_steps}"
    )
    table.add_column("method")
    table.add_column("validation loss", justify="right")
    table.add_column("bytes sent per peer", justify="right")
    table.add_column("seconds", justify="right")
    for method in result.methods.values():
        table.add_row(
            method.name,
            f"{method.val_loss:.4f}",
            f"{method.bytes_per_peer:,}",
            f"{method.seconds:.0f}",
        )
    _console.print(table)
    _console.print(
        f"DiLoCo sends {fields['bytes_ratio_sync_over_diloco']:.0f}x fewer bytes than sync; "
        f"its loss is {fields['loss_gap_diloco_vs_sync_percent']:+.2f}% vs sync (target: within 3%)"
    )
    if "loss_gap_int8_vs_diloco_percent" in fields:
        _console.print(
            f"8-bit codec: loss {fields['loss_gap_int8_vs_diloco_percent']:+.2f}% vs fp32 DiLoCo "
            "(target: at most +1%)"
        )
