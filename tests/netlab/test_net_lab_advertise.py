"""A peer listening on every interface inside a lab namespace (no default route there) advertises
its lab address, and the peers that learn its record dial that address, not their own loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from netlab_support import MakeLab

_FIRST = """
import asyncio, json, pathlib, sys, time
from gossamer.net.config import NodeConfig
from gossamer.net.node import Node

async def main() -> None:
    folder = pathlib.Path(sys.argv[1])
    async with Node(NodeConfig(listen_address="0.0.0.0:0")) as node:
        ready = {"peer_id": node.peer_id, "port": node.port, "addresses": list(node.addresses)}
        (folder / "first.tmp").write_text(json.dumps(ready))
        (folder / "first.tmp").rename(folder / "first.json")
        deadline = time.monotonic() + 60
        while not (folder / "done").exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # (until the test is done with it, under a deadline)

asyncio.run(main())
"""

_SECOND = """
import asyncio, sys
from gossamer.net.config import NodeConfig
from gossamer.net.node import Node

async def main() -> None:
    config = NodeConfig(listen_address="0.0.0.0:0", bootstrap=(sys.argv[1],))
    async with Node(config) as node:
        record = node.directory.get(sys.argv[2])
        print(",".join(record.addresses) if record is not None else "none")

asyncio.run(main())
"""


def test_a_peer_listening_on_every_interface_in_a_lab_advertises_its_lab_address(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    # It advertised 127.0.0.1:PORT (found by the default route, which a lab namespace lacks):
    # the peers that learned its record dialled their own loopback.
    with make_lab(num_peers=2, rate_bps=100_000_000) as lab:
        first = lab.spawn_in("p0", [sys.executable, "-c", _FIRST, str(tmp_path)])
        try:
            deadline = time.monotonic() + 30
            while not (tmp_path / "first.json").exists():
                assert first.poll() is None, f"the first peer exited ({first.poll()})"
                assert time.monotonic() < deadline, "the first peer did not start in 30 s"
                time.sleep(0.05)  # polling the file it writes, under a deadline
            ready = json.loads((tmp_path / "first.json").read_text())
            own = f"{lab.address_of('p0')}:{ready['port']}"
            assert ready["addresses"] == [own]
            seen = lab.run_in(
                "p1", [sys.executable, "-c", _SECOND, own, ready["peer_id"]], timeout_s=60
            )
            assert seen.stdout.strip() == own, seen
        finally:
            (tmp_path / "done").touch()
            try:
                first.wait(timeout=20)
            except subprocess.TimeoutExpired:
                first.kill()
                first.wait(timeout=10)
