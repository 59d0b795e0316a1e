"""The `gossamer` command.

Commands that only speak to the network (``peer``, ``peers``, ``doctor``, ``lab``, ``trace``,
``dashboard``) load without the training and benchmark commands, which import torch: a peer's
``gossamer doctor`` answered after seconds of imports (tens of seconds with a cold file cache)
before it did anything.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from gossamer._version import __version__

__all__ = ["build_app", "main"]

_WITHOUT_TORCH = frozenset({"peer", "peers", "doctor", "lab", "trace", "dashboard", "version"})
"""Commands whose modules import no torch."""


def build_app(command: str | None = None) -> typer.Typer:
    """The root command with every subcommand, or, for one of the commands that need no torch,
    with only those (``command``: the subcommand asked for; None: all, e.g. for --help)."""
    from gossamer.cli import dashboard, lab, peer, trace

    app = typer.Typer(
        name="gossamer",
        help="Train PyTorch models on machines that are heterogeneous, unreliable and far apart.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    if command not in _WITHOUT_TORCH:
        from gossamer.cli import bench, train

        train.register(app)
        app.add_typer(bench.app, name="bench")
    app.add_typer(lab.app, name="lab")
    app.add_typer(trace.app, name="trace")
    peer.register(app)
    dashboard.register(app)

    @app.callback()
    def _configure(
        verbose: Annotated[
            bool, typer.Option("--verbose", "-v", help="Log progress lines.")
        ] = False,
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

    return app


def _command_asked(argv: Sequence[str]) -> str | None:
    """The subcommand in ``argv`` (the first word that is no option), or None."""
    return next((word for word in argv if not word.startswith("-")), None)


def __getattr__(name: str) -> Any:
    if name == "app":  # every command, for tests and tools that drive the app itself
        return build_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """Entry point of the `gossamer` console script."""
    build_app(_command_asked(sys.argv[1:]))()
