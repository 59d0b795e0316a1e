"""All-reduce between real peer processes over TLS gRPC with one of them SIGKILLed mid-round.

The survivors must finish within the round's deadline plus one part's transfer time, agree
bit for bit, and name the killed peer in their reports. A peer that stops passing averages on
round the ring holds nobody up for long. A cancelled round must leave no bulk stream open on
either side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gossamer.comm.allreduce import AllReduceConfig, all_reduce
from gossamer.comm.net_transport import NetCommTransport
from gossamer.comm.transport import CommMailbox
from gossamer.core.clock import SystemClock
from gossamer.net.config import NodeConfig
from gossamer.net.node import Node

PEER_SCRIPT = Path(__file__).resolve().parents[1] / "comm_fault_peer.py"
WORLD = 4
VICTIM = 2
ROUND_TIMEOUT_S = 8.0  # the peer script's AllReduceConfig.timeout_s
PART_TRANSFER_S = 3.0  # a generous ceiling for one part (3 M values / 4) on 2 busy cores


@contextlib.contextmanager
def _peers(folder: Path, order: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Run WORLD peer processes in ``folder`` (sending in ``order``) and let them go once all
    are ready; any still running on the way out is killed."""
    logs = [(folder / f"log-{rank}").open("wb") for rank in range(WORLD)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(PEER_SCRIPT), str(folder), str(rank), str(WORLD), order],
            stdout=subprocess.DEVNULL,
            stderr=logs[rank],
        )
        for rank in range(WORLD)
    ]
    try:
        ready = [folder / f"ready-{r}" for r in range(WORLD)]
        _wait_for(lambda: all(p.exists() for p in ready), 90, "all peers ready")
        (folder / "go").write_text("go")
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        for log in logs:
            log.close()


def _wait_for(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.01)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("hang", "order"),
    [
        ("hang", "auto"),  # killed as its round starts
        # in steps, the all-gather round the ring: killed as it is to pass an average on
        ("hang-at-pass", "steps"),
    ],
)
def test_survivors_of_a_killed_peer_finish_in_time_and_agree(
    tmp_path: Path, hang: str, order: str
) -> None:
    (tmp_path / f"{hang}-{VICTIM}").write_text("send nothing from then on")
    survivors = [r for r in range(WORLD) if r != VICTIM]
    with _peers(tmp_path, order) as procs:
        started = time.monotonic()
        _wait_for(lambda: (tmp_path / f"sent-{VICTIM}").exists(), 30, "the victim's first send")
        os.kill(procs[VICTIM].pid, signal.SIGKILL)
        for rank in survivors:
            procs[rank].wait(timeout=ROUND_TIMEOUT_S + PART_TRANSFER_S + 30)
        wall_s = time.monotonic() - started
    tails = {r: (tmp_path / f"log-{r}").read_text(errors="replace")[-2000:] for r in survivors}
    assert all(procs[r].returncode == 0 for r in survivors), tails
    assert procs[VICTIM].returncode == -signal.SIGKILL
    records = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in survivors]
    victim_id = (tmp_path / f"addr-{VICTIM}").read_text().partition("@")[0]
    for record in records:
        assert record["seconds"] <= ROUND_TIMEOUT_S + PART_TRANSFER_S, record
        assert not record["deadline_hit"], record
    named = [victim_id in record["failed"] for record in records]
    if hang == "hang":
        assert all(named), records  # it sent nothing: everyone lacks its values
    else:
        # Killed as it was to pass an average on, it may already have handed out its values and
        # its own part's average; the owners whose averages it held send them directly after
        # the ring stall allowance, so a survivor may lack nothing from it. Such a survivor has
        # no failure to report, and holds everyone's mean; one that lacked something names it.
        for record, said in zip(records, named, strict=True):
            assert said or (record["failed"] == {} and record["min"] == record["max"] == 1.5), (
                record
            )
    assert len({r["hash"] for r in records}) == 1, records  # bit-identical everywhere
    # Every value is a mean of ranks 0..3 over some subset that holds every survivor.
    assert all(0.0 <= r["min"] <= r["max"] <= 3.0 for r in records)
    assert wall_s < 60


