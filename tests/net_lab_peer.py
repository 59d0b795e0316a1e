"""A peer process for the netlab tests: joins, finds its reachability, then streams as told.

Usage: python tests/net_lab_peer.py NAME DIR (--advertise-host HOST | BOOTSTRAP)

Writes ``DIR/NAME.ready.json`` (id, port, reachability, relays) once it knows how others reach it,
records every bulk transfer it receives in ``DIR/NAME.received.json``, waits for
``DIR/plan.json`` (``{"NAME": [peer_id, ...]}``), sends a 50 MB payload to each peer named for it,
writes ``DIR/NAME.sent.json``; then, once ``DIR/plan2.json`` appears, sends the first
``SECOND_ROUND_BYTES`` of it again to the same peers and writes ``DIR/NAME.sent2.json``. Until
SIGTERM it keeps ``DIR/NAME.state.json`` current: relayed bytes, direct upgrades, the peers holding
a direct reservation here and the kind of each open connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

from gossamer.core.errors import GossamerError
from gossamer.net.config import NodeConfig, RelayConfig
from gossamer.net.node import Node
from gossamer.net.status import REACHABILITY_NAMES
from gossamer.proto import net_pb2

PAYLOAD_BYTES = 50_000_000
SECOND_ROUND_BYTES = 10_000_000
TOPIC = "netlab"


def payload_of(name: str) -> bytes:
    """The deterministic payload a peer sends (the test recomputes its hash)."""
    return random.Random(name).randbytes(PAYLOAD_BYTES)


def _write(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


async def _send(node: Node, peer_id: str, payload: bytes, deadline: float) -> dict[str, Any]:
    """Send once the peer's record says how to reach it; retries until ``deadline``."""
    last = ""
    while time.monotonic() < deadline:
        record = node.directory.get(peer_id)
        if record is None or (
            record.reachability == net_pb2.REACHABILITY_RELAYED and not record.relays
        ):
            record = await node.find_peer(peer_id, timeout_s=2.0)
            if record is None or (
                record.reachability == net_pb2.REACHABILITY_RELAYED and not record.relays
            ):
                await asyncio.sleep(0.2)  # the record is still spreading: look again shortly
                continue
        started = time.monotonic()
        try:
            await node.send_bulk(peer_id, TOPIC, payload, num_streams=2, timeout_s=60.0)
        except GossamerError as exc:
            last = str(exc)
            logging.getLogger("net_lab_peer").warning("send to %s failed: %s", peer_id[:12], exc)
            await asyncio.sleep(0.5)  # back off before trying again (the record may change)
            continue
        elapsed = time.monotonic() - started
        connection = node.pool.get(peer_id)
        return {
            "to": peer_id,
            "seconds": elapsed,
            "kind": connection.target.kind if connection else "?",
        }
    raise RuntimeError(f"could not send to {peer_id[:12]} before the deadline: {last}")


def _state(node: Node) -> dict[str, Any]:
    return {
        "written_at": time.time(),
        "relayed_bytes": sum(node.counters.relayed_bytes.values()),
        "num_direct_upgrades": node.counters.num_direct_upgrades,
        "direct_back": [
            p.peer_id for p in node.peers() if node.relay_service.has_direct(p.peer_id)
        ],
        "kinds": {
            p: c.target.kind for p in node.pool.peer_ids if (c := node.pool.get(p)) is not None
        },
    }


async def _wait_for(path: Path, stop: asyncio.Event, timeout_s: float) -> bool:
    """Wait for the test to write ``path``; look every 50 ms."""
    deadline = time.monotonic() + timeout_s
    while not stop.is_set() and time.monotonic() < deadline:
        if await asyncio.to_thread(path.exists):
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05):
                await stop.wait()
    return await asyncio.to_thread(path.exists)


async def main(name: str, folder: Path, bootstrap: str | None, host: str | None) -> None:
    config = NodeConfig(
        listen_address="0.0.0.0:0",
        bootstrap=(bootstrap,) if bootstrap else (),
        relay=RelayConfig(bytes_per_s_per_peer=100e6),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    received: list[dict[str, Any]] = []
    async with Node(config) as node:

        async def on_bulk(sender: str, topic: str, data: bytearray) -> None:
            received.append(
                {"from": sender, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
            _write(folder / f"{name}.received.json", received)

        node.on_bulk(TOPIC, on_bulk)
        if host:  # the first peer has nobody to ask how others see it
            node.addresses = (f"{host}:{node.port}",)
            node.reachability = net_pb2.REACHABILITY_DIRECT
            node.sign_own_record()
        if bootstrap:
            reachable = await node.check_reachability(timeout_s=4.0)
            if not reachable:
                await node.wait_for_relay(timeout_s=15.0)
        _write(
            folder / f"{name}.ready.json",
            {
                "peer_id": node.peer_id,
                "port": node.port,
                "reachability": REACHABILITY_NAMES[int(node.reachability)],
                "relays": node.relays,
            },
        )

        async def keep_state() -> None:
            while True:
                _write(folder / f"{name}.state.json", _state(node))
                await asyncio.sleep(0.2)  # a snapshot for the test five times a second

        state_task = asyncio.get_running_loop().create_task(keep_state())
        try:
            if await _wait_for(folder / "plan.json", stop, 60.0):
                targets = json.loads((folder / "plan.json").read_text()).get(name, [])
                payload = payload_of(name)
                sent = [await _send(node, t, payload, time.monotonic() + 60.0) for t in targets]
                _write(folder / f"{name}.sent.json", sent)
                if await _wait_for(folder / "plan2.json", stop, 60.0):
                    again = memoryview(payload)[:SECOND_ROUND_BYTES]
                    sent = [
                        await _send(node, t, bytes(again), time.monotonic() + 60.0) for t in targets
                    ]
                    _write(folder / f"{name}.sent2.json", sent)
            await stop.wait()
        finally:
            state_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await state_task


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {sys.argv[1]} %(levelname)s %(name)s: %(message)s"
    )
    name, folder, where = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    if where[:1] == ["--advertise-host"]:
        asyncio.run(main(name, folder, None, where[1]))
    else:
        asyncio.run(main(name, folder, where[0], None))
