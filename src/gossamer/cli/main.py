"""The `gossamer` command."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from gossamer._version import __version__
from gossamer.cli import bench, dashboard, lab, peer, trace, train

app = typer.Typer(
    name="gossamer",
    help="Train PyTorch models on machines that are heterogeneous, unreliable and far apart.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
train.register(app)
app.add_typer(bench.app, name="bench")
app.add_typer(lab.app, name="lab")
app.add_typer(trace.app, name="trace")
peer.register(app)
dashboard.register(app)


@app.callback()
def _configure(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress lines.")] = False,
) -> None:
    """Train PyTorch models on machines that are heterogeneous, unreliable and far apart."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def version() -> None:
    """Print Gossamer's version."""
    typer.echo(__version__)


def main() -> None:
    """Entry point of the `gossamer` console script."""
    app()
