"""Where the commands print their tables."""

from __future__ import annotations

import os
import sys

from rich.console import Console

__all__ = ["stdout_console"]

WIDTH_OFF_TERMINAL = 240
"""Columns of a table printed to a pipe or a file (rich's own 80 cut peer ids, addresses,
config keys and paths short, with an ellipsis, where scripts and users copy them from)."""


def stdout_console() -> Console:
    """A console on stdout: the terminal's width, ``COLUMNS`` if set, else
    :data:`WIDTH_OFF_TERMINAL`."""
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=WIDTH_OFF_TERMINAL if wide else None)
