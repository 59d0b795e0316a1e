"""How the command line reports Gossamer's errors: one clear line, a meaningful exit code."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import typer

from gossamer.core.errors import (
    ConfigError,
    DataError,
    GossamerError,
    IncompatibleCheckpointError,
)
from gossamer.core.stop import StopRequest

__all__ = [
    "BAD_INPUT_ERRORS",
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "NODE_FLAGS",
    "exit_code_of",
    "exit_on_gossamer_errors",
    "keys_named_by_flags",
    "one_red_line",
    "pause_on_stop_signals",
    "stop_signals_as_ctrl_c",
]

EXIT_FAILED = 1
"""The command ran and failed (corrupted data, a peer refused, ...)."""
EXIT_BAD_INPUT = 2
"""The command was given a wrong config, flag, path or data (missing, empty, binary, not what
the model reads), or a checkpoint of another model: fix the input and run it again."""
EXIT_INTERRUPTED = 130
"""Stopped by Ctrl-C or a signal (128 + SIGINT, as shells report it)."""


BAD_INPUT_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DataError,
    IncompatibleCheckpointError,
    FileNotFoundError,
)
"""The errors of wrong input, which every command reports as ``error: MESSAGE`` and exit
:data:`EXIT_BAD_INPUT` (a data path found missing before training was exit 2, the same path
found missing by `eval`, or an empty file, was ``error: DataError: ...`` and exit 1)."""


def exit_code_of(exc: BaseException) -> int:
    """The exit code of a command that failed with ``exc``: :data:`EXIT_BAD_INPUT` for wrong
    input (:data:`BAD_INPUT_ERRORS`), :data:`EXIT_FAILED` otherwise."""
    return EXIT_BAD_INPUT if isinstance(exc, BAD_INPUT_ERRORS) else EXIT_FAILED


@contextmanager
def exit_on_gossamer_errors() -> Iterator[None]:
    """Turn Gossamer's errors into ``error: ...`` on stderr and an exit code, no traceback:
    wrong input as the message alone and exit 2, another failure with its kind and exit 1."""
    try:
        yield
    except BAD_INPUT_ERRORS as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    except GossamerError as exc:
        sys.stderr.write(f"error: {type(exc).__name__}: {exc}\n")
        raise typer.Exit(EXIT_FAILED) from exc
    except MemoryError as exc:  # numpy's too
        sys.stderr.write(f"error: {_OUT_OF_MEMORY} ({exc})\n")
        raise typer.Exit(EXIT_FAILED) from exc
    except RuntimeError as exc:
        if "can't allocate memory" not in str(exc):  # torch's allocator says so in a RuntimeError
            raise
        reason = str(exc).split("DefaultCPUAllocator: ")[-1]
        sys.stderr.write(f"error: {_OUT_OF_MEMORY} ({reason})\n")
        raise typer.Exit(EXIT_FAILED) from exc


_OUT_OF_MEMORY = (
    "out of memory: the model (model.width, model.num_layers, model.vocab_size, model.context) "
    "or the batches (train.batch_size, train.eval_batches) are too large for this machine; make "
    "them smaller"
)


@contextmanager
def one_red_line() -> Iterator[None]:
    """Like :func:`exit_on_gossamer_errors` for the interactive commands (peers, labs, the
    dashboard): the message alone, in red, with the same exit codes (2 for wrong input, 1 for a
    failure)."""
    try:
        yield
    except GossamerError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(exit_code_of(exc)) from exc


NODE_FLAGS = {
    "net.listen_address": "--listen",
    "net.advertise_addresses": "--advertise",
    "net.bootstrap": "--bootstrap",
    "net.swarm_secret": "--swarm-secret-file",
    "relay.bytes_per_s_per_peer": "--relay-bytes-per-s",
}
"""The node config's keys that the peer commands' flags set."""


@contextmanager
def keys_named_by_flags(flags: Mapping[str, str]) -> Iterator[None]:
    """A :class:`ConfigError` about one of ``flags``' config keys, raised again naming the flag
    the user gave instead."""
    try:
        yield
    except ConfigError as exc:
        key, _, reason = str(exc).partition(": ")
        if key not in flags:
            raise
        raise ConfigError(f"{flags[key]}: {reason}") from exc


@contextmanager
def stop_signals_as_ctrl_c() -> Iterator[None]:
    """Stop on SIGTERM or SIGHUP (kill, timeout, a closed terminal, a cancelled CI job) as on
    Ctrl-C: what the command cleans up on a KeyboardInterrupt (workers, a lab, a child
    process) is cleaned up instead of left behind."""

    def interrupt(signum: int, frame: object) -> None:
        for sig in previous:  # a second one would cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {
        sig: signal.signal(sig, interrupt)
        for sig in (signal.SIGTERM, signal.SIGHUP)
        if signal.getsignal(sig) is not signal.SIG_IGN  # (nohup's stays ignored)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def pause_on_stop_signals(
    stop: StopRequest, on_first: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Ctrl-C, SIGTERM or SIGHUP set ``stop`` (the run checkpoints and pauses after the step
    under way: a spot instance's notice, a scheduler's stop); a second Ctrl-C or SIGTERM, or a
    signal before the run takes stops (setting up: nothing to checkpoint yet), stops at once,
    as Ctrl-C does (KeyboardInterrupt). A later SIGHUP stops nothing: a closing terminal may
    send more than one (its session's leader and its foreground group are told apart), and the
    second ended a paused run before its checkpoint. ``on_first`` is told the first signal's
    name."""

    def at_once(signum: int, frame: object) -> None:
        for sig in previous:  # a third would cut the clean-up short
            signal.signal(sig, hung_up if sig == signal.SIGHUP else signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def hung_up(signum: int, frame: object) -> None:
        _leave_a_closed_terminal()

    def pause(signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            _leave_a_closed_terminal()
        if not stop.accepted:
            at_once(signum, frame)
        for sig in previous:
            signal.signal(sig, hung_up if sig == signal.SIGHUP else at_once)
        stop.set()
        if on_first is not None:
            with contextlib.suppress(OSError):  # (the terminal may be gone)
                on_first(signal.Signals(signum).name)

    # (one ignored stays ignored: `nohup gossamer train &` must outlive its terminal)
    signals = [
        sig
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        if signal.getsignal(sig) is not signal.SIG_IGN
    ]
    previous = {sig: signal.signal(sig, pause) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _leave_a_closed_terminal() -> None:
    """Point stdout and stderr at /dev/null where they are a terminal (one that closed sends
    SIGHUP): every write to it fails, and the run died of the first (a progress line) before
    it wrote its checkpoint. A terminal that did not close is left too: the signal says stop."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                # (isatty() says no once the terminal hung up: a character device it is)
                if stat.S_ISCHR(os.fstat(fd).st_mode):
                    os.dup2(null, fd)
    finally:
        os.close(null)
