"""Bulk uploads on a 1 Mbit/s link finish while the sender heartbeats the receiver.

A transfer sent in one chunk (up to 4 MiB, one unary call: what comm sends an all-reduce part with)
takes up to ~35 s on a 1 Mbit/s link. Heartbeats went on the same connection and timed out behind
it in the socket's send buffer; one that did closed the connection if nothing on it had shown life
for 15 s, so the upload failed every time, and the failure detector reported the receiver gone (on
a 2 Mbit/s lab link every round of a DiLoCo swarm then averaged each peer alone). Heartbeats now go
on a connection of their own (``Node.heartbeat_pool``) and a connection with an upload under way is
not closed as silent. Here the sender heartbeats the receiver as the failure detector does (every
0.5 s, 2.5 s deadline) while it sends: the transfer must finish on the connection it began on, and
the heartbeats must be answered beside it.

The peers run with the windows scaled down with the transfers (chunks of 1.5 MiB, not 4; a
connection silent for 4 s, not 15; a stream idle for 6 s, not 30; a breaker opened by 3 failures,
not 5), so each upload takes ~13-15 s at 1 Mbit/s, not 35-50 s, and still outlasts every window the
code before the fixes failed it at.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from netlab_support import MakeLab, spawn_role, stop_processes, wait_for_json

RATE_BPS = 1_000_000
CHUNK_BYTES = 3 * 1024 * 1024 // 2
PAYLOAD_BYTES = CHUNK_BYTES

_PEER = """
import asyncio, hashlib, json, logging, os, sys, time
from pathlib import Path
from gossamer.core.errors import DeadlineExceededError, GossamerError, PeerUnavailableError
from gossamer.net.config import BreakerConfig, LimitsConfig, NodeConfig
from gossamer.net.node import Node
from gossamer.proto import net_pb2

role, folder, host = sys.argv[1], Path(sys.argv[2]), sys.argv[3]

def config(**fields):  # (the windows scaled down with the transfers, see the module's docstring)
    return NodeConfig(
        keepalive_interval_s=2.0, keepalive_timeout_s=2.0,
        limits=LimitsConfig(bulk_chunk_bytes=CHUNK_BYTES, bulk_idle_timeout_s=6.0),
        breaker=BreakerConfig(failure_threshold=3), **fields)

def write(name, data):
    tmp = folder / (name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, folder / name)

