"""An upload keeps its connection while HTTP/2 pings wait behind it on a thin link (root).

Two peers. A first upload while their links run at 100 Mbit/s grows the connection's windows and
the sender's socket buffer; then the links drop to 100 kbit/s and a 1 MB upload follows on the
same connection. The receiver's gRPC pings the sender (keepalive, and flow control's bandwidth
probes), and the answer goes out behind the data already in the sender's socket (1.1 MB seen
with a 1.25 MB upload: its answer came 114 s after the ping). gRPC closed the connection when
an answer took longer than its ping deadline (``grpc.http2.ping_timeout_ms``, 60 s by default)
and the upload failed ("UNAVAILABLE: ping timeout", 60-61 s in), though both peers were alive;
the deadline is now ``NodeConfig.ping_ack_timeout_s`` (300 s): this upload takes ~90 s. The
wait is the link's and the deadline was gRPC's fixed default, so neither scales down: the
upload lasts over a minute by design.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from netlab_support import MakeLab, spawn_role, stop_processes, wait_for_json

FAST_RATE_BPS = 100_000_000
RATE_BPS = 100_000
WARM_UP_BYTES = 8_000_000
PAYLOAD_BYTES = 1_000_000

_PEER = """
import asyncio, hashlib, json, os, sys, time
from pathlib import Path
from gossamer.core.errors import GossamerError
from gossamer.net.config import NodeConfig
from gossamer.net.node import Node

role, folder, host = sys.argv[1], Path(sys.argv[2]), sys.argv[3]

def write(name, data):
    tmp = folder / (name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, folder / name)

async def receive():
    done = asyncio.Event()
    async def handler(sender, topic, data):
        write("received.json", {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        done.set()
    async with Node(NodeConfig(listen_address=host + ":0")) as node:
        node.on_bulk("t", handler)
        async def warm(sender, topic, data):
            pass
        node.on_bulk("warm", warm)
        write("ready.json", {"peer_id": node.peer_id, "port": node.port})
        await asyncio.wait_for(done.wait(), 200)
        await asyncio.sleep(5)  # (answers the sender's last calls, bounded)

async def send():
    entry, size = sys.argv[4], int(sys.argv[5])
    payload = os.urandom(size)
    async with Node(NodeConfig(listen_address=host + ":0", bootstrap=(entry,))) as node:
        peer_id = entry.partition("@")[0]
        # a first upload while the link is fast grows the connection's windows and buffers
        await node.send_bulk(peer_id, "warm", os.urandom(WARM_UP_BYTES), timeout_s=60)
        write("warm.json", {})
        deadline = time.monotonic() + 60
        while not (folder / "go.json").exists():  # (the driver slows the link meanwhile)
            assert time.monotonic() < deadline, "no go from the driver within 60 s"
            await asyncio.sleep(0.05)
        started, error = time.monotonic(), ""
        try:
            await node.send_bulk(peer_id, "t", payload, timeout_s=200)
        except GossamerError as exc:
            error = repr(exc)
        write("sent.json", {
            "error": error,
            "seconds": time.monotonic() - started,
            "sha256": hashlib.sha256(payload).hexdigest(),
        })

asyncio.run(receive() if role == "receive" else send())
""".replace("WARM_UP_BYTES", str(WARM_UP_BYTES))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_upload_on_a_100_kbit_link_outlasts_the_pings_waiting_behind_it(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    processes: list[subprocess.Popen[bytes]] = []
    with make_lab(num_peers=2, rate_bps=FAST_RATE_BPS) as lab:
        try:

            def spawn(name: str, folder: Path, role: str, *args: str) -> None:
                spawn_role(lab, processes, _PEER, name, folder, role, *args)

            receiver, sender = tmp_path / "p0", tmp_path / "p1"
            spawn("p0", receiver, "receive", lab.address_of("p0"))
            ready = wait_for_json(receiver / "ready.json", 20, processes)
            entry = f"{ready['peer_id']}@{lab.address_of('p0')}:{ready['port']}"
            spawn("p1", sender, "send", lab.address_of("p1"), entry, str(PAYLOAD_BYTES))
            wait_for_json(sender / "warm.json", 60, processes)
            for name in ("p0", "p1"):
                lab.set_rate(name, RATE_BPS)
            (sender / "go.json").write_text("{}")
            sent = wait_for_json(sender / "sent.json", 240, processes)
            received_path = receiver / "received.json"
            received = json.loads(received_path.read_text()) if received_path.exists() else {}
        finally:
            stop_processes(processes)
    print(f"sent {sent}")
    assert sent["error"] == "", sent  # (before: the connection closed, "ping timeout")
    assert received == {"bytes": PAYLOAD_BYTES, "sha256": sent["sha256"]}
