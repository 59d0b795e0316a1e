"""`gossamer bench diloco`'s stop (Ctrl-C, SIGTERM): a peer between rounds is released at once,
whenever the stop lands."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from gossamer.bench.diloco import _stop_and_wait, _StoppableGroup, _Stopped


def _free_to_another_thread(lock: threading.Condition) -> bool:
    """Whether a thread other than this one could take ``lock`` now."""
    got: list[bool] = []

    def probe() -> None:
        got.append(lock.acquire(blocking=False))
        if got[0]:
            lock.release()

    prober = threading.Thread(target=probe)
    prober.start()
    prober.join(timeout=10)
    return got == [True]


class _StopRightAfterTheCheck(threading.Event):
    """A group's ``stopped`` that stops the group just after a peer first reads it, as where
    the peer's thread was descheduled there: at once where the group's lock is free; once the
    lock is free where the peer read it under the lock (nothing can come between the read and
    the round then)."""

    def __init__(self, group: _StoppableGroup) -> None:
        super().__init__()
        self._group = group
        self._read = False
        self.stopper: threading.Thread | None = None

    def is_set(self) -> bool:
        value = super().is_set()
        if not self._read:
            self._read = True
            if _free_to_another_thread(self._group._lock):
                self._group.stop()  # in the gap between the check and the lock
            else:  # (it waits for the lock: the peer's wait for the others releases it)
                self.stopper = threading.Thread(target=self._group.stop)
                self.stopper.start()
        return value


def test_a_stop_between_a_peers_check_and_its_round_releases_the_peer_at_once() -> None:
    # (the peer opened a round after the stop, the other peer gone, and waited out the round's
    # timeout, 120 s: a Ctrl-C'd bench hung)
    group = _StoppableGroup(2)
    group.timeout_s = 20.0
    stopped = _StopRightAfterTheCheck(group)
    group.stopped = stopped
    outcome: list[BaseException | list[torch.Tensor]] = []

    def peer() -> None:
        try:
            outcome.append(group._contribute("round-7", [torch.ones(3)], 1.0))
        except BaseException as exc:  # handed to the test below
            outcome.append(exc)

    began = time.monotonic()
    thread = threading.Thread(target=peer, daemon=True)  # (on the old code it waits 20 s)
    thread.start()
    thread.join(timeout=5)
    assert not thread.is_alive(), "the peer still waits for a round opened after the stop"
    assert time.monotonic() - began < 5
    if stopped.stopper is not None:
        stopped.stopper.join(timeout=10)
    assert len(outcome) == 1
    assert isinstance(outcome[0], _Stopped)


def test_a_stopped_group_refuses_a_later_round_at_once() -> None:
    group = _StoppableGroup(2)
    group.stop()
    with pytest.raises(_Stopped):
        group._contribute("round-8", [torch.ones(3)], 1.0)


def test_a_second_sigterm_while_the_peers_stop_exits_at_once_with_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (a second Ctrl-C was swallowed, and a second SIGTERM ignored, while the bench waited for
    # its peers: a stop that hung could only be killed)
    exits: list[int] = []

    def exit_now(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", exit_now)
    scratch = tmp_path / "gossamer-bench-diloco-x"
    scratch.mkdir()
    ignored = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as after the first SIGTERM
    try:

        def second_sigterm() -> None:
            deadline = time.monotonic() + 10
            while signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:  # until it listens
                if time.monotonic() > deadline:
                    return
                time.sleep(0.01)  # polling a condition with a deadline
            os.kill(os.getpid(), signal.SIGTERM)

        sender = threading.Thread(target=second_sigterm)
        sender.start()
        with pytest.raises(SystemExit):
            _stop_and_wait(_StoppableGroup(2), threading.Event(), str(scratch))  # never done
        sender.join(timeout=10)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # (put back)
    finally:
        signal.signal(signal.SIGTERM, ignored)
    assert exits == [130]
    assert not scratch.exists()
