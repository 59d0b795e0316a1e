"""`gossamer bench ...`: benchmark programs that report ratios against a reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gossamer.bench.loop import run_loop_bench
from gossamer.cli.errors import exit_on_gossamer_errors
from gossamer.core.config_loader import load_run_config, parse_flag_overrides

app = typer.Typer(help="Benchmarks: Gossamer against its reference, measured in the same run.")
_console = Console()


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
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
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(fields, indent=2) + "\n")
    if json_output:
        typer.echo(json.dumps(fields))
        return
    table = Table(
        title=f"one-peer loop, {steps} steps x {repeats} repeats, {result.threads} threads"
    )
    table.add_column("loop")
    table.add_column("tokens/s (median)", justify="right")
    table.add_column("runs", justify="right")
    table.add_row(
        "gossamer",
        f"{fields['gossamer_tokens_per_s']:,.0f}",
        ", ".join(f"{v:,.0f}" for v in result.gossamer_tokens_per_s),
    )
    table.add_row(
        "plain torch",
        f"{fields['plain_tokens_per_s']:,.0f}",
        ", ".join(f"{v:,.0f}" for v in result.plain_tokens_per_s),
    )
    _console.print(table)
    change = "slower" if result.ratio < 1 else "faster"
    _console.print(
        f"ratio gossamer / plain = {result.ratio:.3f}: Gossamer's loop is "
        f"{abs(fields['slowdown_percent']):.1f}% {change} (target: at most 5% slower)"
    )
