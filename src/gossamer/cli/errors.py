"""How the command line reports Gossamer's errors: one clear line, a meaningful exit code."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from gossamer.core.errors import ConfigError, GossamerError

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "exit_on_gossamer_errors"]

EXIT_FAILED = 1
"""The command ran and failed (corrupted data, a peer refused, ...)."""
EXIT_BAD_INPUT = 2
"""The command was given a wrong config, flag or path; nothing was done."""


@contextmanager
def exit_on_gossamer_errors() -> Iterator[None]:
    """Turn Gossamer's errors into ``error: ...`` on stderr and an exit code, no traceback."""
    try:
        yield
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    except FileNotFoundError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    except GossamerError as exc:
        sys.stderr.write(f"error: {type(exc).__name__}: {exc}\n")
        raise typer.Exit(EXIT_FAILED) from exc
