"""A run started again under the same name, while the earlier run's records still live.

Two real nodes on 127.0.0.1: the first peer trains a run alone and leaves it; a second peer
then starts a run under the same name. The earlier run's round entries and closes stay on the
DHT for minutes (the membership of the peer that left names its incarnation, so they counted):
before, every round the second peer formed was closed by the earlier run's close, it missed
it, found it failed on every member (the earlier peer left) and formed it again as the next
attempt at its next boundary: half the outer steps of its run. The same where the earlier
run's peer was killed (its membership says active for minutes, and no 'left' comes).
"""

from __future__ import annotations

import contextlib

import torch

from gossamer.train.swarm_averager_config import SwarmAveragerConfig
from loopback_nodes import start_averagers


def test_the_rounds_of_a_peer_that_left_before_this_one_joined_are_not_its_run_s() -> None:
    config = SwarmAveragerConfig(run_id="rerun", backend="p2p", join_window_s=10.0)
    with contextlib.ExitStack() as stack:
        earlier, later = start_averagers(stack, 2, config, join_version=None)
        earlier.join_run(0)
        for outer_step in range(2):
            outcome = earlier.average([torch.ones(10)], round_key=f"outer/{outer_step}", weight=1.0)
            assert outcome.group_size == 1
            assert not outcome.excluded
        earlier.leave_run()
        later.join_run(0)  # the same run name, after the earlier run ended
        for outer_step in range(2):
            outcome = later.average(
                [torch.full((10,), 2.0)], round_key=f"outer/{outer_step}", weight=1.0
            )
            assert not outcome.excluded, f"outer/{outer_step} closed by the earlier run"
            assert outcome.group_size == 1
            torch.testing.assert_close(outcome.tensors[0], torch.full((10,), 2.0))
        assert later.left_before_joining == {earlier.peer_id}
        assert later.run_states() == {}  # (nor is it of this run's peers)


def test_the_rounds_of_a_killed_peer_of_an_earlier_run_are_not_its_run_s() -> None:
    # The earlier run's only peer was SIGKILLed: its membership says active, so its round
    # entries and closes counted, and every round of the run started again under the same
    # name was closed before its peer came (`y outer_step 5` of 10, rounds 0:0 0#1:1 1:0 ...).
    config = SwarmAveragerConfig(run_id="rerun", backend="p2p", join_window_s=10.0)
    with contextlib.ExitStack() as stack:
        # (the third node stands for the swarm: it keeps the earlier run's records)
        earlier, later, _ = start_averagers(stack, 3, config, join_version=None)
        earlier.join_run(0)
        for outer_step in range(2):
            outcome = earlier.average([torch.ones(10)], round_key=f"outer/{outer_step}", weight=1.0)
            assert outcome.group_size == 1
            assert not outcome.excluded
        earlier.node_thread.stop()  # killed: no 'left'
        later.join_run(0)
        for outer_step in range(2):
            outcome = later.average(
                [torch.full((10,), 2.0)], round_key=f"outer/{outer_step}", weight=1.0
            )
            assert not outcome.excluded, f"outer/{outer_step} closed by the earlier run"
            assert outcome.group_size == 1
            torch.testing.assert_close(outcome.tensors[0], torch.full((10,), 2.0))
