"""Real nodes on 127.0.0.1 for in-process integration tests: each joins through the first."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence

import torch

from gossamer.core.clock import Clock, SystemClock
from gossamer.net.bridge import NodeThread
from gossamer.net.config import HeartbeatConfig, NodeConfig
from gossamer.net.node import Node
from gossamer.train.averaging import AverageOutcome
from gossamer.train.swarm_averager import SwarmAverager
from gossamer.train.swarm_averager_config import SwarmAveragerConfig

__all__ = [
    "average_all",
    "average_one_late",
    "start_averagers",
    "start_node_threads",
    "until",
]


async def until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Wait for ``condition`` (state of nodes running on this event loop) under a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if condition():
            return
        await asyncio.sleep(0.02)  # polling in-process state under a deadline
    raise AssertionError(f"{what} within {timeout_s} s")


def start_node_threads(
    stack: contextlib.ExitStack, count: int, clocks: Sequence[Clock] | None = None
) -> list[NodeThread]:
    """Start ``count`` node threads (stopped when ``stack`` closes), all bootstrapped from the
    first, with the heartbeats swarm peers use (0.5 s, gone after 2.5 s); node ``i`` runs on
    ``clocks[i]`` if given (the system clock otherwise)."""
    threads: list[NodeThread] = []
    bootstrap: tuple[str, ...] = ()
    for index in range(count):
        config = NodeConfig(
            listen_address="127.0.0.1:0",
            bootstrap=bootstrap,
            heartbeat=HeartbeatConfig(interval_s=0.5, timeout_s=2.5),
        )
        clock = clocks[index] if clocks is not None else SystemClock()
        node_thread = stack.enter_context(
            NodeThread(config, node_factory=lambda c, i, clock=clock: Node(c, i, clock=clock))
        )
        if not bootstrap:
            node = node_thread.node
            bootstrap = (f"{node.peer_id}@{node.addresses[0]}",)
        threads.append(node_thread)
    return threads


def start_averagers(
    stack: contextlib.ExitStack,
    count: int,
    config: SwarmAveragerConfig,
    *,
    clocks: Sequence[Clock] | None = None,
    join_version: int | None = 0,
) -> list[SwarmAverager]:
    """``count`` swarm averagers on fresh loopback nodes (see :func:`start_node_threads`),
    closed when ``stack`` closes, each joined to the run at ``join_version`` (None: not yet)."""
    made = []
    for node_thread in start_node_threads(stack, count, clocks):
        averager = SwarmAverager(node_thread, config)
        stack.callback(averager.close)
        if join_version is not None:
            averager.join_run(join_version)
        made.append(averager)
    return made


def average_all(
    averagers: list[SwarmAverager],
    round_key: str,
    delays_s: dict[int, float] | None = None,
    *,
    numel: int = 100,
) -> tuple[dict[int, AverageOutcome], dict[int, float]]:
    """Every averager averages ``[full(numel, index)]`` in ``round_key`` at once (``delays_s``
    later for those it names); the outcomes and how long each call took, by index."""
    outcomes: dict[int, AverageOutcome] = {}
    took_s: dict[int, float] = {}
    errors: list[BaseException] = []

    def peer(index: int) -> None:
        try:
            time.sleep((delays_s or {}).get(index, 0.0))
            started = time.monotonic()
            outcomes[index] = averagers[index].average(
                [torch.full((numel,), float(index))], round_key=round_key, weight=1.0
            )
            took_s[index] = time.monotonic() - started
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=peer, args=(i,)) for i in range(len(averagers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return outcomes, took_s


def average_one_late(
    config: SwarmAveragerConfig,
    late_s: float,
    round_key: str,
    around: Callable[[int], contextlib.AbstractContextManager[object]] | None = None,
) -> tuple[list[AverageOutcome], list[float]]:
    """Two swarm averagers on real loopback nodes average ``[full(1000, index)]`` in one round,
    the second coming ``late_s`` later; each call runs inside ``around(index)`` if given.

    Returns:
        Each peer's outcome and how long its call took.
    """
    outcomes: list[AverageOutcome | None] = [None, None]
    took_s = [0.0, 0.0]
    errors: list[BaseException] = []
    with contextlib.ExitStack() as stack:
        averagers = []
        for node_thread in start_node_threads(stack, 2):
            averager = SwarmAverager(node_thread, config)
            averager.join_run(0)
            stack.callback(averager.leave_run)
            averagers.append(averager)

        def peer(index: int, delay_s: float) -> None:
            try:
                time.sleep(delay_s)  # this peer's own work before the round
                started = time.monotonic()
                with around(index) if around else contextlib.nullcontext():
                    outcomes[index] = averagers[index].average(
                        [torch.full((1000,), float(index))], round_key=round_key, weight=1.0
                    )
                took_s[index] = time.monotonic() - started
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=peer, args=(0, 0.0)),
            threading.Thread(target=peer, args=(1, late_s)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert not errors, errors
    done = [o for o in outcomes if o is not None]
    assert len(done) == 2, "a peer did not finish its round"
    for outcome in done:
        assert outcome.group_size == 2
        assert torch.allclose(outcome.tensors[0], torch.full((1000,), 0.5))
    return done, took_s
