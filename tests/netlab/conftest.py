"""Netlab tests build real namespaces: they need root and ip, tc and iptables, else they skip.

Every test gets its own lab name and state folder, and is checked afterwards: none of its
namespaces is left, and the root namespace's links, addresses, routes, qdiscs and firewall are
exactly as they were before it ran.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from netlab_support import MakeLab, lab_namespaces

from gossamer.lab import LabConfig, LabControl, SubprocessRunner, open_lab
from gossamer.lab.runner import REQUIRED_TOOLS, missing_tools


def _skip_reason() -> str | None:
    runner = SubprocessRunner()
    if not runner.is_root():
        return "netlab tests need root: they create network namespaces"
    absent = missing_tools(runner)
    if absent:
        packages = " ".join(sorted({REQUIRED_TOOLS[tool] for tool in absent}))
        return f"netlab tests need {', '.join(absent)}: apt-get install {packages}"
    return None


_SKIP_REASON = _skip_reason()

_ROOT_LISTINGS = (
    ["ip", "-br", "link", "show"],
    ["ip", "-br", "addr", "show"],
    ["ip", "route", "show", "table", "all"],
    ["tc", "qdisc", "show"],
    ["iptables", "-w", "-S"],
    ["iptables", "-w", "-t", "nat", "-S"],
)


def _root_snapshot() -> dict[str, list[str]]:
    """What the root namespace holds, listed by the same tools the lab uses."""
    snapshot = {}
    for argv in _ROOT_LISTINGS:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True)
        lines = done.stdout.splitlines()
        if argv[:2] == ["ip", "-br"]:
            lines = [" ".join(line.split()[:1] + line.split()[2:]) for line in lines]  # no state
        snapshot[" ".join(argv)] = sorted(lines)
    return snapshot


@pytest.fixture(autouse=True)
def _needs_root_and_tools() -> None:
    if _SKIP_REASON is not None:
        pytest.skip(_SKIP_REASON)


@pytest.fixture
def lab_name() -> str:
    """A fresh lab name per test, so a test never meets another's leftovers."""
    return "t" + secrets.token_hex(3)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "lab-state"


@pytest.fixture(autouse=True)
def _nothing_left_behind(_needs_root_and_tools: None, lab_name: str) -> Iterator[None]:
    before = _root_snapshot()
    yield
    assert lab_namespaces(f"gsl-{lab_name}-") == [], "the test left namespaces behind"
    assert _root_snapshot() == before, "the root namespace changed"


@pytest.fixture
def make_lab(lab_name: str, state_dir: Path) -> MakeLab:
    """``make_lab(num_peers=3, ...)``: a context manager over this test's lab."""

    def make(**config: Any) -> AbstractContextManager[LabControl]:
        return open_lab(LabConfig(name=lab_name, **config), state_dir=state_dir)

    return make
