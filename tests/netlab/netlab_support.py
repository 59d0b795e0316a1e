"""Helpers for the netlab tests: listing lab namespaces, and small TCP probes run inside peers.

The probes run this interpreter inside a peer's namespace, so they only ever talk to lab addresses.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from gossamer.lab import LabControl
from gossamer.lab.runner import RunningProcess

PROBE_PORT = 7000

MakeLab = Callable[..., AbstractContextManager[LabControl]]
"""The ``make_lab`` fixture: ``make_lab(num_peers=3, ...)`` is a context manager over a lab."""


def lab_namespaces(prefix: str = "gsl-") -> list[str]:
    """The lab namespaces that exist now."""
    listing = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    return sorted(line.split()[0] for line in listing.splitlines() if line.startswith(prefix))


_SERVER = """
import socket, sys, time
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("0.0.0.0", int(sys.argv[1])))
listener.listen(16)
listener.settimeout(1.0)
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        conn, (host, _) = listener.accept()
    except TimeoutError:
        continue
    with conn:
        conn.sendall(("seen " + host + "\\n").encode())
"""

_CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
        s.settimeout(float(sys.argv[3]))
        print(s.makefile().readline().strip())
except OSError as exc:
    print("failed:", exc)
    sys.exit(1)
"""


def start_probe_server(
    lab: LabControl, peer: str, *, port: int = PROBE_PORT, lifetime_s: float = 60.0
) -> RunningProcess:
    """Start a server in ``peer`` answering each connection with the address it came from."""
    process = lab.spawn_in(peer, [sys.executable, "-c", _SERVER, str(port), str(lifetime_s)])
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        listing = lab.run_in(peer, ["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
        if listing.strip():
            return process
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"probe server in {peer} did not listen on {port} within 10 s")


def probe(lab: LabControl, peer: str, address: str, *, timeout_s: float = 1.0) -> str | None:
    """Connect from ``peer`` to ``address``; the server's answer, or None when it failed."""
    done = lab.run_in(
        peer,
        [sys.executable, "-c", _CLIENT, address, str(PROBE_PORT), str(timeout_s)],
        check=False,
        timeout_s=timeout_s + 10.0,
    )
    return done.stdout.strip() if done.ok else None


def wait_for_json(path: Path, timeout_s: float, processes: Sequence[RunningProcess]) -> Any:
    """The JSON a peer process writes (atomically) at ``path``, once it is there; fails when a
    process exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        for process in processes:
            assert process.poll() is None, f"a peer process exited early ({process.poll()})"
        time.sleep(0.02)  # polling a file another process writes, under a deadline
    raise AssertionError(f"{path.name} did not appear within {timeout_s} s")


def stop_processes(processes: Sequence[RunningProcess]) -> None:
    """Stop the peer processes a test started: SIGTERM to all of them first (so they shut down
    together), then up to 10 s for each to exit before it is killed."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def spawn_role(
    lab: LabControl,
    processes: list[subprocess.Popen[bytes]],
    program: str,
    name: str,
    folder: Path,
    role: str,
    *args: str,
) -> None:
    """Start ``program`` (Python source) in lab peer ``name``'s namespace as ``program role
    folder *args``, with ``folder`` made for what it writes and its output in
    ``folder``'s sibling ``name.log``; the process is added to ``processes``."""
    folder.mkdir()
    argv = [sys.executable, "-c", program, role, str(folder), *args]
    with (folder.parent / f"{name}.log").open("w") as log:
        processes.append(subprocess.Popen(lab.command_in(name, argv), stdout=log, stderr=log))
