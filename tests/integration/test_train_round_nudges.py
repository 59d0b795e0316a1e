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
from gossamer.train.swarm_averager_config import SwarmAveragerConfig
from loopback_nodes import average_one_late, start_averagers

LATE_S = 1.0
POLL_S = 4.0


def test_the_last_peer_to_come_wakes_the_waiting_one() -> None:
    config = SwarmAveragerConfig(run_id="nudges", poll_interval_s=POLL_S)
    (early, late), _ = average_one_late(config, LATE_S, "outer/0")
    # the early peer waited for the late one, and not for its own next poll
    assert LATE_S * 0.7 <= early.wait_seconds < POLL_S - 1.0, early
    # the late peer saw the early one's close without waiting for a poll either
    assert late.wait_seconds < POLL_S / 2 - 0.5, late


def test_a_peer_not_forming_a_round_learns_that_it_waits_for_it() -> None:
    # The DiLoCo swarm strategy takes the others' newer state between boundaries from these
    # (a newcomer that synced one version short learns that they wait for it).
    config = SwarmAveragerConfig(run_id="awaited", join_window_s=3.0)
    with contextlib.ExitStack() as stack:
        forming, idle = start_averagers(stack, 2, config)
        result: list[AverageOutcome] = []
        thread = threading.Thread(
            target=lambda: result.append(
                forming.average([torch.ones(10)], round_key="awaited/outer/1", weight=1.0)
            )
        )
        thread.start()
        deadline = time.monotonic() + 2.5
        while "awaited/outer/1" not in idle.rounds_awaiting() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert idle.rounds_awaiting() == ["awaited/outer/1"]
        # ... and reads the run's versions on its node's loop (the forming peer's is 0)
        while idle.newest_seen_version is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert idle.newest_seen_version == 0
        thread.join(timeout=30)
        assert len(result) == 1
        assert result[0].group_size == 1  # the idle peer never came: alone at the window
