"""Checks of command-line inputs made before any work starts, and the one-line errors they give.

A path the command writes only at the end (a summary, a status file) is checked up front, so a
typo costs nothing instead of a finished training run; a metrics endpoint that cannot be served
says which address and why instead of a socket traceback.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import typer
from prometheus_client import CollectorRegistry

from gossamer.core.errors import ConfigError
from gossamer.obs.metrics import MetricsServer, serve_metrics

__all__ = [
    "MAX_PORT",
    "check_output_file",
    "check_output_folder",
    "finite_float",
    "positive_finite_float",
    "read_swarm_secret",
    "serve_metrics_or_explain",
]

MAX_PORT = 65535
"""The largest TCP port; ports are 0 (any free one) to this."""


def serve_metrics_or_explain(registry: CollectorRegistry, *, host: str, port: int) -> MetricsServer:
    """Serve ``/metrics`` like :func:`serve_metrics`; a port or host that cannot be used is a
    :class:`ConfigError` naming the address (in use, not an address, not a port).

    Raises:
        ConfigError: the endpoint cannot be served at ``host:port``.
    """
    try:
        return serve_metrics(registry, host=host, port=port)
    except (OSError, OverflowError, ValueError) as exc:  # gaierror is an OSError
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(
            f"cannot serve metrics on {host}:{port}: {reason}; pick another --metrics-port "
            "(0: any free one) or --metrics-host"
        ) from exc


def check_output_file(path: Path, option: str) -> None:
    """Check that ``path`` can be written as a file: not a folder, its folder exists and is ours.

    Raises:
        ConfigError: ``path`` cannot be written; the message names ``option``.
    """
    path = path.expanduser()
    if path.is_dir():
        raise ConfigError(f"{option}: {path} is a folder; give the path of a file to write")
    if path.exists() and not path.is_file():
        raise ConfigError(f"{option}: {path} is not a regular file; give the path of a file")
    parent = path.parent
    if not parent.exists():
        raise ConfigError(f"{option}: folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise ConfigError(f"{option}: {parent} is not a folder; give the path of a file to write")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{option}: {path} is not writable by this user; choose another path")


def check_result_file(path: Path | None, option: str) -> None:
    """Check, before a long run, that its result can be written to ``path`` (its folder is made
    if missing): a benchmark's result went with a traceback after the run.

    Raises:
        ConfigError: ``path`` is a folder, or a file stands where its folder would be.
    """
    if path is None:
        return
    path = path.expanduser()
    if path.is_dir():
        raise ConfigError(f"{option}: {path} is a folder; give the path of a file to write")
    check_output_folder(path.parent, option)


def check_output_folder(path: Path, option: str) -> None:
    """Check that ``path`` is a folder or can be made one: no file in the way.

    Raises:
        ConfigError: ``path``, or a folder above it, is a file; the message names ``option``.
    """
    path = path.expanduser()
    for current in (path, *path.parents):
        if current.exists():
            if not current.is_dir():
                what = "is a file" if current == path else f"cannot be made: {current} is a file"
                raise ConfigError(f"{option}: {path} {what}; give a folder")
            return


def finite_float(value: float) -> float:
    """A typer callback refusing ``nan`` and ``inf``."""
    if not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


def non_negative_finite_float(value: float) -> float:
    """A typer callback accepting only finite numbers >= 0."""
    if not math.isfinite(value) or value < 0:
        raise typer.BadParameter(f"must be a finite number >= 0, got {value}")
    return value


def positive_finite_float(value: float) -> float:
    """A typer callback accepting only finite numbers > 0."""
    if not math.isfinite(value) or value <= 0:
        raise typer.BadParameter(f"must be a finite number > 0, got {value}")
    return value


def read_swarm_secret(path: Path | None) -> bytes | None:
    """The secret in ``--swarm-secret-file`` (None without one), surrounding whitespace left out."""
    if path is None:
        return None
    try:
        return path.expanduser().read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"--swarm-secret-file: cannot read {path}: {exc}") from exc
