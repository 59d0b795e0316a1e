"""The one loader that turns a TOML file, environment variables and flags into a config.

Precedence, lowest first: the dataclass defaults, the TOML file, ``GOSSAMER_*`` environment
variables, flags. Environment variables are read here and nowhere else, and a flag always wins over
them. Every key is checked: an unknown key, a wrong type or an impossible value is a
:class:`~gossamer.core.errors.ConfigError` that names the key and the fix, raised before any work
starts.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import errno
import functools
import inspect
import itertools
import os
import stat
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from gossamer.core.config import RunConfig
from gossamer.core.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "FieldInfo",
    "config_from_dict",
    "config_to_dict",
    "describe_fields",
    "load_run_config",
    "parse_flag_overrides",
    "read_regular_file",
    "read_secret_file",
]

MAX_CONFIG_FILE_BYTES = 16 << 20
"""The longest config or status file read: a config is a few KiB, a status file lists peers."""
MAX_SECRET_FILE_BYTES = 4096
"""The longest swarm secret file read: a secret is tens of bytes (``openssl rand -hex 32``)."""
ENV_PREFIX = "GOSSAMER_"
"""``GOSSAMER_TRAIN__MAX_STEPS=50`` sets ``train.max_steps``: sections and keys joined by ``__``."""

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class FieldInfo:
    """One settable leaf of a config tree, for help texts."""

    key: str
    """Dotted key, e.g. ``train.max_steps``."""
    type_name: str
    """Human-readable type."""
    default: Any
    """The dataclass default."""
    doc: str
    """The field's one-line docstring."""


