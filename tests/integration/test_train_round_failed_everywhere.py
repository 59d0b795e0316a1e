"""A DiLoCo round that fails on every member is formed again at the next boundary.

Two swarm DiLoCo peers on real nodes on 127.0.0.1 (TLS gRPC, DHT, state donors) take blocking
rounds every 2 steps; the all-reduce of outer step 1's round fails on both (as a deadline does)
or returns an average of NaN (as a peer that sent NaN as it was makes it). Before, nobody's
state moved, yet each waited 30 s for a newer state from the others, then came back to the same
round key, found the failed round's close (earlier than its new stamp) and missed the round
again: no averaging for the rest of the run, and its steps thrown away at the end (the NaN
average was applied instead, and every peer's weights turned NaN).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from gossamer.core.errors import DeadlineExceededError
from gossamer.net.node import Node
from gossamer.train import swarm_averager, swarm_catch_up
from gossamer.train.diloco_config import DiLoCoConfig
from gossamer.train.state_sync_donor import StateDonor
from gossamer.train.swarm_averager import SwarmAverager
from gossamer.train.swarm_averager_config import SwarmAveragerConfig
from gossamer.train.swarm_diloco import SwarmDiLoCoStrategy
from loopback_nodes import average_all, start_averagers, start_node_threads

RUN = "failed-everywhere"
STEPS = 6  # boundaries at steps 1, 3 and 5: outer/0, outer/1 (fails), outer/1#1
FAILING_KEY = f"{RUN}/{RUN}/outer/1"


@contextlib.contextmanager
def two_peers(
    config: SwarmAveragerConfig | None = None, *, train_while_forming: bool = False
) -> Iterator[list[tuple[SwarmDiLoCoStrategy, nn.Module]]]:
    config = config or SwarmAveragerConfig(run_id=RUN, backend="p2p", join_window_s=10.0)
    with contextlib.ExitStack() as stack:
        made = []
        for node_thread in start_node_threads(stack, 2):

            async def make_donor(node: Node) -> StateDonor:
                return StateDonor(node)

            donor = node_thread.run(make_donor, timeout_s=10)
            stack.callback(donor.close)
            averager = SwarmAverager(node_thread, config)
            strategy = SwarmDiLoCoStrategy(
                # lr 1, no momentum: the global weights move by exactly the average progress
                DiLoCoConfig(
                    inner_steps=2,
                    outer_lr=1.0,
                    outer_momentum=0.0,
                    run_id=RUN,
                    train_while_forming=train_while_forming,
                ),
                averager,
                node_thread,
                donor,
                join_existing=False,
            )
            stack.callback(strategy.close)
            model = nn.Linear(4, 2)
            with torch.no_grad():
                for param in model.parameters():
                    param.fill_(1.0)
            strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
            made.append((strategy, model))
        yield made


def train_together(
    made: list[tuple[SwarmDiLoCoStrategy, nn.Module]], steps: int = STEPS
) -> list[float]:
    """Peer i moves every weight by ``0.01 (i + 1)`` per step for ``steps`` steps; the seconds
    each took."""
    took_s = [math.inf] * len(made)
    errors: list[BaseException] = []

    def peer(index: int) -> None:
        strategy, model = made[index]
        started = time.monotonic()
        try:
            for step in range(steps):
                with torch.no_grad():
                    for param in model.parameters():
                        param.add_(0.01 * (index + 1))
                strategy.on_step_end(model, step)
            strategy.finish(model, steps)
        except BaseException as exc:
            errors.append(exc)
        took_s[index] = time.monotonic() - started

    threads = [threading.Thread(target=peer, args=(i,)) for i in range(len(made))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=100)
    assert not errors, errors
    return took_s


@pytest.mark.timeout(120)
@pytest.mark.parametrize("failure", ["deadline", "nan"])
def test_a_round_that_failed_on_every_member_is_formed_again_with_its_progress(
    monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    # (shorter than the 30 s: the old code waited that twice, and still failed below)
    monkeypatch.setattr(swarm_catch_up, "_NEWER_STATE_WAIT_S", 5.0)
    real_all_reduce = swarm_averager.all_reduce
    failed_keys: list[str] = []

    async def failing_once(tensors: list[torch.Tensor], **kwargs: Any) -> Any:
        key = kwargs["round_key"]
        if key != FAILING_KEY:
            return await real_all_reduce(tensors, **kwargs)
        failed_keys.append(key)
        if failure == "deadline":
            raise DeadlineExceededError(f"round {key} ran past its deadline")
        result = await real_all_reduce(tensors, **kwargs)
        result.tensors = [torch.full_like(t, math.nan) for t in result.tensors]
        return result

    monkeypatch.setattr(swarm_averager, "all_reduce", failing_once)
    with two_peers() as made:
        took_s = train_together(made)
        assert failed_keys == [FAILING_KEY] * 2  # every member's, once
        # Both progress of the failed round (steps 2, 3) and of the next (4, 5) went into the
        # round formed again, outer/1#1: 0.015 a step on average, 2 steps, then 4.
        for strategy, model in made:
            assert strategy.outer_step == 2
            assert strategy.round_attempt == 0
            assert strategy.resyncs == 0
            for param in model.parameters():
                torch.testing.assert_close(param.detach(), torch.full_like(param, 1.0 + 0.09))
        assert made[0][0].global_weights_hash() == made[1][0].global_weights_hash()
        assert max(took_s) < 25.0, took_s  # no wait for a state nobody publishes


@pytest.mark.timeout(60)
def test_a_round_failed_everywhere_only_once_each_member_said_it_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One member's all-reduce fails; the other finishes without it and may apply its average:
    # the first must wait for its state, not form the round again (they would go on from
    # different weights). Once the other says the round failed on it too, it failed everywhere.
    config = SwarmAveragerConfig(
        run_id="said", backend="p2p", join_window_s=10.0, round_timeout_s=3.0
    )
    with contextlib.ExitStack() as stack:
        failing, other = start_averagers(stack, 2, config)
        real_all_reduce = swarm_averager.all_reduce

        async def fails_on_one(tensors: list[torch.Tensor], **kwargs: Any) -> Any:
            if kwargs["mailbox"] is failing._mailbox:
                raise DeadlineExceededError("this member's all-reduce ran past its deadline")
            return await real_all_reduce(tensors, **kwargs)

        monkeypatch.setattr(swarm_averager, "all_reduce", fails_on_one)
        outcomes, _ = average_all([failing, other], "outer/4")
        assert outcomes[0].excluded
        assert not outcomes[1].excluded, outcomes[1]
        assert not failing.failed_everywhere("outer/4")
        other.report_failed("outer/4")  # (its strategy could not use the average either)
        assert failing.failed_everywhere("outer/4")
        assert other.failed_everywhere("outer/4")
        assert not failing.failed_everywhere("outer/5")  # (a round that never closed)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("train_while_forming", [False, True])
def test_members_that_fail_far_apart_form_the_next_attempt_at_the_same_boundary(
    monkeypatch: pytest.MonkeyPatch, train_while_forming: bool
) -> None:
    # The round of outer step 1 fails on the first peer at once, on the second only after
    # longer than a peer waits for a newer state. Before, the first gave up waiting (the
    # second had not said it failed yet), came back to the same closed key at its next
    # boundary and missed it again, and only then formed outer/1#1: a boundary after the
    # second did. Every later round paired boundaries a step apart, and the peers ended one
    # outer step apart with different weights.
    monkeypatch.setattr(swarm_catch_up, "_NEWER_STATE_WAIT_S", 2.0)
    real_all_reduce = swarm_averager.all_reduce
    delays_s: dict[object, float] = {}
    failed_keys: list[str] = []

    async def failing_apart(tensors: list[torch.Tensor], **kwargs: Any) -> Any:
        key = kwargs["round_key"]
        if key != FAILING_KEY:
            return await real_all_reduce(tensors, **kwargs)
        failed_keys.append(key)
        await asyncio.sleep(delays_s[kwargs["mailbox"]])  # (the second peer's: a long round)
        raise DeadlineExceededError(f"round {key} ran past its deadline")

    monkeypatch.setattr(swarm_averager, "all_reduce", failing_apart)
    config = SwarmAveragerConfig(run_id=RUN, backend="p2p", join_window_s=10.0, round_timeout_s=8.0)
    with two_peers(config, train_while_forming=train_while_forming) as made:
        delays_s[made[0][0].swarm_averager._mailbox] = 0.0
        delays_s[made[1][0].swarm_averager._mailbox] = 6.0
        steps = 10  # boundaries at steps 1, 3, 5, 7 and 9: outer/0, /1 (fails), /1#1, /2, /3
        took_s = train_together(made, steps)
        assert failed_keys == [FAILING_KEY] * 2
        assert [s.outer_step for s, _ in made] == [4, 4]
        assert made[0][0].global_weights_hash() == made[1][0].global_weights_hash()
        for strategy, model in made:
            assert strategy.resyncs == 0
            # Every step's progress, the failed round's included, went into an average.
            for param in model.parameters():
                torch.testing.assert_close(param.detach(), torch.full_like(param, 1.15))
        assert max(took_s) < 60.0, took_s
