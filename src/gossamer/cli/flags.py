"""Config flags on the command line: a mistyped flag named with the closest one, and a bad
value named by the flag that gave it.

``--metrics-prot 0`` was reported as an unknown config key followed by every key (fifty of
them), although the command's own ``--metrics-port`` was meant; ``--swarm.strategy diloc``
was reported as a bad value "(in config)" although no config file was given.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import typer

from gossamer.core.config import RunConfig
from gossamer.core.config_loader import describe_fields, load_run_config, parse_flag_overrides
from gossamer.core.errors import ConfigError

__all__ = ["command_flags", "load_flagged_config"]


def command_flags(ctx: typer.Context) -> list[tuple[str, str]]:
    """The config flags among ``ctx``'s extra arguments, as ``(dotted_key, text)`` pairs.

    Raises:
        ConfigError: as :func:`parse_flag_overrides`; an unknown flag close to one of the
            command's own options or to a config flag names the closest first.
    """
    try:
        return parse_flag_overrides(ctx.args)
    except ConfigError as exc:
        unknown = _first_unknown_flag(ctx.args)
        if unknown is None or "did you mean" in str(exc):  # (a config key's typo: named)
            raise
        close = difflib.get_close_matches(unknown, _flags_of(ctx), n=1, cutoff=0.75)
        if not close:
            raise
        raise ConfigError(
            f"unknown option {unknown}: did you mean {close[0]}? (--help lists the command's "
            "options, `gossamer config keys` every config key)"
        ) from exc


def load_flagged_config(
    path: Path | None,
    overrides: Iterable[tuple[str, str]],
    *,
    flags: Iterable[tuple[str, str]] | None = None,
    base: Mapping[str, Any] | None = None,
    named_by: Mapping[str, str] | None = None,
) -> RunConfig:
    """:func:`load_run_config`, a bad value's error naming the flag that gave it, or the
    command where it set the value itself.

    Args:
        path: the config file, or None.
        overrides: every override, flags last.
        flags: the overrides that came from the user's flags (``overrides`` if None).
        base: as :func:`load_run_config`'s.
        named_by: where a key came from where it was not its own flag (the command's own
            ``--bootstrap`` for ``swarm.bootstrap``, say), by key.
    """
    overrides = list(overrides)
    flagged = {key for key, _ in (overrides if flags is None else flags)}
    origins = {key: "this command's settings" for key, _ in overrides if key not in flagged}
    origins.update(named_by or {})
    return load_run_config(path, overrides, base=base, override_origins=origins)


def _first_unknown_flag(args: Iterable[str]) -> str | None:
    """The first ``--name`` in ``args`` that is no config key (its ``=value`` cut off)."""
    known = {info.key for info in describe_fields(RunConfig)}
    for arg in args:
        if arg.startswith("--") and len(arg) > 2:
            name = arg.partition("=")[0]
            if name[2:].replace("-", "_") not in known:
                return name
    return None


def _flags_of(ctx: typer.Context) -> list[str]:
    """The command's own long options and every config key as a flag."""
    own = [
        opt
        for param in ctx.command.params
        for opt in (*param.opts, *param.secondary_opts)
        if opt.startswith("--")
    ]
    keys = ["--" + info.key.replace("_", "-") for info in describe_fields(RunConfig)]
    return [*own, *keys]
