"""`gossamer peer`, `gossamer peers` and `gossamer doctor`: run and inspect peers."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the peer commands to the root command."""