def _is_section(field: dataclasses.Field[Any]) -> bool:
    """Whether a field of a config holds a config of its own (a ``[section]``)."""
    return field.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(
        field.default_factory
    )


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as nested plain dicts (TOML- and JSON-friendly)."""
    result: dict[str, Any] = dataclasses.asdict(config)
    return result


def config_from_dict(
    cls: type[T],
    data: Mapping[str, Any],
    *,
    origin: str = "config",
    origins: Mapping[str, str] | None = None,
) -> T:
    """Build ``cls`` from nested dicts, checking every key and type.

    Args:
        cls: a config dataclass.
        data: nested mappings of values, as parsed from TOML or JSON.
        origin: where ``data`` came from, for error messages.
        origins: where single keys came from instead (dotted key -> "flag --train.max-steps",
            say), for error messages.

    Raises:
        ConfigError: on an unknown key, a wrong type or an impossible value.
    """
    return _build(cls, data, prefix="", origin=origin, origins=origins or {})


def load_run_config(
    path: Path | None = None,
    overrides: Iterable[tuple[str, str]] = (),
    *,
    environ: Mapping[str, str] | None = None,
    base: Mapping[str, Any] | None = None,
    override_origins: Mapping[str, str] | None = None,
) -> RunConfig:
    """Load the root config from an optional TOML file, the environment and flag overrides.

    A wrong value's error says where it came from: the file, a variable, or a flag.

    Args:
        path: a TOML file, or None for the defaults.
        overrides: ``(dotted_key, text_value)`` pairs from flags, applied last.
        environ: the environment to read ``GOSSAMER_*`` variables from; ``os.environ`` if None.
        base: nested values to start from instead of the defaults (a checkpoint's config, say).
        override_origins: where an override came from, by key, if not from its flag
            (``flag --train.max-steps`` by default).

    Raises:
        ConfigError: the file is missing or not TOML, or a key, type or value is wrong.
    """
    data: dict[str, Any] = copy.deepcopy(dict(base)) if base else {}
    if path is not None:
        try:
            text = read_regular_file(path, max_bytes=MAX_CONFIG_FILE_BYTES).decode("utf-8")
            _deep_merge(data, tomllib.loads(text))
        except NotARegularFileError as exc:
            raise ConfigError(
                f"config file {path} is {exc}, not a TOML file; check the path"
            ) from exc
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist; check the path") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"config file {path} is not UTF-8 text (is it a binary file?); use a TOML file"
            ) from exc
        except IsADirectoryError as exc:
            raise ConfigError(
                f"config file {path} is a folder, not a TOML file; check the path"
            ) from exc
        except FileTooLargeError as exc:
            raise ConfigError(
                f"config file {path} is {exc}, far more than a config; is it the right file?"
            ) from exc
        except OSError as exc:
            raise ConfigError(
                f"cannot read config file {path}: {exc.strerror or exc}; check the path and "
                "its permissions"
            ) from exc
    env = os.environ if environ is None else environ
    origins: dict[str, str] = {}
    """Keys that came from a variable or a flag -> which (else: the file, or the defaults)."""
    base_origin = str(path) if path else "config"
    root_keys = {f.name for f in dataclasses.fields(RunConfig) if not _is_section(f)}
    single_underscored = {
        info.key.replace(".", "_"): info.key
        for info in describe_fields(RunConfig)
        if "." in info.key
    }

    def set_text(key: str, text: str, origin: str) -> None:
        origins[key] = origin
        _set_text(
            data, RunConfig, key, text, origin=origin, origins=origins, base_origin=base_origin
        )

    for name, text in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        if "." in key or key in root_keys:  # GOSSAMER_NAME, GOSSAMER_TRAIN__MAX_STEPS
            set_text(key, text, f"environment variable {name}")
        elif key in single_underscored:  # GOSSAMER_TRAIN_MAX_STEPS: silently ignored before
            meant = single_underscored[key]
            raise ConfigError(
                f"environment variable {name}: a section and its key are joined by two "
                f"underscores; for {meant} write {ENV_PREFIX}{meant.upper().replace('.', '__')}"
            )
        elif close := difflib.get_close_matches(key, root_keys, n=1, cutoff=0.8):
            # (a variable of another tool, GOSSAMER_HOME, is left alone; GOSSAMER_NAMEE was too)
            raise ConfigError(
                f"environment variable {name}: no such key; did you mean "
                f"{ENV_PREFIX}{close[0].upper()}?"
            )
    for key, text in overrides:
        given = (override_origins or {}).get(key)
        set_text(key, text, given or f"flag --{key.replace('_', '-')}")
    return config_from_dict(RunConfig, data, origin=base_origin, origins=origins)


class NotARegularFileError(OSError):
    """A path names a fifo, a device or a socket: reading one may block or never end."""


class FileTooLargeError(OSError):
    """A file is longer than the most its reader takes."""


def read_regular_file(path: str | os.PathLike[str], *, max_bytes: int) -> bytes:
    """The bytes of the regular file at ``path`` (a leading ``~`` is the home folder).

    Only a regular file is read, and at most ``max_bytes`` of it: a fifo with no writer blocked
    a read for ever, and ``/dev/zero`` (or a large file named by mistake) ate the memory.

    Raises:
        NotARegularFileError: it is a fifo, a device or a socket (``str(exc)`` says which).
        IsADirectoryError: it is a folder.
        FileTooLargeError: it is longer than ``max_bytes`` (``str(exc)`` says so).
        OSError: it cannot be opened or read (``exc.strerror`` says why).
    """
    # (non-blocking: opening a fifo to read waits for a writer otherwise)
    fd = os.open(os.path.expanduser(path), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "it is a folder", str(path))
        if not stat.S_ISREG(mode):
            raise NotARegularFileError("a fifo" if stat.S_ISFIFO(mode) else "a device or a socket")
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:  # (one read may return less: NFS, FUSE)
            chunk = os.read(fd, min(max_bytes + 1 - size, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > max_bytes:
        raise FileTooLargeError(f"longer than {max_bytes} bytes")
    return b"".join(chunks)


def read_secret_file(path: str | os.PathLike[str], *, setting: str) -> bytes:
    """The secret a swarm secret file holds, surrounding whitespace left out.

    Read by :func:`read_regular_file`, at most :data:`MAX_SECRET_FILE_BYTES`.

    Args:
        path: the file (a leading ``~`` is the home folder).
        setting: the key or flag that named it, for messages.

    Raises:
        ConfigError: it cannot be read, is not a regular file, or is longer than a secret is.
    """
    hint = "give the file that holds the swarm's secret"
    try:
        data = read_regular_file(path, max_bytes=MAX_SECRET_FILE_BYTES)
    except NotARegularFileError as exc:
        raise ConfigError(f"{setting}: {path} is not a regular file ({exc}); {hint}") from exc
    except FileTooLargeError as exc:
        raise ConfigError(
            f"{setting}: {path} is longer than {MAX_SECRET_FILE_BYTES} bytes, far more than a "
            f"secret (e.g. `openssl rand -hex 32 > swarm.secret`); is it the right file? {hint}"
        ) from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{setting}: cannot read {path} (it is a folder); {hint}") from exc
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path} ({exc.strerror or exc}); {hint}") from exc
    return data.strip()


def parse_flag_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
    """Parse ``--section.key value`` and ``--section.key=value`` flags into pairs.

    Dashes in keys are read as underscores (``--train.max-steps`` is ``train.max_steps``). A bare
    boolean flag (``--checkpoint.resume`` with no value) means true.

    Raises:
        ConfigError: an argument is not a ``--key`` flag, or a key is unknown.
    """
    known = {info.key for info in describe_fields(RunConfig)}
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(
                f"unexpected argument {arg!r}; config flags look like --train.max_steps 100"
            )
        body = arg[2:]
        key, sep, value = body.partition("=")
        key = key.replace("-", "_")
        _check_known(key, known, origin=f"flag {arg}")
        if not sep:
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is None or nxt.startswith("--"):
                value = "true"
            else:
                value = nxt
                i += 1
        pairs.append((key, value))
        i += 1
    return pairs


@functools.cache
def describe_fields(cls: type) -> list[FieldInfo]:
    """Every settable leaf of a config dataclass tree, with its type, default and docstring."""
    infos: list[FieldInfo] = []
    _describe(cls, "", infos)
    return infos


# --- internals ---------------------------------------------------------------------------------


def _describe(cls: type, prefix: str, out: list[FieldInfo]) -> None:
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            _describe(typing.cast(type, hint), key + ".", out)
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append(
            FieldInfo(
                key=key, type_name=_type_name(hint), default=default, doc=docs.get(f.name, "")
            )
        )


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string right after an annotated field) read from the source."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "|".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "none"
    return getattr(hint, "__name__", str(hint))


def _check_known(key: str, known: Iterable[str], *, origin: str) -> None:
    known = list(known)
    if key in known:
        return
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(known))}"
    raise ConfigError(f"unknown config key {key!r} (from {origin}){hint}")


def _set_text(
    data: dict[str, Any],
    cls: type,
    key: str,
    text: str,
    *,
    origin: str,
    origins: Mapping[str, str] | None = None,
    base_origin: str = "config",
) -> None:
    infos = {info.key: info for info in describe_fields(cls)}
    _check_known(key, infos, origin=origin)
    hint = _leaf_hint(cls, key)
    value = _parse_text(text, hint, key=key, origin=origin)
    node = data
    *sections, leaf = key.split(".")
    for depth, section in enumerate(sections):
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            # (the scalar was set before this key: by the file, or a variable or flag for it)
            dotted = ".".join(sections[: depth + 1])
            where = (origins or {}).get(dotted)
            said = f"from {where}" if where else f"in {base_origin}"
            raise ConfigError(
                f"{dotted} must be a table of keys, not {child!r} ({said}); {origin} sets "
                f"{key} inside it"
            )
        node = child
    node[leaf] = value


def _deep_merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _leaf_hint(cls: type, key: str) -> Any:
    hint: Any = cls
    for part in key.split("."):
        hint = typing.get_type_hints(hint)[part]
    return hint


def _parse_text(text: str, hint: Any, *, key: str, origin: str) -> Any:
    """Turn a flag's or variable's text into a value of type ``hint``."""
    options = _union_members(hint)
    if type(None) in options and text.strip().lower() in ("none", "null", ""):
        return None
    for option in options:
        if option is bool:
            lowered = text.strip().lower()
            if lowered in ("true", "yes", "1", "on"):
                return True
            if lowered in ("false", "no", "0", "off"):
                return False
        elif option is int:
            try:
                return int(text)
            except ValueError:
                pass
        elif option is float:
            try:
                return float(text)
            except ValueError:
                pass
        elif option is str or typing.get_origin(option) is typing.Literal:
            return text
    raise ConfigError(f"{key}: expected {_type_name(hint)}, got {text!r} (from {origin})")


def _union_members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _build(
    cls: type[T], data: Mapping[str, Any], *, prefix: str, origin: str, origins: Mapping[str, str]
) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'} must be a table of keys, got {data!r} (in {origin})"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(typing.cast(Any, cls))]
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = prefix + name
        if name not in hints:
            _check_known(key, [prefix + n for n in names], origin=origin)
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(
                typing.cast(type, hint), value, prefix=key + ".", origin=origin, origins=origins
            )
        elif key in origins:
            kwargs[name] = _check_value(value, hint, key=key, where=f"from {origins[key]}")
        else:
            kwargs[name] = _check_value(value, hint, key=key, where=f"in {origin}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        # (a config's own check names the key first: "optim.lr: must be positive, got -1.0")
        key = str(exc).partition(":")[0]
        if key in origins:
            raise ConfigError(f"{exc} (from {origins[key]})") from exc
        if origin != "config" and key.startswith(prefix) and key[len(prefix) :] in data:
            raise ConfigError(f"{exc} (in {origin})") from exc
        raise
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc} (in {origin})") from exc


def _check_value(value: Any, hint: Any, *, key: str, where: str) -> Any:
    for option in _union_members(hint):
        if option is type(None) and value is None:
            return None
        if typing.get_origin(option) is typing.Literal:
            if value in typing.get_args(option):
                return value
            if isinstance(value, str):
                allowed = ", ".join(repr(a) for a in typing.get_args(option))
                raise ConfigError(f"{key}: {value!r} is not one of {allowed} ({where})")
            continue
        if option is bool:
            if isinstance(value, bool):
                return value
        elif option is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif option is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
        elif option is str and isinstance(value, str):
            return value
    raise ConfigError(
        f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__}) ({where})"
    )
