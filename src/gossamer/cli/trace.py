"""`gossamer trace export`: spans recorded by a peer as a Chrome trace / Perfetto file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gossamer.cli.preflight import expand_home, expand_homes
from gossamer.obs.trace import export_chrome_trace, read_spans

app = typer.Typer(help="Timelines of where a peer's time went.")


@app.command()
def export(
    spans: Annotated[
        list[Path],
        typer.Argument(
            help="JSON-lines spans (from `train --trace FILE`): one file, or several (a "
            "swarm's peers, or FILE.1 and FILE of one peer) drawn on one timeline.",
            callback=expand_homes,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Chrome trace JSON to write.", callback=expand_home),
    ] = (Path("trace.json")),
) -> None:
    """Convert spans to Chrome trace JSON; open it in Perfetto or chrome://tracing."""
    recorded = []
    for path in spans:
        if not path.is_file():
            typer.echo(
                f"error: no spans file at {path}; record one with `gossamer train --trace`",
                err=True,
            )
            raise typer.Exit(2)
        if output.exists() and output.resolve() == path.resolve():
            typer.echo(
                f"error: -o {output} is the spans file itself, which the trace would replace; "
                "write the trace to another file",
                err=True,
            )
            raise typer.Exit(2)
        try:
            recorded += read_spans(path)
        except UnicodeDecodeError as exc:
            typer.echo(f"error: {path} is not a spans file (it is not UTF-8 text)", err=True)
            raise typer.Exit(2) from exc
        except OSError as exc:
            typer.echo(f"error: cannot read {path}: {exc.strerror or exc}", err=True)
            raise typer.Exit(2) from exc
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
    try:
        output.write_text(json.dumps(export_chrome_trace(recorded), allow_nan=False))
    except OSError as exc:
        typer.echo(f"error: cannot write {output}: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"{len(recorded)} spans written to {output}")
