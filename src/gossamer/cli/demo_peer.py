"""A swarm demo peer's process, started ahead of its turn.

It imports what a training peer needs (torch, the swarm) and then waits for its command line: one
JSON list of ``gossamer`` arguments on stdin. Given it, it runs ``gossamer`` with them at once;
at end of input (the demo ended before its turn) it exits. The demo starts its later peers this
way while the first one starts, so a peer's turn does not wait on seconds of imports: on a busy
machine those let the first peer train past the rounds the second was to join, and the newcomer
arrive after the survivors had finished.

Run as ``python -m gossamer.cli.demo_peer``.
"""

from __future__ import annotations

import json
import sys

import torch  # noqa: F401  (imported before the peer's turn: the seconds it takes)

import gossamer.train.diloco
import gossamer.train.swarm  # noqa: F401
from gossamer.cli.main import main as gossamer_main

__all__ = ["main"]


def main() -> None:
    """Wait for the arguments on stdin, then run ``gossamer`` with them."""
    line = sys.stdin.readline()
    if not line.strip():
        return
    arguments = json.loads(line)
    if not isinstance(arguments, list) or not all(isinstance(a, str) for a in arguments):
        raise SystemExit(f"demo peer: expected a JSON list of strings on stdin, got {line!r}")
    sys.argv = ["gossamer", *arguments]
    gossamer_main()


if __name__ == "__main__":
    main()
