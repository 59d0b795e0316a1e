"""`gossamer bench ...`: benchmark programs that report ratios against a reference."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from gossamer.bench.diloco import QUALITY_DEFAULTS, run_diloco_bench
from gossamer.bench.diloco_thin_link import (
    ThinLinkResult,
    check_thin_link_inputs,
    run_thin_link_bench,
)
from gossamer.bench.loop import NOISY_SPREAD, PairSpread, run_loop_bench
from gossamer.bench.obs_overhead import run_obs_overhead_bench
from gossamer.cli.bench_allreduce import register as register_allreduce
from gossamer.cli.bench_transport import register as register_transport
from gossamer.cli.errors import (
    EXIT_INTERRUPTED,
    exit_on_gossamer_errors,
    stop_signals_as_ctrl_c,
)
from gossamer.cli.flags import command_flags, load_flagged_config
from gossamer.cli.output import stdout_console
from gossamer.cli.preflight import (
    check_result_file,
    expand_home,
    positive_finite_float,
    positive_seconds,
)
from gossamer.lab import parse_rate

app = typer.Typer(help="Benchmarks: Gossamer against its reference, measured in the same run.")
register_allreduce(app)
register_transport(app)
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


def _spread_lines(spread: PairSpread) -> list[str]:
    """The pairs' ratios beside a headline figure, and a warning when they disagree.

    The headline is one median; without the spread a user had no way to see that the pairs
    behind it ran 0.109 to 20.6 (a busy machine) and read "173% faster" as a measurement.
    """
    lines = [
        f"pair ratios {spread.smallest:.3f}..{spread.largest:.3f} over {len(spread.ratios)} "
        "pairs (each side measured back to back)"
    ]
    if spread.noisy:
        lines.append(
            f"warning: the pairs' ratios differ by more than {NOISY_SPREAD:g}x "
            f"({spread.smallest:.3f}..{spread.largest:.3f}): the machine was busy, so the "
            "median is not to be trusted; run again on a quiet machine"
        )
    return lines


def _warn_if_noisy(spread: PairSpread) -> None:
    """With --json (stdout holds JSON only), the warning goes to stderr."""
    if spread.noisy:
        typer.echo(_spread_lines(spread)[-1], err=True)


@app.command(context_settings=_OVERRIDES)
def loop(
    ctx: typer.Context,
    steps: Annotated[int, typer.Option(help="Measured steps per repeat.", min=1)] = 60,
    warmup_steps: Annotated[int, typer.Option(help="Unmeasured steps first.", min=1)] = 5,
    repeats: Annotated[int, typer.Option(help="Measurements per side (alternating).", min=1)] = 3,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
    out: Annotated[
        Path | None, typer.Option(help="Also write the JSON result here.", callback=expand_home)
    ] = None,
) -> None:
    """Gossamer's one-peer loop vs a plain PyTorch loop: same model, data, optimizer, process.

    Config flags (--model.width 256, ...) change both sides alike.
    """
    with exit_on_gossamer_errors(), stop_signals_as_ctrl_c():
        check_result_file(out, "--out")
        config = load_flagged_config(None, command_flags(ctx))
        result = run_loop_bench(
            config=config, steps=steps, warmup_steps=warmup_steps, repeats=repeats
        )
    fields = result.to_json()
    _write_json(fields, out)
    if json_output:
        typer.echo(json.dumps(fields))
        _warn_if_noisy(result.spread)
        return
    title = f"one-peer loop, {steps} steps x {repeats} repeats, {result.threads} threads"
    console = stdout_console()
    console.print(
        _runs_table(
            title,
            [
                ("gossamer", result.gossamer_tokens_per_s),
                ("plain torch", result.plain_tokens_per_s),
            ],
        )
    )
    change = "slower" if result.ratio < 1 else "faster"
    console.print(
        f"ratio gossamer / plain = {result.ratio:.3f}: Gossamer's loop is "
        f"{abs(fields['slowdown_percent']):.1f}% {change} (target: at most 5% slower)"
    )
    for line in _spread_lines(result.spread):
        console.print(line, markup=False)


@app.command(context_settings=_OVERRIDES)
def obs(
    ctx: typer.Context,
    steps: Annotated[int, typer.Option(help="Measured steps per repeat.", min=1)] = 60,
    warmup_steps: Annotated[int, typer.Option(help="Unmeasured steps first.", min=1)] = 5,
    repeats: Annotated[int, typer.Option(help="Measurements per side (alternating).", min=1)] = 3,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
    out: Annotated[
        Path | None, typer.Option(help="Also write the JSON result here.", callback=expand_home)
    ] = None,
) -> None:
    """What metrics and tracing cost training: the same run with both off and with both on."""
    with exit_on_gossamer_errors(), stop_signals_as_ctrl_c():
        check_result_file(out, "--out")
        config = load_flagged_config(None, command_flags(ctx))
        result = run_obs_overhead_bench(
            config=config, steps=steps, warmup_steps=warmup_steps, repeats=repeats
        )
    fields = result.to_json()
    _write_json(fields, out)
    if json_output:
        typer.echo(json.dumps(fields))
        _warn_if_noisy(result.spread)
        return
    title = f"observability overhead, {steps} steps x {repeats} repeats, {result.threads} threads"
    console = stdout_console()
    console.print(
        _runs_table(
            title,
            [
                ("metrics + tracing off", result.off_tokens_per_s),
                ("metrics + tracing on", result.full_tokens_per_s),
            ],
        )
    )
    console.print(f"overhead = {result.overhead_percent:+.2f}% of throughput (target: at most 2%)")
    for line in _spread_lines(result.spread):
        console.print(line, markup=False)


@app.command(context_settings=_OVERRIDES)
def diloco(
    ctx: typer.Context,
    peers: Annotated[
        int, typer.Option(help="Peers training together (2 at least: one averages nothing).", min=2)
    ] = 4,
    inner_steps: Annotated[
        int, typer.Option(help="DiLoCo's H: inner steps per outer step.", min=1)
    ] = 50,
    steps: Annotated[
        int,
        typer.Option(help="Inner steps per peer, for every method (5000: 100 outer steps).", min=1),
    ] = 5000,
    int8: Annotated[bool, typer.Option(help="Also run DiLoCo with the 8-bit codec.")] = True,
    overlap: Annotated[
        bool, typer.Option(help="Also run overlapped DiLoCo (swarm.overlap).")
    ] = True,
    rate: Annotated[
        str | None,
        typer.Option(
            "--rate", help="Also run the thin-link comparison at this link rate (lab, root)."
        ),
    ] = None,
    target_loss: Annotated[
        float,
        typer.Option(
            help="Thin link: the validation loss every method trains to.",
            callback=positive_finite_float,
        ),
    ] = 2.5,
    thin_link_steps: Annotated[
        int,
        typer.Option(
            help="Thin link: each method's step budget (its learning-rate schedule's length).",
            min=1,
        ),
    ] = 400,
    time_cap_s: Annotated[
        float,
        typer.Option(
            help="Thin link: longest one method runs before it is stopped.",
            callback=positive_seconds,
        ),
    ] = 180.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
    out: Annotated[
        Path | None, typer.Option(help="Also write the JSON result here.", callback=expand_home)
    ] = None,
) -> None:
    """DiLoCo vs synchronous data parallel on the same token budget: loss and bytes sent.

    Peers are threads of this process averaging through the same codecs as on the wire. With
    --rate, the peers then also run as processes in lab namespaces behind links of that rate, and
    DiLoCo, sync and plain PyTorch DDP (gloo, fp32 and with PyTorch's fp16 compression hook)
    are each timed to --target-loss, with the same
    H and the same --thin-link-steps budget. Both parts train a small GPT (2 layers, width 64,
    context 64, batch 8; with --rate see `thin_link.settings` in the JSON); config flags
    (--model.width 128, ...) change it for both, and --swarm.outer-lr /
    --swarm.outer-momentum set DiLoCo's outer optimizer (0.7 and 0.9). The quality part's
    default budget, 5000 steps, is 100 outer steps: DiLoCo's gap to sync narrows as outer steps
    accumulate (README, Benchmarks).
    """
    with exit_on_gossamer_errors(), stop_signals_as_ctrl_c():
        check_result_file(out, "--out")
        rate_bits = parse_rate(rate, key="--rate") if rate else None
        overrides = command_flags(ctx)
        config = load_flagged_config(None, [*QUALITY_DEFAULTS, *overrides], flags=overrides)
        if rate_bits is not None:  # before the quality part: it runs for an hour or more
            check_thin_link_inputs(
                peers=peers,
                target_loss=target_loss,
                inner_steps=inner_steps,
                max_steps=thin_link_steps,
                cap_s=time_cap_s,
            )
        methods = ["sync", "diloco", *(["diloco_overlap"] * overlap), *(["diloco_int8"] * int8)]
        # (it printed nothing for the first method's whole run, a minute or more)
        sys.stderr.write(
            f"training {peers} peers (threads of this process), {steps} steps each, "
            f"H = {inner_steps}, once per method: {', '.join(methods)}; Ctrl-C stops\n"
        )
        try:
            result = run_diloco_bench(
                config=config,
                peers=peers,
                inner_steps=inner_steps,
                steps=steps,
                with_int8=int8,
                with_overlap=overlap,
            )
        except KeyboardInterrupt:
            sys.stderr.write("stopped: the peers were stopped before the end; no result\n")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        thin: ThinLinkResult | None = None
        if rate_bits is not None:
            thin = run_thin_link_bench(
                rate_bits_per_s=rate_bits,
                peers=peers,
                target_loss=target_loss,
                inner_steps=inner_steps,
                max_steps=thin_link_steps,
                cap_s=time_cap_s,
                overrides=overrides,
            )
    fields = result.to_json()
    if thin is not None:
        fields.update(thin.to_json())
    _write_json(fields, out)
    if json_output:
        typer.echo(json.dumps(fields))
        return
    table = Table(
        title=f"{peers} peers, {steps} steps each ({result.tokens_per_peer:,} tokens per peer), "
        f"H = {inner_steps}, outer lr {fields['outer_lr']:g}, momentum {fields['outer_momentum']:g}"
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
            _seconds(method.seconds),
        )
    console = stdout_console()
    console.print(table)
    console.print(
        f"DiLoCo sends {fields['bytes_ratio_sync_over_diloco']:.0f}x fewer bytes than sync; "
        f"its loss is {fields['loss_gap_diloco_vs_sync_percent']:+.2f}% vs sync (target: within 3%)"
    )
    if "loss_gap_overlap_vs_diloco_percent" in fields:
        console.print(
            f"overlapped DiLoCo (swarm.overlap): loss "
            f"{fields['loss_gap_overlap_vs_diloco_percent']:+.2f}% vs DiLoCo"
        )
    if "loss_gap_int8_vs_diloco_percent" in fields:
        console.print(
            f"8-bit codec: loss {fields['loss_gap_int8_vs_diloco_percent']:+.2f}% vs fp32 DiLoCo "
            "(target: at most +1%)"
        )
    if thin is not None:
        _print_thin_link(thin, rate or "")


def _seconds(seconds: float) -> str:
    """Whole seconds for long runs; one decimal under 10 s, where "3" hid 2.6 against 3.4."""
    return f"{seconds:.1f}" if seconds < 10 else f"{seconds:.0f}"


def _print_thin_link(thin: ThinLinkResult, rate: str) -> None:
    table = Table(
        title=f"thin link: {thin.peers} peer processes on {rate} links, time to validation "
        f"loss {thin.target_loss} (cap {thin.cap_s:.0f} s, {thin.max_steps} steps, "
        f"H = {thin.inner_steps})"
    )
    for column in ("method", "seconds to target", "steps", "best loss", "utilization (min)"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for method in thin.methods.values():
        seconds = method.seconds_to_target
        shares = [u for u in method.utilization.values() if u is not None]
        table.add_row(
            method.name,
            f"{seconds:.1f}" if seconds is not None else f"not reached ({method.wall_s:.0f} s)",
            str(method.steps_to_target if method.steps_to_target is not None else method.last_step),
            f"{method.best_val_loss:.4f}" if method.best_val_loss is not None else "-",
            f"{min(shares):.0%}" if shares else "-",
        )
    console = stdout_console()
    console.print(table)
    for method in thin.methods.values():
        if method.error:
            console.print(f"{method.name} failed: {method.error}", markup=False)
    for name, label in (("diloco", "DiLoCo"), ("diloco_overlap", "Overlapped DiLoCo")):
        for reference in ("ddp", "ddp_fp16", "sync"):
            speedup = thin.speedup_over(reference, name)
            if speedup is not None:
                bound = " at least" if thin.speedup_is_lower_bound(reference, name) else ""
                console.print(
                    f"{label} reaches the target{bound} {speedup:.1f}x faster than {reference}"
                )
    console.print(
        "targets: DiLoCo at least 5x faster than DDP, compute utilization at least 90% on every "
        "peer; latency is not emulated in the lab (docs/lab.md)"
    )
