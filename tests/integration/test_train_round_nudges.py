"""Round nudges: a peer waiting for a round's members reads again as soon as the last one comes.

Two real nodes on 127.0.0.1 average through :class:`SwarmAverager` with a poll interval of 4 s,
far longer than the round needs. One comes a second late. Its announcement and its close nudge
the other, so both start averaging within a fraction of the poll interval; without nudges the
early peer would read again only at its next poll (4 s after it came) and the late one would wait
for the early one's close until its own next poll (2 s).
"""

from __future__ import annotations

from gossamer.train.swarm_averager import SwarmAveragerConfig
from loopback_nodes import average_one_late

LATE_S = 1.0
POLL_S = 4.0


def test_the_last_peer_to_come_wakes_the_waiting_one() -> None:
    config = SwarmAveragerConfig(run_id="nudges", poll_interval_s=POLL_S)
    (early, late), _ = average_one_late(config, LATE_S, "outer/0")
    # the early peer waited for the late one, and not for its own next poll
    assert LATE_S * 0.7 <= early.wait_seconds < POLL_S - 1.0, early
    # the late peer saw the early one's close without waiting for a poll either
    assert late.wait_seconds < POLL_S / 2 - 0.5, late
