"""A `gossamer` process whose imports are done before it is needed (see SwarmProcesses.prepare).

Usage: ``python swarm_peer_launcher.py GO_FILE ARGS...``. It imports the command (torch and all:
seconds, or tens of seconds with a cold file cache), waits for GO_FILE to appear, and then runs
``gossamer ARGS... [--bootstrap WHAT_GO_FILE_SAYS]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import gossamer.cli.train  # noqa: F401  # the slow part (torch), done before the go file
from gossamer.cli.main import main

go = Path(sys.argv[1])
deadline = time.monotonic() + 900.0  # a test that never starts the peer: end all the same
while not go.exists():
    if time.monotonic() > deadline:
        sys.exit("never told to start")
    time.sleep(0.05)  # polling for the go file, bounded by the deadline above
bootstrap = go.read_text().strip()
sys.argv = ["gossamer", *sys.argv[2:], *(["--bootstrap", bootstrap] if bootstrap else [])]
main()
