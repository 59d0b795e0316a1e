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

from gossamer.core.config import ModelConfig, RunConfig
from gossamer.core.config_loader import read_secret_file
from gossamer.core.errors import ConfigError
from gossamer.core.machine import physical_memory_bytes
from gossamer.obs.metrics import MetricsServer, serve_metrics

__all__ = [
    "MAX_OPTION_S",
    "MAX_PORT",
    "check_fits_in_memory",
    "check_output_file",
    "check_output_folder",
    "expand_home",
    "expand_homes",
    "finite_float",
    "model_parameters",
    "positive_finite_float",
    "positive_seconds",
    "read_swarm_secret",
    "serve_metrics_or_explain",
]

MAX_PORT = 65535
"""The largest TCP port; ports are 0 (any free one) to this."""
MAX_OPTION_S = 86400.0
"""The longest wait or interval a flag in seconds may give: a day (1e10 overflowed a thread's
wait, with a traceback; 1e300 waited for ever)."""


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
    path = Path(os.path.expanduser(path))
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
    path = Path(os.path.expanduser(path))
    if path.is_dir():
        raise ConfigError(f"{option}: {path} is a folder; give the path of a file to write")
    check_output_folder(path.parent, option)


def check_output_folder(path: Path, option: str) -> None:
    """Check that ``path`` is a folder or can be made one: no file in the way.

    Raises:
        ConfigError: ``path``, or a folder above it, is a file; the message names ``option``.
    """
    path = Path(os.path.expanduser(path))
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


def positive_seconds(value: float) -> float:
    """A typer callback for a wait or an interval in seconds: > 0 and at most
    :data:`MAX_OPTION_S` (a day)."""
    if not math.isfinite(value) or not 0 < value <= MAX_OPTION_S:
        raise typer.BadParameter(
            f"must be a number of seconds above 0 and at most {MAX_OPTION_S:.0f} (a day), "
            f"got {value}"
        )
    return value


def expand_home(path: Path | None) -> Path | None:
    """A typer callback for a path option: a leading ``~`` is the user's home folder.

    The shell expands ``--out ~/x`` but not ``--out=~/x`` (nor a quoted ``"~/x"``): checked
    expanded and written as given, a run trained to its end and then died writing its summary,
    or wrote it into a folder named ``~`` here. Expanded once, where the flag is read, the
    path checked is the path written.
    """
    return None if path is None else Path(os.path.expanduser(path))


def expand_homes(paths: list[Path] | None) -> list[Path] | None:
    """:func:`expand_home` for a repeatable path option or argument."""
    return None if paths is None else [Path(os.path.expanduser(path)) for path in paths]


def read_swarm_secret(path: Path | None) -> bytes | None:
    """The secret in ``--swarm-secret-file`` (None without one), surrounding whitespace left out.

    Raises:
        ConfigError: the file cannot be read, is no regular file, or is too long for a secret.
    """
    if path is None:
        return None
    return read_secret_file(path, setting="--swarm-secret-file")


_BYTES_PER_TRAINED_PARAMETER = 16
"""fp32 weights, their gradients and AdamW's two moments."""
_ACTIVATIONS_PER_LAYER = 8
"""Floats per token and per unit of width that a block keeps for the backward pass, at least
(its input, attention and MLP outputs; the MLP's hidden layer alone is four)."""


def model_parameters(model: ModelConfig) -> int:
    """The built-in GPT's parameters for ``model`` (embeddings, blocks, head), by arithmetic."""
    width, vocab = model.width, model.vocab_size
    block = 12 * width * width + 13 * width  # qkv, projection, MLP (4x) and two layer norms
    head = 0 if model.tie_weights else vocab * width
    return vocab * width + model.context * width + model.num_layers * block + 2 * width + head


def check_fits_in_memory(
    config: RunConfig, *, training: bool = True, eval_batches: int | None = None
) -> None:
    """Refuse a run that cannot fit in this machine's memory, from arithmetic on its config,
    before anything is built: values up to 2**62 pass the config's checks, and a model of
    2**62 positions ended in torch's "Storage size calculation overflowed" traceback, a batch
    of 2**62 sequences in numpy's, and a billion layers allocated for minutes before failing.

    What is counted is a lower bound (weights, gradients, AdamW's moments, the activations of
    a training batch kept for the backward pass, the validation batches), so a run refused
    here could never have run; one that passes may still run out of memory.

    Args:
        config: the run.
        training: count what training needs (else only the validation batches: `eval`).
        eval_batches: validation batches to make, if not ``config.train.eval_batches``.

    Raises:
        ConfigError: the run needs more memory than this machine has.
    """
    from gossamer.data.streams import VALIDATION_SEQUENCES_PER_BATCH  # (torch: not for peers)

    memory = physical_memory_bytes()
    if memory is None:
        return
    model, train = config.model, config.train
    num_eval_batches = train.eval_batches if eval_batches is None else eval_batches
    parts = {
        # (16 sequences a batch, inputs and targets of context + 1 int64 tokens)
        "validation batches (train.eval_batches)": (
            VALIDATION_SEQUENCES_PER_BATCH * num_eval_batches * 2 * 8 * (model.context + 1)
        ),
    }
    if training:
        parameters = model_parameters(model)
        per_token = _ACTIVATIONS_PER_LAYER * model.num_layers * model.width + 2 * model.vocab_size
        parts = {
            f"the model ({parameters:,} parameters, with gradients and AdamW's moments)": (
                _BYTES_PER_TRAINED_PARAMETER * parameters
            ),
            "a training batch's activations (train.batch_size)": (
                4 * train.batch_size * model.context * per_token
            ),
            **parts,
        }
    needed = sum(parts.values())
    if needed <= memory:
        return
    largest = max(parts, key=lambda name: parts[name])
    raise ConfigError(
        f"this run needs at least {_size(needed)} of memory, more than this machine's "
        f"{_size(memory)}: {largest} alone takes {_size(parts[largest])}; make model.width, "
        "model.num_layers, model.vocab_size or model.context smaller for the model, "
        "train.batch_size or model.context for a batch, train.eval_batches for validation"
    )


def _size(num_bytes: int) -> str:
    """A byte count in GiB (or, past a million TiB, as a power of two)."""
    if num_bytes >= 2**60:
        return f"about 2**{num_bytes.bit_length() - 1} bytes"
    return f"{num_bytes / 2**30:,.1f} GiB"
