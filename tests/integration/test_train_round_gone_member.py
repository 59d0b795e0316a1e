"""A peer that read the run knows which of its members are gone by its first round.

Three real nodes on 127.0.0.1 join a run; one is stopped without leaving it (as a SIGKILL
leaves it: its membership says active for minutes). The other two read the run's states, as a
newcomer catching up does, and a few seconds later average a round. Before, a peer started
watching the run's members only at its round, so it waited there for the stopped one until the
failure detector's timeout (2.5 s here): in `make demo` a newcomer that had seen the killed peer
leave 8 s earlier held the survivors' round up that long.
"""

from __future__ import annotations

import contextlib
import time

from gossamer.train.swarm_averager import SwarmAverager
from gossamer.train.swarm_averager_config import SwarmAveragerConfig
from loopback_nodes import average_all, start_node_threads


def test_members_gone_before_a_round_are_not_waited_for_there() -> None:
    config = SwarmAveragerConfig(run_id="gone", join_window_s=20.0, backend="p2p")
    with contextlib.ExitStack() as stack:
        made = []
        for node_thread in start_node_threads(stack, 3):
            averager = SwarmAverager(node_thread, config)
            stack.callback(averager.close)
            averager.join_run(0)
            made.append(averager)
        first, second, stopped = made
        stopped.node_thread.stop()  # its membership still says active
        for averager in (first, second):
            assert stopped.peer_id in averager.run_states()  # not known gone yet
        time.sleep(3.5)  # the detector's timeout (2.5 s) and a heartbeat
        outcomes, took_s = average_all([first, second], "outer/0")
        for index in (0, 1):
            assert outcomes[index].group_size == 2, outcomes
            assert took_s[index] < 2.0, took_s  # not the detector's timeout at the round