async def receive():
    done = asyncio.Event()
    async def handler(sender, topic, data):
        write("received.json", {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        done.set()
    async with Node(config(listen_address=host + ":0")) as node:
        node.on_bulk("t", handler)
        async def small(sender, topic, data):
            write("received_second.json", {"bytes": len(data)})
        node.on_bulk("t2", small)
        write("ready.json", {"peer_id": node.peer_id, "port": node.port})
        await asyncio.wait_for(done.wait(), 150)
        await asyncio.sleep(float(sys.argv[4]))  # (answers the sender's last calls, bounded)

class Closings(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []
    def emit(self, record):
        if "showed no life" in record.getMessage():
            self.lines.append(record.getMessage())

async def call_forever(node, peer_id, calls):  # (a call the breaker counts, as the DHT's are)
    while True:
        try:
            await node.call(peer_id, "/gossamer.net.v1.Dht/Ping", net_pb2.PingRequest(),
                            net_pb2.PingResponse, timeout_s=2.0, retry=False)
            calls["ok"] += 1
        except DeadlineExceededError:
            calls["timed_out"] += 1
        except PeerUnavailableError as exc:
            calls["refused" if "circuit open" in str(exc) else "unavailable"] += 1
        await asyncio.sleep(0.5)

async def second_send(node, peer_id, calls, threshold):
    # Once the calls behind the upload timed out as often as the breaker's threshold, and one
    # more was made: a comm message sent while the upload is still under way.
    while calls["timed_out"] < threshold:
        await asyncio.sleep(0.1)
    made = sum(calls.values())
    while sum(calls.values()) == made:
        await asyncio.sleep(0.1)
    try:
        await node.send_bulk(peer_id, "t2", b"small", timeout_s=120)
        return ""
    except GossamerError as exc:
        return repr(exc)

async def send():
    entry, size = sys.argv[4], int(sys.argv[5])
    with_calls = len(sys.argv) > 6 and sys.argv[6] == "calls"
    closings = Closings()
    logging.getLogger("gossamer.net.connections").addHandler(closings)
    logging.getLogger("gossamer.net.connections").setLevel(logging.INFO)
    payload = os.urandom(size)
    async with Node(config(listen_address=host + ":0", bootstrap=(entry,))) as node:
        peer_id = entry.partition("@")[0]
        connection = await node.pool.connection(peer_id)
        heartbeats = {"ok": 0, "failed": 0}

        async def heartbeat_forever():  # (as the failure detector does)
            while True:
                try:
                    await node._heartbeat(peer_id, timeout_s=2.5)
                    heartbeats["ok"] += 1
                except GossamerError:
                    heartbeats["failed"] += 1
                await asyncio.sleep(0.5)

        write("sending.json", {})
        started, error = time.monotonic(), ""
        calls = {"ok": 0, "timed_out": 0, "refused": 0, "unavailable": 0}
        background = [asyncio.create_task(heartbeat_forever())]
        second = None
        if with_calls:
            background.append(asyncio.create_task(call_forever(node, peer_id, calls)))
            second = asyncio.create_task(
                second_send(node, peer_id, calls, node.config.breaker.failure_threshold)
            )
        try:
            await node.send_bulk(peer_id, "t", payload, timeout_s=120)
        except GossamerError as exc:
            error = repr(exc)
        finally:
            breaker_after = node.pool.breakers[peer_id].state
            for task in background:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        second_error = "not sent"
        if second is not None:
            try:
                second_error = await asyncio.wait_for(second, 60)
            except TimeoutError:
                second.cancel()
        write("sent.json", {
            "error": error,
            "seconds": time.monotonic() - started,
            "same_connection": node.pool.get(peer_id) is connection,
            "closings": closings.lines,
            "heartbeats": heartbeats,
            "calls": calls,
            "breaker_after": breaker_after,
            "second_error": second_error,
            "sha256": hashlib.sha256(payload).hexdigest(),
        })

asyncio.run(receive() if role == "receive" else send())
""".replace("CHUNK_BYTES", str(CHUNK_BYTES))


def _upload(
    make_lab: MakeLab, tmp_path: Path, payload_bytes: int, *, with_calls: bool = False
) -> tuple[Any, Any, str]:
    """Send ``payload_bytes`` from p1 to p0 over a 1 Mbit/s link, heartbeating as it goes
    (``with_calls``: also making calls that the peer's circuit breaker counts, and sending a
    small message once as many of them timed out as open it): what the sender and the receiver
    wrote, and the end of the sender's log."""
    processes: list[subprocess.Popen[bytes]] = []
    with make_lab(num_peers=2, rate_bps=RATE_BPS) as lab:
        try:

            def spawn(name: str, folder: Path, role: str, *args: str) -> None:
                spawn_role(lab, processes, _PEER, name, folder, role, *args)

            receiver, sender = tmp_path / "p0", tmp_path / "p1"
            spawn("p0", receiver, "receive", lab.address_of("p0"), "10")
            ready = wait_for_json(receiver / "ready.json", 20, processes)
            entry = f"{ready['peer_id']}@{lab.address_of('p0')}:{ready['port']}"
            mode = ["calls"] if with_calls else []
            spawn("p1", sender, "send", lab.address_of("p1"), entry, str(payload_bytes), *mode)
            sent = wait_for_json(sender / "sent.json", 150, processes)
            received_path = receiver / "received.json"
            received = json.loads(received_path.read_text()) if received_path.exists() else {}
        finally:
            stop_processes(processes)
    return sent, received, (tmp_path / "p1.log").read_text()[-3000:]


@pytest.mark.slow
def test_a_one_chunk_upload_on_a_1_mbit_link_finishes_with_heartbeats_answered_beside_it(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    sent, received, log = _upload(make_lab, tmp_path, PAYLOAD_BYTES)
    print(f"\n{PAYLOAD_BYTES} bytes in one chunk at {RATE_BPS} bit/s with heartbeats: {sent}")
    # (the old code: "connection to ... showed no life for 15.x s ... closed", and the upload
    # ended "its connection was closed under it")
    assert sent["closings"] == [], log
    assert sent["error"] == "", log
    assert sent["same_connection"], log
    assert received.get("sha256") == sent["sha256"]
    # (on the upload's connection nearly every heartbeat timed out behind it: the detector
    # reported the live receiver gone; beside it one goes every ~0.5 s)
    assert sent["heartbeats"]["ok"] > 12, sent
    assert sent["heartbeats"]["failed"] <= 1, sent


@pytest.mark.slow
def test_a_streamed_upload_on_a_1_mbit_link_arrives_at_the_link_s_rate(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    # More than a chunk goes as a stream. Its chunks were all of the largest size (here 1.5
    # MiB, 13 s apiece at 1 Mbit/s; by default 4 MiB, 35 s), and the receiver gave up on the
    # stream once it went longer without a whole chunk (limits.bulk_idle_timeout_s, here 6 s;
    # by default 30 s): a peer behind such an uplink never sent a newcomer its state. Its
    # chunks now grow and shrink to go out in seconds.
    payload_bytes = CHUNK_BYTES + 256 * 1024
    sent, received, log = _upload(make_lab, tmp_path, payload_bytes)
    print(f"\n{payload_bytes} bytes streamed at {RATE_BPS} bit/s with heartbeats: {sent}")
    # (the old code: "INVALID_ARGUMENT: bulk stream sent nothing for 6 s")
    assert sent["error"] == "", log
    assert received.get("sha256") == sent["sha256"]
    assert sent["closings"] == [], log
    assert sent["same_connection"], log
    # 14.7 s of payload at the link's rate; chunks of a few seconds keep it near that
    assert sent["seconds"] < 20, sent


@pytest.mark.slow
def test_calls_timing_out_behind_an_upload_do_not_open_the_breaker_on_the_next_send(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    # The DHT's calls to the peer (FindNode refresh, 2 s deadline) queue behind the upload's
    # chunk and time out: counted as failures, five opened the peer's breaker, the trials timed
    # out the same way, and every send_bulk to the peer (comm's all-reduce messages) was
    # refused at once with "circuit open": members of a round failed each other.
    sent, received, log = _upload(make_lab, tmp_path, PAYLOAD_BYTES, with_calls=True)
    print(f"\n{PAYLOAD_BYTES} bytes in one chunk at {RATE_BPS} bit/s with calls: {sent}")
    assert sent["error"] == "", log
    assert received.get("sha256") == sent["sha256"]
    # (the calls did time out behind the upload, as often as open a breaker)
    assert sent["calls"]["timed_out"] >= 3, sent
    # (the old code: refused > 0, breaker "open", and "PeerUnavailableError('peer ...: circuit
    # open')" for the second send)
    assert sent["calls"]["refused"] == 0, sent
    assert sent["breaker_after"] == "closed", sent
    assert sent["second_error"] == "", sent
