"""Round nudges: a peer waiting for a round's members reads again as soon as the last one comes.

Two real nodes on 127.0.0.1 average through :class:`SwarmAverager` with a poll interval of 4 s,
far longer than the round needs. One comes a second late. Its announcement and its close nudge
the other, so both start averaging within a fraction of the poll interval; without nudges the
early peer would read again only at its next poll (4 s after it came) and the late one would wait
for the early one's close until its own next poll (2 s).
"""

from __future__ import annotations

import contextlib
import threading
import time

import torch

from gossamer.train.averaging import AverageOutcome
from gossamer.train.swarm_averager import SwarmAverager, SwarmAveragerConfig
from loopback_nodes import start_node_threads

LATE_S = 1.0
POLL_S = 4.0


def test_the_last_peer_to_come_wakes_the_waiting_one() -> None:
    outcomes: list[AverageOutcome | None] = [None, None]
    errors: list[BaseException] = []
    with contextlib.ExitStack() as stack:
        averagers = []
        for node_thread in start_node_threads(stack, 2):
            config = SwarmAveragerConfig(run_id="nudges", poll_interval_s=POLL_S)
            averager = SwarmAverager(node_thread, config)
            averager.join_run(0)
            stack.callback(averager.leave_run)
            averagers.append(averager)

        def peer(index: int, delay_s: float) -> None:
            try:
                time.sleep(delay_s)
                outcomes[index] = averagers[index].average(
                    [torch.full((1000,), float(index))], round_key="outer/0", weight=1.0
                )
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=peer, args=(0, 0.0)),
            threading.Thread(target=peer, args=(1, LATE_S)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert not errors, errors
    early, late = outcomes
    assert early is not None
    assert late is not None
    assert early.group_size == late.group_size == 2
    assert torch.allclose(early.tensors[0], torch.full((1000,), 0.5))
    # the early peer waited for the late one, and not for its own next poll
    assert LATE_S * 0.7 <= early.wait_seconds < POLL_S - 1.0, early
    # the late peer saw the early one's close without waiting for a poll either
    assert late.wait_seconds < POLL_S / 2 - 0.5, late
