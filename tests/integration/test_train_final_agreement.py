"""Swarm DiLoCo peers that end a run with different weights agree before they stop.

Real nodes on 127.0.0.1 (TLS gRPC, DHT, state donors); the divergence is made by hand after the
last outer step, where no later round's hash check could repair it.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import final_agreement_support as support
from gossamer.net.node import Node
from gossamer.train.diloco_config import DiLoCoConfig
from gossamer.train.state_sync_donor import StateDonor
from gossamer.train.swarm_averager import SwarmAverager
from gossamer.train.swarm_averager_config import SwarmAveragerConfig
from gossamer.train.swarm_diloco import SwarmDiLoCoStrategy
from loopback_nodes import start_node_threads

RUN = "final-agreement"
FINAL_OUTER_STEP = 3
FINAL_STEP = 6


@dataclass
class Peer:
    strategy: SwarmDiLoCoStrategy
    model: nn.Module


@contextlib.contextmanager
def peers(count: int) -> Iterator[list[Peer]]:
    with contextlib.ExitStack() as stack:
        made: list[Peer] = []
        for node_thread in start_node_threads(stack, count):

            async def make_donor(node: Node) -> StateDonor:
                return StateDonor(node)

            donor = node_thread.run(make_donor, timeout_s=10)
            stack.callback(donor.close)
            averager = SwarmAverager(node_thread, SwarmAveragerConfig(run_id=RUN))
            strategy = SwarmDiLoCoStrategy(
                DiLoCoConfig(inner_steps=2, run_id=RUN),
                averager,
                node_thread,
                donor,
                join_existing=False,
            )
            stack.callback(strategy.close)
            torch.manual_seed(0)  # every peer starts from the same weights, as a run does
            model = nn.Linear(8, 4)
            strategy.setup(model, torch.optim.AdamW(model.parameters()))
            made.append(Peer(strategy, model))
        yield made


def end_run_with(peer: Peer, value: float) -> None:
    """Make ``peer`` stand after the final outer step with every global weight at ``value``."""
    support.end_run_with(
        peer.strategy, peer.model, value, outer_step=FINAL_OUTER_STEP, step=FINAL_STEP
    )


def finish_all(made: list[Peer]) -> list[bool]:
    finishes = [functools.partial(p.strategy.finish, p.model, FINAL_STEP) for p in made]
    return support.finish_all(finishes)[0]


@pytest.mark.timeout(120)
def test_the_minority_takes_the_majoritys_final_state() -> None:
    with peers(3) as made:
        for peer, value in zip(made, [1.0, 2.0, 1.0], strict=True):
            end_run_with(peer, value)
        replaced = finish_all(made)
        assert replaced == [False, True, False]
        hashes = {p.strategy.global_weights_hash() for p in made}
        assert len(hashes) == 1
        odd = made[1]
        assert odd.strategy.resyncs == 1
        assert odd.strategy.outer_step == FINAL_OUTER_STEP
        for param in odd.model.parameters():  # the model itself, not only the global copy
            assert torch.equal(param.detach(), torch.full_like(param, 1.0))


@pytest.mark.timeout(120)
def test_two_equal_camps_settle_on_one_state() -> None:
    with peers(2) as made:
        end_run_with(made[0], 1.0)
        end_run_with(made[1], 2.0)
        replaced = finish_all(made)
        assert sorted(replaced) == [False, True]  # exactly one of them gave way
        assert made[0].strategy.global_weights_hash() == made[1].strategy.global_weights_hash()


@pytest.mark.timeout(120)
def test_peers_that_agree_finish_without_resyncing() -> None:
    with peers(3) as made:
        for peer in made:
            end_run_with(peer, 1.5)
        assert finish_all(made) == [False, False, False]
        assert all(p.strategy.resyncs == 0 for p in made)


@pytest.mark.timeout(120)
def test_the_majority_stays_until_a_peer_its_detector_lost_has_taken_its_state() -> None:
    # Under load a peer's heartbeats came late: the majority's holder counted it gone, saw
    # agreement among the rest and left; the other then had no donor and ended with its own.
    with peers(2) as made:
        end_run_with(made[0], 1.0)
        end_run_with(made[1], 2.0)
        hashes = [p.strategy.global_weights_hash() for p in made]
        holder = max(range(2), key=lambda i: hashes[i])  # a 1-1 tie goes to the larger hash
        averager = made[holder].strategy.swarm_averager
        real_states = averager.run_states
        looks = [0]

        def late_heartbeats() -> dict[str, tuple[str, int]]:
            looks[0] += 1
            return {} if looks[0] <= 3 else real_states()

        averager.run_states = late_heartbeats  # type: ignore[method-assign]
        replaced: list[bool | None] = [None, None]

        def finish(index: int) -> None:
            peer = made[index]
            replaced[index] = peer.strategy.finish(peer.model, FINAL_STEP)
            peer.strategy.donor.close()  # its process exits: it serves its state no more

        threads = [threading.Thread(target=finish, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert replaced[holder] is False
        assert replaced[1 - holder] is True
        assert made[0].strategy.global_weights_hash() == made[1].strategy.global_weights_hash()