RESULT_DEADLINE_S = ROUND_TIMEOUT_S * (0.7 + 0.3 / 3)  # the peer script's config: 6.4 s


@pytest.mark.timeout(120)
def test_a_peer_that_stops_passing_averages_on_holds_the_others_up_about_a_second(
    tmp_path: Path,
) -> None:
    # Round the ring peer 2 sends its values and its own averages but never passes an average
    # on. The owners whose averages it holds up see them gain no holder for a second
    # (AllReduceConfig.ring_stall_s), send them directly and say so; peer 2 drops its passes.
    # Everyone ends well before the result deadline (6.4 s), where they would have waited
    # before, with everyone's mean and nobody failed.
    (tmp_path / f"stall-passes-{VICTIM}").write_text("pass nothing on")
    with _peers(tmp_path, "steps") as procs:
        for proc in procs:
            proc.wait(timeout=ROUND_TIMEOUT_S + 30)
    tails = {r: (tmp_path / f"log-{r}").read_text(errors="replace")[-2000:] for r in range(WORLD)}
    assert all(proc.returncode == 0 for proc in procs), tails
    assert (tmp_path / f"sent-{VICTIM}").exists()  # it did hold a pass back
    records = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in range(WORLD)]
    for record in records:
        assert record["failed"] == {}, record
        assert not record["deadline_hit"], record
        assert record["seconds"] < RESULT_DEADLINE_S - 1.0, record
        assert record["min"] == record["max"] == 1.5, record  # the mean of ranks 0..3
    assert len({r["hash"] for r in records}) == 1, records
    # peer 2 passes on the averages of parts 3 and 0 (the ring runs 3, 2, 1, 0): their owners
    # left the ring; peer 1's reach peer 2 last. Peer 2's own may have left it too: one message
    # in flight per peer here, and they can queue behind its own held-back passes.
    left = [r["ring_left"] for r in records]
    assert left[0] == left[3] == "stalled", records
    assert left[1] is None, records
    assert left[2] in (None, "stalled"), records


@pytest.mark.timeout(60)
def test_cancelling_a_round_closes_its_streams() -> None:
    async def scenario() -> None:
        clock = SystemClock()
        async with contextlib.AsyncExitStack() as stack:
            nodes = [
                await stack.enter_async_context(
                    Node(NodeConfig(listen_address="127.0.0.1:0"), clock=clock)
                )
                for _ in range(2)
            ]
            for node in nodes:
                others = [f"{o.peer_id}@127.0.0.1:{o.port}" for o in nodes if o is not node]
                assert await asyncio.wait_for(node.bootstrap(others), 30) == 1
            members = [n.peer_id for n in nodes]
            boxes = [CommMailbox(NetCommTransport(n), clock) for n in nodes]
            config = AllReduceConfig(timeout_s=30.0, chunk_elements=1 << 20)
            # Only the first member runs the round: its messages wait at the other for a
            # round that never opens, so its streams stay open until it is cancelled.
            round_task = asyncio.create_task(
                all_reduce(
                    [torch.ones(4 << 20)],
                    mailbox=boxes[0],
                    members=members,
                    round_key="cancel/1",
                    config=config,
                )
            )
            deadline = time.monotonic() + 20
            # A message reached the other side: still streaming in (a transfer), or received
            # whole and waiting there for the round to open (on loopback a 4 MiB message is
            # in within milliseconds, so the transfer alone is easy to miss between polls).
            while not (nodes[1].bulk._transfers or boxes[1].early_room.num_rounds):
                assert time.monotonic() < deadline, "no stream opened"
                await asyncio.sleep(0.01)
            round_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await round_task
            deadline = time.monotonic() + 10
            while nodes[1].bulk._transfers or nodes[1].bulk._inflight_bytes:
                assert time.monotonic() < deadline, "streams still open after the cancel"
                await asyncio.sleep(0.01)

    asyncio.run(scenario())
