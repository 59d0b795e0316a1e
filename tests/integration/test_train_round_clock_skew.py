"""Round formation holds when the peers' wall clocks disagree.

Real nodes on 127.0.0.1 average through :class:`SwarmAverager`; some run on clocks set apart
from the others'. Every ping and heartbeat answer carries the responder's clock; a peer whose
clock is off the one most of the run's peers share stamps on theirs, so a clock 5 s behind does
not leave the others finding every round closed before they came, and one 4 s ahead does not
hold them past their windows. Peers on the majority's clock never change theirs, and while no
majority can tell (two peers), each stays on its own. An entry stamped far in the future (a
clock set wrong by hours, or a peer that lies) is neither waited for nor counted.
"""

from __future__ import annotations

import contextlib
import json
import time

import pytest
import torch

from gossamer.core.clock import SystemClock
from gossamer.net.node import Node
from gossamer.train.swarm_averager_config import SwarmAveragerConfig
from gossamer.train.swarm_round_records import round_entry_key
from loopback_nodes import average_all, start_averagers

JOIN_WINDOW_S = 3.0


class SkewedClock(SystemClock):
    """The system clock with its wall time set ``skew_s`` apart."""

    def __init__(self, skew_s: float) -> None:
        self.skew_s = skew_s

    def wall(self) -> float:
        return super().wall() + self.skew_s


@pytest.mark.parametrize("skew_s", [-5.0, 4.0], ids=["behind", "ahead"])
def test_a_peer_whose_clock_is_off_by_more_than_the_window_averages_with_the_others(
    skew_s: float,
) -> None:
    config = SwarmAveragerConfig(
        run_id="skew", join_window_s=JOIN_WINDOW_S, round_timeout_s=10.0, backend="p2p"
    )
    clocks = [SystemClock(), SystemClock(), SkewedClock(skew_s)]
    with contextlib.ExitStack() as stack:
        averagers = start_averagers(stack, 3, config, clocks=clocks)
        for round_ in range(2):  # the first samples the clocks itself, the next has heartbeats
            outcomes, took_s = average_all(averagers, f"outer/{round_}")
            for index, outcome in outcomes.items():
                assert outcome.group_size == 3, (round_, index, outcome)
                assert not outcome.excluded, (round_, index, outcome)
                torch.testing.assert_close(outcome.tensors[0], torch.full((100,), 1.0))
                # Nobody waits out a window: everyone came, the round closes at the last stamp.
                assert took_s[index] < JOIN_WINDOW_S, (round_, index, took_s)

        async def offset_of_skewed(node: Node) -> float | None:
            return node.peer_clocks.offset_s(averagers[2].peer_id, now_s=node.clock.monotonic())

        # The heartbeats' answers carry the responder's clock: the skew was measured as it is.
        measured = averagers[0].node_thread.run(offset_of_skewed, timeout_s=10)
        assert measured == pytest.approx(skew_s, abs=0.1)


def test_members_agree_while_a_newcomer_arrives_among_clocks_that_disagree() -> None:
    """A (on time) and B (3 s ahead) average: with two peers nobody can tell whose clock is
    right. C (on time) joins 4 s late to the next round, more than the window: whoever counts
    whom, no member waits for one that does not count it (no failed peers, no deadline). From
    then on B is the odd one out and stamps on A's and C's clock: all three average at once."""
    config = SwarmAveragerConfig(
        run_id="newcomer", join_window_s=JOIN_WINDOW_S, round_timeout_s=10.0, backend="p2p"
    )
    clocks = [SystemClock(), SkewedClock(3.0), SystemClock()]
    with contextlib.ExitStack() as stack:
        averagers = start_averagers(stack, 3, config, clocks=clocks, join_version=None)
        a, b, c = averagers
        a.join_run(0)
        b.join_run(0)
        outcomes, _ = average_all([a, b], "outer/0")
        assert [o.group_size for o in outcomes.values()] == [2, 2], outcomes
        c.join_run(0)
        outcomes, took_s = average_all(averagers, "outer/1", delays_s={2: 4.0})
        for index, outcome in outcomes.items():
            assert outcome.failed_peers == [], (index, outcome)
            assert took_s[index] < JOIN_WINDOW_S + 2.0, (index, took_s)
        for round_ in (2, 3):
            outcomes, took_s = average_all(averagers, f"outer/{round_}")
            for index, outcome in outcomes.items():
                assert outcome.group_size == 3, (round_, index, outcome)
                torch.testing.assert_close(outcome.tensors[0], torch.full((100,), 1.0))
                assert took_s[index] < JOIN_WINDOW_S, (round_, index, took_s)


def test_an_entry_stamped_hours_ahead_is_neither_awaited_nor_counted() -> None:
    config = SwarmAveragerConfig(
        run_id="forged", join_window_s=JOIN_WINDOW_S, round_timeout_s=10.0, backend="p2p"
    )
    with contextlib.ExitStack() as stack:
        averagers = start_averagers(stack, 3, config)
        liar = averagers[2]
        entry = {"at": time.time() + 3 * 3600, "bw": 1e7, "inc": liar.incarnation}
        key = round_entry_key(f"{config.run_id}/outer/0")

        async def put(node: Node) -> None:
            await node.dht.put(key, json.dumps(entry).encode(), 60.0)

        liar.node_thread.run(put, timeout_s=10)
        outcomes, took_s = average_all(averagers[:2], "outer/0")
        for index, outcome in outcomes.items():
            assert outcome.group_size == 2, outcome
            assert outcome.missing_peers == [liar.peer_id], outcome
            torch.testing.assert_close(outcome.tensors[0], torch.full((100,), 0.5))
            # Before, the close was the liar's stamp: the round waited out its whole deadline.
            assert took_s[index] < JOIN_WINDOW_S, took_s


@pytest.mark.parametrize("backend", ["p2p", "auto"])
def test_a_peer_behind_that_counts_one_that_did_not_count_it_stops_at_once(backend: str) -> None:
    """Two peers, B 3 s behind A: no majority can tell whose clock is right. B comes 5 s after
    A, after A's window and grace: A averaged alone. B's stamp is before A's close, so B counts
    A. A refuses B's round at B's first message (B announces itself to every member), and B
    ends the round at once with A failed, instead of waiting for A to its reduce deadline.
    With ``auto`` (torch on loopback) A refuses B's word at the torch round's start, so B
    stops waiting for it at the rendezvous at once, and A refuses its p2p re-run at once too."""
    config = SwarmAveragerConfig(
        run_id="behind", join_window_s=JOIN_WINDOW_S, round_timeout_s=10.0, backend=backend
    )
    clocks = [SystemClock(), SkewedClock(-3.0)]
    with contextlib.ExitStack() as stack:
        a, b = start_averagers(stack, 2, config, clocks=clocks)
        outcomes, took_s = average_all([a, b], "outer/0", delays_s={1: 5.0})
        assert outcomes[0].group_size == 1, outcomes
        assert outcomes[0].missing_peers == [b.peer_id], outcomes
        assert outcomes[1].failed_peers == [a.peer_id], outcomes
        torch.testing.assert_close(outcomes[1].tensors[0], torch.full((100,), 1.0))
        # Before: 5-7 s of waiting for A's part (the early-arrival timeout on A, or B's
        # reduce deadline where B had nothing to send A first); with auto, 15 s (the torch
        # timeout, then the re-run's deadline) and a round reported complete, later the torch
        # timeout (5 s here) then a re-run that ended at once.
        assert outcomes[1].communication_seconds < 2.0, outcomes
        assert took_s[1] < 3.0, took_s
