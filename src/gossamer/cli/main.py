"""The `gossamer` command.

Commands that only speak to the network (``peer``, ``peers``, ``doctor``, ``lab``, ``trace``,
``dashboard``) load without the training and benchmark commands, which import torch: a peer's
``gossamer doctor`` answered after seconds of imports (tens of seconds with a cold file cache)
before it did anything.

The process is set up here too: gRPC's own logging is kept to errors, and the soft limit on
open files is raised to the hard one (:func:`main`, :func:`raise_open_file_limit`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from gossamer._version import __version__

__all__ = ["build_app", "main", "raise_open_file_limit"]

_log = logging.getLogger(__name__)

_WITHOUT_TORCH = frozenset({"peer", "peers", "doctor", "lab", "trace", "dashboard", "version"})
"""Commands whose modules import no torch."""
_MAX_OPEN_FILES = 1 << 20
"""The soft limit asked for where the hard one is unlimited."""


def raise_open_file_limit() -> None:
    """Raise the soft limit on open files to the hard one, and say so in a debug line.

    A node's connections, tunnels and files each take a descriptor: at the common default of
    1,024, idle connections from callers with no secret (1,011 of them) took every descriptor
    of a node and honest dials failed. The hard limit is usually far higher (524,288 under
    systemd). Nothing happens where there are no such limits (Windows) or raising fails.
    """
    try:
        import resource
    except ImportError:  # (not on Windows)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:  # (macOS caps it below an unlimited hard one)
            _log.debug("open files: soft limit left at %d (raising it failed: %s)", soft, exc)
            return
        _log.debug("open files: soft limit raised from %d to the hard limit, %d", soft, wanted)


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
        context_settings={"help_option_names": ["-h", "--help"]},  # (every command inherits it)
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
        version: Annotated[
            bool,
            typer.Option(
                "--version",
                help="Print Gossamer's version and exit.",
                callback=_print_version,
                is_eager=True,
            ),
        ] = False,
    ) -> None:
        """Train PyTorch models on machines that are heterogeneous, unreliable and far apart."""
        logging.basicConfig(
            level=logging.INFO if verbose else logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        raise_open_file_limit()

    @app.command()
    def version() -> None:
        """Print Gossamer's version."""
        typer.echo(__version__)

    return app


def _print_version(asked: bool) -> None:
    """``--version``: print the version and stop, as the `version` command does."""
    if asked:
        typer.echo(__version__)
        raise typer.Exit()


def _command_asked(argv: Sequence[str]) -> str | None:
    """The subcommand in ``argv`` (the first word that is no option), or None."""
    return next((word for word in argv if not word.startswith("-")), None)


def __getattr__(name: str) -> Any:
    if name == "app":  # every command, for tests and tools that drive the app itself
        return build_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """Entry point of the `gossamer` console script.

    Before any command imports gRPC, its core's logging is set to errors only (unless the user
    set ``GRPC_VERBOSITY``): it logged at INFO to stderr, a remote peer's GOAWAY debug text
    included, raw, so any caller could write terminal escape sequences to a peer's console.
    """
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    build_app(_command_asked(sys.argv[1:]))()
