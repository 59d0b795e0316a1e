"""Ending a swarm DiLoCo run by hand for the final agreement's tests: every peer standing after
the final outer step with weights of the test's choosing, and every peer's ``finish()`` at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from gossamer.train.swarm_diloco import SwarmDiLoCoStrategy


def end_run_with(
    strategy: SwarmDiLoCoStrategy,
    model: nn.Module,
    value: float,
    *,
    outer_step: int,
    step: int,
    published: bool = False,
) -> None:
    """Make a peer stand after the final ``outer_step`` (at ``step``) with every global weight,
    and its model's, at ``value``; with ``published``, once its hash is out."""
    strategy.outer_step = outer_step
    with torch.no_grad():
        for tensor, param in zip(strategy._global, model.parameters(), strict=True):
            tensor.fill_(value)
            param.fill_(value)
    strategy._publish_outer_step(step=step)
    if published:
        strategy._wait_for_publication()


def finish_all(
    finishes: Sequence[Callable[[], bool]], *, then: Callable[[int], None] | None = None
) -> tuple[list[bool], list[float]]:
    """Every peer's ``finish()`` (each of ``finishes``) at once, in threads, and ``then`` with
    its index once one returned. Returns what each returned and how long after the start."""
    replaced: list[bool | None] = [None] * len(finishes)
    took_s = [0.0] * len(finishes)
    started = time.monotonic()

    def finish(index: int) -> None:
        replaced[index] = finishes[index]()
        took_s[index] = time.monotonic() - started
        if then is not None:
            then(index)

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(len(finishes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(r is not None for r in replaced), "a peer's finish() did not return"
    return [bool(r) for r in replaced], took_s
