"""A demo peer started ahead of its turn runs `gossamer` with the arguments it is given later."""

from __future__ import annotations

import subprocess
import sys

_PEER = [sys.executable, "-m", "gossamer.cli.demo_peer"]


def _run(given: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(_PEER, input=given, capture_output=True, timeout=120, check=False)


def test_a_prepared_peer_runs_gossamer_with_the_arguments_it_is_given() -> None:
    ran = _run(b'["config", "keys"]\n')
    assert ran.returncode == 0, ran.stderr
    assert b"train.max_steps" in ran.stdout


def test_a_prepared_peer_whose_turn_never_comes_exits_quietly() -> None:
    ran = _run(b"")  # (the demo ended first: end of input)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == b""


def test_a_prepared_peer_given_something_else_says_what_it_expected() -> None:
    ran = _run(b'{"train": 1}\n')
    assert ran.returncode == 1
    assert b"expected a JSON list of strings" in ran.stderr
