"""How the command line turns errors into one line and an exit code."""

from __future__ import annotations

import os
import signal

import pytest
import typer

from gossamer.cli import errors as errors_module
from gossamer.cli.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    exit_on_gossamer_errors,
    keys_named_by_flags,
    one_red_line,
    pause_on_stop_signals,
    stop_signals_as_ctrl_c,
)
from gossamer.core.errors import (
    ConfigError,
    DataError,
    IncompatibleCheckpointError,
    PeerUnavailableError,
    TrainingDivergedError,
)
from gossamer.core.stop import StopRequest


def _exit_code(error: BaseException, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(typer.Exit) as exited, exit_on_gossamer_errors():
        raise error
    return exited.value.exit_code, capsys.readouterr().err


@pytest.mark.parametrize(
    "error",
    [
        MemoryError("Unable to allocate 59.6 GiB for an array"),  # numpy's, a MemoryError
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 1099511627776 bytes."
        ),  # torch's
    ],
)
def test_running_out_of_memory_is_one_line_naming_the_sizes(
    error: BaseException, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _exit_code(error, capsys)
    assert code == EXIT_FAILED
    assert err.startswith("error: out of memory: the model (model.width")
    assert err.count("\n") == 1


def test_other_runtime_errors_are_not_taken_for_memory(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError, match="a bug"), exit_on_gossamer_errors():
        raise RuntimeError("a bug")


def test_wrong_input_exits_2_and_a_failure_1(capsys: pytest.CaptureFixture[str]) -> None:
    for context in (exit_on_gossamer_errors, one_red_line):
        for error, code in ((ConfigError("bad"), EXIT_BAD_INPUT), (PeerUnavailableError("x"), 1)):
            with pytest.raises(typer.Exit) as exited, context():
                raise error
            assert exited.value.exit_code == code


@pytest.mark.parametrize(
    "error",
    [
        DataError("data.path 'c.txt' is empty"),
        IncompatibleCheckpointError("checkpoint ck was written for another model"),
    ],
)
def test_wrong_data_or_checkpoint_is_wrong_input_in_every_command(
    error: Exception, capsys: pytest.CaptureFixture[str]
) -> None:
    # exit 1 and "error: DataError: ..." where a missing data.path found before training was
    # exit 2 and the message alone
    for context in (exit_on_gossamer_errors, one_red_line):
        with pytest.raises(typer.Exit) as exited, context():
            raise error
        assert exited.value.exit_code == EXIT_BAD_INPUT
        assert capsys.readouterr().err == f"error: {error}\n"
    code, err = _exit_code(TrainingDivergedError("the loss is NaN"), capsys)
    assert code == EXIT_FAILED
    assert err == "error: TrainingDivergedError: the loss is NaN\n"


def test_a_config_key_is_named_by_the_flag_that_set_it() -> None:
    flags = {"net.listen_address": "--listen"}
    with (
        pytest.raises(ConfigError, match=r"^--listen: expected HOST:PORT$"),
        keys_named_by_flags(flags),
    ):
        raise ConfigError("net.listen_address: expected HOST:PORT")
    with (
        pytest.raises(ConfigError, match=r"^dht\.bucket_size: too big$"),
        keys_named_by_flags(flags),
    ):
        raise ConfigError("dht.bucket_size: too big")


def test_a_stop_signal_pauses_a_run_that_takes_stops_and_stops_one_setting_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hung_up: list[bool] = []  # (the test's own terminal left alone)
    monkeypatch.setattr(errors_module, "_leave_a_closed_terminal", lambda: hung_up.append(True))
    # (as a terminal's job has it: a suite run under nohup ignores SIGHUP, and so kept it)
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        _pause_and_stop(hung_up)
    finally:
        signal.signal(signal.SIGHUP, previous)


def _pause_and_stop(hung_up: list[bool]) -> None:
    stop = StopRequest()
    heard: list[str] = []
    # Setting up (a swarm to join, a download): nothing to checkpoint, so it stops at once.
    # (Ctrl-C waited for the first step, minutes away where the bootstrap peer is slow.)
    with pause_on_stop_signals(stop, heard.append), pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
    assert not stop.is_set()
    stop.accepted = True  # (as Trainer.run does at its first step)
    with pause_on_stop_signals(stop, heard.append):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.is_set()
        assert heard == ["SIGTERM"]
        os.kill(os.getpid(), signal.SIGHUP)  # (a closing terminal's second: nothing more)
        assert heard == ["SIGTERM"]
        assert hung_up == [True]
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C: at once
            os.kill(os.getpid(), signal.SIGINT)


def test_a_signal_the_process_was_started_ignoring_stays_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(errors_module, "_leave_a_closed_terminal", lambda: None)
    # (`nohup gossamer lab up ... &` went down with its terminal)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with stop_signals_as_ctrl_c():
            os.kill(os.getpid(), signal.SIGHUP)  # ignored: nothing raised
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        with pause_on_stop_signals(StopRequest()):
            os.kill(os.getpid(), signal.SIGHUP)
    finally:
        signal.signal(signal.SIGHUP, previous)
