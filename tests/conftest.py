"""Shared test set-up: one torch thread per process, markers by folder, and no real sockets in
unit tests."""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# One intra-op thread for torch in this process and in every peer it starts (set before any
# test module imports torch, which reads it then). The suite runs several peers, and a
# runner's own trainers, on one small machine at once; with torch's default of a thread per
# core their threads spin against each other: with both cores busy, a step of the tests'
# 1-layer GPT took 0.11 s on 2 threads against 0.007 s on one, and one test of a paused and
# resumed budget took 70 s against 6 s. A test that sets ``train.num_threads`` still gets it.
os.environ["OMP_NUM_THREADS"] = "1"

# Ctrl-C as a terminal's job has it, for this process and every process it starts: a suite
# started in the background by a non-interactive shell (``cmd &``, ``nohup``) inherits SIGINT
# ignored, Python then raises no KeyboardInterrupt, and a peer started with SIGINT ignored keeps
# it ignored on purpose (see gossamer.cli's stop signals), so the tests of Ctrl-C failed there:
# three of them, one by its 60 s timeout.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

_TESTS = Path(__file__).parent
_FOLDER_MARKERS = {
    "unit": "unit",
    "integration": "integration",
    "fault": "fault",
    "netlab": "netlab",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        try:
            folder = Path(str(item.fspath)).relative_to(_TESTS).parts[0]
        except ValueError:
            continue
        marker = _FOLDER_MARKERS.get(folder)
        if marker:
            item.add_marker(getattr(pytest.mark, marker))


class _SocketForbiddenError(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _no_sockets_in_unit_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    """Unit tests run in memory: opening a real socket there is an error."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    real_socket = socket.socket

    def guarded(*args: Any, **kwargs: Any) -> socket.socket:
        family = args[0] if args else kwargs.get("family", socket.AF_INET)
        if family == socket.AF_UNIX:  # event loops' self-pipes are fine
            return real_socket(*args, **kwargs)
        raise _SocketForbiddenError(
            f"{request.node.nodeid}: unit tests must not open network sockets; "
            "move this test to tests/integration"
        )

    socket.socket = guarded  # type: ignore[misc]
    try:
        yield
    finally:
        socket.socket = real_socket  # type: ignore[misc]


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """The root logger as it was before each test: a command run in process (typer's
    ``CliRunner``) configures it as a process of its own would, a level of ERROR and a handler
    on the runner's stream included, and every later test in the process inherited that (one
    that counts the warnings it logs saw none once a peer command had run before it). pytest's
    own capture handlers come and go on their own and are left alone."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    for handler in list(root.handlers):
        if handler not in handlers and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
