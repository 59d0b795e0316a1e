"""`gossamer peers --bootstrap` lists a running swarm's peers (it joins without announcing)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

GOSSAMER = [sys.executable, "-m", "gossamer.cli"]


@pytest.fixture
def two_peers(tmp_path: Path) -> Iterator[list[dict[str, object]]]:
    processes: list[subprocess.Popen[bytes]] = []
    statuses: list[dict[str, object]] = []
    try:
        bootstrap: list[str] = []
        for index in range(2):
            status_file = tmp_path / f"s{index}.json"
            processes.append(
                subprocess.Popen(
                    [
                        *GOSSAMER,
                        "peer",
                        "start",
                        "--listen",
                        "127.0.0.1:0",
                        "--key-file",
                        str(tmp_path / f"k{index}"),
                        "--status-file",
                        str(status_file),
                        *bootstrap,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            deadline = time.monotonic() + 60
            while not status_file.exists():
                assert time.monotonic() < deadline, "peer did not write its status"
                time.sleep(0.1)
            status = json.loads(status_file.read_text())
            statuses.append(status)
            bootstrap = ["--bootstrap", str(statuses[0]["addresses"][0])]  # type: ignore[index]
        yield statuses
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=10)


def test_peers_lists_the_swarm(two_peers: list[dict[str, object]]) -> None:
    address = str(two_peers[0]["addresses"][0])  # type: ignore[index]
    wanted = {str(s["peer_id"]) for s in two_peers}
    deadline = time.monotonic() + 30
    found: set[str] = set()
    while time.monotonic() < deadline and not wanted <= found:
        result = subprocess.run(
            [*GOSSAMER, "peers", "--bootstrap", address, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        found = {str(peer["peer_id"]) for peer in json.loads(result.stdout)}
    assert wanted <= found
