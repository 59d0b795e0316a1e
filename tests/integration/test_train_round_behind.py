"""A peer that comes to a round the others already closed learns it at once, not after the window.

Three real nodes on 127.0.0.1 average through :class:`SwarmAverager`. The first averages round
``outer/7`` alone (nobody else has joined the run yet) and closes it. The other two join; one
comes to ``outer/7`` late (it is behind: the others have moved on), the third never does. The
late one awaits the third, which never announces itself in that round; before it read the
first's close while waiting, it waited the whole join window (20 s here) to learn that it came
after the close.
"""

from __future__ import annotations

import contextlib
import time

import torch

from gossamer.train.swarm_averager import SwarmAverager
from gossamer.train.swarm_averager_config import SwarmAveragerConfig
from loopback_nodes import start_node_threads

JOIN_WINDOW_S = 20.0


def test_a_peer_late_to_a_closed_round_leaves_it_without_waiting_for_the_window() -> None:
    config = SwarmAveragerConfig(run_id="behind", join_window_s=JOIN_WINDOW_S, backend="p2p")
    with contextlib.ExitStack() as stack:
        made = []
        for node_thread in start_node_threads(stack, 3):
            averager = SwarmAverager(node_thread, config)
            stack.callback(averager.close)
            made.append(averager)
        first, late, moved_on = made
        first.join_run(7)
        alone = first.average([torch.ones(10)], round_key="outer/7", weight=1.0)
        assert alone.group_size == 1
        late.join_run(7)
        moved_on.join_run(8)
        started = time.monotonic()
        outcome = late.average([torch.zeros(10)], round_key="outer/7", weight=1.0)
        took = time.monotonic() - started
        assert outcome.excluded, outcome  # it came after the close: it averaged with nobody
        assert took < JOIN_WINDOW_S / 4, f"waited {took:.1f} s for a round already closed"
