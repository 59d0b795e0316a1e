"""``gossamer bench allreduce``: wiring only (see gossamer.bench.allreduce)."""

from __future__ import annotations

from typing import Annotated

import typer

from gossamer.bench.allreduce import run_allreduce_bench
from gossamer.lab import parse_rate

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
    lowered = text.strip().lower()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if lowered.endswith(unit):
            number = lowered[: -len(unit)].strip()
            try:
                return int(float(number) * _UNITS[unit])
            except ValueError:
                break
    try:
        return int(lowered)
    except ValueError:
        raise typer.BadParameter(f"size like 100MB, 64MiB or 4096, got {text!r}") from None


def register(app: typer.Typer) -> None:
    """Add the ``allreduce`` command to the bench Typer app."""

    @app.command("allreduce")
    def allreduce_command(
        peers: Annotated[int, typer.Option("--peers", help="Worker processes.")] = 4,
        size: Annotated[str, typer.Option("--size", help="Tensor size (float32), e.g. 100MB.")] = (
            "100MB"
        ),
        rate: Annotated[
            str | None, typer.Option("--rate", help="Link rate, e.g. 100mbit (lab, root).")
        ] = None,
        codec: Annotated[str, typer.Option("--codec", help="none, fp16, bf16 or int8.")] = "none",
        backend: Annotated[str, typer.Option("--backend", help="auto, p2p or torch.")] = "auto",
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON, not a table.")] = False,
    ) -> None:
        """Time Gossamer's all-reduce against plain gloo on the same links, in one run."""
        rate_bits = float(parse_rate(rate)) if rate else None
        try:
            result = run_allreduce_bench(
                peers=peers,
                size_bytes=_parse_size(size),
                codec=codec,
                backend=backend,
                rate_bits_per_s=rate_bits,
            )
        except NotImplementedError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(2) from exc
        typer.echo(result.to_json() if as_json else result.table())
