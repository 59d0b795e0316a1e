"""Peers of one run whose strategies' settings differ never average together.

Three real nodes on 127.0.0.1; two name the same settings, the third others (a DiLoCo peer
started with another H, whose newcomer check found no donor yet). Before, the settings were
not exchanged: all three averaged together, and the peers went on to different weights.
"""

from __future__ import annotations

import contextlib
import time

import torch

from gossamer.train.swarm_averager_config import SwarmAveragerConfig
from loopback_nodes import average_all, start_averagers

JOIN_WINDOW_S = 10.0


def test_a_peer_with_other_settings_is_neither_a_member_nor_awaited() -> None:
    config = SwarmAveragerConfig(run_id="settings", backend="p2p", join_window_s=JOIN_WINDOW_S)
    with contextlib.ExitStack() as stack:
        first, second, odd = start_averagers(stack, 3, config)
        for averager, inner_steps in ((first, 5), (second, 5), (odd, 10)):
            averager.settings = {"inner_steps": inner_steps, "outer_lr": 0.7}
        started = time.monotonic()
        outcomes, took_s = average_all([first, second, odd], "outer/0")
        assert time.monotonic() - started < JOIN_WINDOW_S / 2, took_s
        for index in (0, 1):
            assert outcomes[index].group_size == 2, outcomes[index]
            torch.testing.assert_close(outcomes[index].tensors[0], torch.full((100,), 0.5))
        assert outcomes[2].group_size == 1
        assert not outcomes[2].excluded  # alone, as a peer of its own run
        torch.testing.assert_close(outcomes[2].tensors[0], torch.full((100,), 2.0))
        said = "swarm.inner_steps is 10 there, 5 here"
        assert first.other_settings == {odd.peer_id: said}
        assert second.other_settings == {odd.peer_id: said}
        assert odd.other_settings == {
            p.peer_id: "swarm.inner_steps is 5 there, 10 here" for p in (first, second)
        }
        # Known, it is not awaited at the next rounds (it held them to the join window); a
        # peer that names none (a sync peer, or one of a version before) is not compared.
        second.settings = {}
        outcomes, took_s = average_all([first, second], "outer/1")
        assert outcomes[0].group_size == outcomes[1].group_size == 2
        assert max(took_s.values()) < JOIN_WINDOW_S / 2, took_s
