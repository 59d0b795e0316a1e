"""One all-reduce peer process for the comm fault tests (run by tests/fault/test_comm_*.py).

Usage: ``python tests/comm_fault_peer.py FOLDER RANK WORLD [ORDER]``. It starts a node (TLS gRPC
on 127.0.0.1, port 0), writes ``FOLDER/addr-RANK``, waits (bounded) for every other address,
joins them, starts receiving comm messages, writes ``FOLDER/ready-RANK`` and waits for
``FOLDER/go``, then averages one tensor
(sending in ``ORDER``, ``auto`` by default: see ``AllReduceConfig.order``). After its first chunk
message was delivered it writes ``FOLDER/sent-RANK`` (so a test can kill it mid-round); at the
end it writes ``FOLDER/result-RANK.json``: timings, report and a result hash.

A peer finds ``FOLDER/hang-RANK`` at the start: it marks ``sent-RANK`` as its round starts and
then sends nothing. ``FOLDER/hang-at-pass-RANK``: it runs the round until it is to pass on an
owner's average round the ring (see ``gossamer.comm.steps``), marks ``sent-RANK`` then and sends
nothing more. ``FOLDER/stall-passes-RANK``: it passes no average on round the ring (each pass
waits an hour, unless the round drops it), marks ``sent-RANK`` at the first, and sends everything
else as usual.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from gossamer.comm.allreduce import AllReduceConfig, all_reduce
from gossamer.comm.net_transport import NetCommTransport
from gossamer.comm.transport import (
    FLAG_RING,
    CommMailbox,
    FrameKind,
    Message,
    message_bytes,
    unpack_frame,
)
from gossamer.net.config import NodeConfig
from gossamer.net.node import Node

NUM_ELEMENTS = 3_000_000
TIMEOUT_S = 8.0


async def _wait_for(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(path.exists):  # files are the only channel here
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path.name} did not appear in {timeout_s} s")
        await asyncio.sleep(0.02)


class _MarkingTransport(NetCommTransport):
    """Marks the first message this peer sends; a peer told to hang sends nothing at all.

    The hanging peer marks the moment its round starts and then never sends, so the test's kill
    always lands mid-round and no result of this peer's reaches only some of the others. One
    told to hang at its first pass does so as it is to pass on an average round the ring.
    """

    def __init__(
        self, node: Node, marker: Path, *, hang: bool, rank: int, at_pass: bool, stall: bool
    ) -> None:
        super().__init__(node)
        self.marker = marker
        self.marked = at_pass or stall  # (marked only once it is to pass an average on)
        self.hang = hang
        self.rank = rank
        self.at_pass = at_pass
        self.stall = stall

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        if (self.at_pass or self.stall) and not self.hang:
            frame, _ = unpack_frame(memoryview(message_bytes(message)))
            passing = frame.kind is FrameKind.RESULT and frame.flags & FLAG_RING
            if passing and frame.part != self.rank and self.stall:
                if not self.marker.exists():
                    await asyncio.to_thread(self.marker.write_text, "passing")
                await asyncio.sleep(3600)  # cancelled if the round drops the pass
            if passing and frame.part != self.rank and self.at_pass:
                self.hang = True
                self.marked = False
        if self.hang:
            if not self.marked:
                self.marked = True
                await asyncio.to_thread(self.marker.write_text, "started")
            await asyncio.sleep(3600)  # the test kills this process here
        await super().send(peer_id, message, timeout_s=timeout_s)
        if not self.marked:
            self.marked = True
            await asyncio.to_thread(self.marker.write_text, "sent")


async def main(folder: Path, rank: int, world: int, order: str) -> None:
    async with Node(NodeConfig(listen_address="127.0.0.1:0")) as node:
        staged = folder / f"addr-{rank}.tmp"
        staged.write_text(f"{node.peer_id}@127.0.0.1:{node.port}")
        staged.rename(folder / f"addr-{rank}")
        entries = []
        for other in range(world):
            await _wait_for(folder / f"addr-{other}", 60)
            entries.append((folder / f"addr-{other}").read_text())
        others = [e for r, e in enumerate(entries) if r != rank]
        await asyncio.wait_for(node.bootstrap(others), 30)
        hang = (folder / f"hang-{rank}").exists()
        at_pass = (folder / f"hang-at-pass-{rank}").exists()
        stall = (folder / f"stall-passes-{rank}").exists()
        marker = folder / f"sent-{rank}"
        transport = _MarkingTransport(
            node, marker, hang=hang, rank=rank, at_pass=at_pass, stall=stall
        )
        # Receiving comm messages before saying ready: a peer that sees "go" first may send to
        # this one at once, and a node with no comm handler yet refuses the message.
        mailbox = CommMailbox(transport, node.clock)
        (folder / f"ready-{rank}").write_text("ready")
        await _wait_for(folder / "go", 60)
        tensor = torch.full((NUM_ELEMENTS,), float(rank))
        config = AllReduceConfig(
            timeout_s=TIMEOUT_S,
            send_timeout_s=4.0,
            chunk_elements=100_000,
            max_in_flight_per_peer=1,
            order=order,
        )
        started = time.perf_counter()
        result = await all_reduce(
            [tensor],
            mailbox=mailbox,
            members=[e.partition("@")[0] for e in entries],
            round_key="fault/1",
            config=config,
        )
        seconds = time.perf_counter() - started
        values = result.tensors[0].numpy()
        report = result.report
        record = {
            "peer_id": node.peer_id,
            "seconds": seconds,
            "hash": hashlib.sha256(values.tobytes()).hexdigest(),
            "failed": report.failed,
            "deadline_hit": report.deadline_hit,
            "ring_left": report.ring_left,
            "outcomes": [str(p.outcome) for p in report.parts],
            "contributors": [p.contributors for p in report.parts],
            "min": float(values.min()),
            "max": float(values.max()),
        }
        (folder / f"result-{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    order = sys.argv[4] if len(sys.argv) > 4 else "auto"
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), order))
