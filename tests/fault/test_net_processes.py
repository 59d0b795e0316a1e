"""Real peer processes (`gossamer peer start`): discovery, killed peers dropped, fast detection."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gossamer.net.config import DhtConfig, HeartbeatConfig, NodeConfig
from gossamer.net.identity import load_or_create_identity
from gossamer.net.node import Node

RECORD_TTL_S = 6.0
NUM_PROCESSES = 8


class PeerProcess:
    """One `gossamer peer start` child with a key file and a status file."""

    def __init__(self, workdir: Path, name: str, bootstrap: str | None) -> None:
        self.key = workdir / f"{name}.pem"
        self.status = workdir / f"{name}.json"
        self.peer_id = load_or_create_identity(self.key).peer_id
        self.bootstrap = bootstrap
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.proc is not None:  # a restart: reap the previous (killed) process first
            self.proc.kill()
            self.proc.wait(10)
        self.status.unlink(missing_ok=True)
        command = [
            sys.executable,
            "-c",
            "from gossamer.cli.main import main; main()",
            "peer",
            "start",
            "--listen",
            "127.0.0.1:0",
            "--key-file",
            str(self.key),
            "--status-file",
            str(self.status),
            "--record-ttl-s",
            str(RECORD_TTL_S),
            "--refresh-interval-s",
            "1",
            "--no-check-reachability",
        ]
        if self.bootstrap:
            command += ["--bootstrap", self.bootstrap]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

    def view(self) -> dict | None:
        try:
            return json.loads(self.status.read_text())
        except (OSError, ValueError):
            return None

    def known(self) -> set[str]:
        view = self.view()
        return {p["peer_id"] for p in view["peers"]} if view else set()

    def address(self, timeout_s: float = 20.0) -> str:
        view = _wait(lambda: self.view(), timeout_s, f"{self.key.stem} status")
        return view["addresses"][0]

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)


def _wait(condition, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout_s} s")


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[list[PeerProcess]]:
    first = PeerProcess(tmp_path, "p0", None)
    peers = [first]
    try:
        first.start()
        address = first.address()
        for i in range(1, NUM_PROCESSES):
            peer = PeerProcess(tmp_path, f"p{i}", address)
            peer.start()
            peers.append(peer)
        yield peers
    finally:
        for peer in peers:
            peer.stop()


def test_eight_processes_discover_each_other_and_drop_killed_ones(
    swarm: list[PeerProcess],
) -> None:
    ids = {p.peer_id for p in swarm}
    started = time.monotonic()
    _wait(lambda: all(p.known() == ids - {p.peer_id} for p in swarm), 30, "full discovery")
    print(f"\n{NUM_PROCESSES} processes: complete views {time.monotonic() - started:.1f} s")
    victims, survivors = swarm[-3:], swarm[:-3]
    for victim in victims:
        victim.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    alive = {p.peer_id for p in survivors}
    _wait(
        lambda: all(p.known() == alive - {p.peer_id} for p in survivors),
        RECORD_TTL_S + 5,
        "killed peers dropped",
    )
    dropped_s = time.monotonic() - killed_at
    print(f"killed peers dropped by every survivor after {dropped_s:.1f} s (TTL {RECORD_TTL_S})")
    assert dropped_s <= RECORD_TTL_S + 3  # within the records' expiry (+ status-file period)

    async def lookups_still_work() -> None:
        config = NodeConfig(listen_address="127.0.0.1:0", bootstrap=(survivors[1].address(),))
        async with Node(config) as observer:
            key = observer.identity.digest
            assert await observer.dht.put(key, b"still here") > 0
            found = await observer.dht.lookup(key)
            assert set(found) <= alive | {observer.peer_id}
            assert found

    asyncio.run(asyncio.wait_for(lookups_still_work(), 30))


def test_killed_and_paused_peers_are_reported_gone_within_3_s_and_come_back(
    swarm: list[PeerProcess],
) -> None:
    killed, paused = swarm[1], swarm[2]
    for peer in (killed, paused):
        peer.address()

    async def scenario() -> None:
        config = NodeConfig(
            listen_address="127.0.0.1:0",
            bootstrap=(swarm[0].address(),),
            heartbeat=HeartbeatConfig(interval_s=0.5, timeout_s=2.5),
            dht=DhtConfig(refresh_interval_s=1.0, record_ttl_s=20, republish_interval_s=5),
        )
        async with Node(config) as observer:
            for peer in (killed, paused):
                for _ in range(200):  # up to 20 s for the observer to learn the peer
                    if peer.peer_id in observer.directory:
                        break
                    await asyncio.sleep(0.1)
                observer.detector.watch(peer.peer_id)
                await observer.detector.wait_for(peer.peer_id, alive=True, timeout_s=10)
            for _ in range(20):  # some heartbeats answered
                await asyncio.sleep(0.05)
            killed.signal(signal.SIGKILL)
            paused.signal(signal.SIGSTOP)
            t0 = time.monotonic()
            await observer.detector.wait_for(killed.peer_id, alive=False, timeout_s=5)
            killed_s = time.monotonic() - t0
            await observer.detector.wait_for(paused.peer_id, alive=False, timeout_s=5)
            paused_s = time.monotonic() - t0
            print(f"\ngone after SIGKILL {killed_s:.2f} s, after SIGSTOP {paused_s:.2f} s")
            assert killed_s <= 3.0
            assert paused_s <= 3.0
            paused.signal(signal.SIGCONT)
            await observer.detector.wait_for(paused.peer_id, alive=True, timeout_s=10)
            killed.start()  # same key file: the same peer id, on a new port
            await observer.detector.wait_for(killed.peer_id, alive=True, timeout_s=20)

    asyncio.run(asyncio.wait_for(scenario(), 90))
