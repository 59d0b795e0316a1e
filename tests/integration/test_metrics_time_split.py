"""A swarm round's time, split: waiting for the group to form apart from the all-reduce.

Two real nodes on 127.0.0.1 average through :class:`SwarmAverager`; one comes to the round a
second late, so the other waits for it. Each averages inside a "communication" span, as the
training loop runs a strategy hook; the round's parts must be recorded nested in it under their
own phases, and no peer's phases may add up to more than the time it spent.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from gossamer.obs.metrics import PeerMetrics
from gossamer.obs.trace import PHASES, SpanRecorder
from gossamer.train.averaging import AverageOutcome
from gossamer.train.swarm_averager import SwarmAverager, SwarmAveragerConfig
from loopback_nodes import start_node_threads

RUN = "time-split"
LATE_S = 1.0


@contextlib.contextmanager
def averagers() -> Iterator[list[SwarmAverager]]:
    with contextlib.ExitStack() as stack:
        made: list[SwarmAverager] = []
        for node_thread in start_node_threads(stack, 2):
            averager = SwarmAverager(node_thread, SwarmAveragerConfig(run_id=RUN))
            averager.join_run(0)
            stack.callback(averager.leave_run)
            made.append(averager)
        yield made


def test_round_records_waiting_and_allreduce_nested_in_the_hook_span() -> None:
    metrics = [PeerMetrics(), PeerMetrics()]
    recorders = [SpanRecorder(peer=f"p{i}", sinks=[m.record_span]) for i, m in enumerate(metrics)]
    outcomes: list[AverageOutcome | None] = [None, None]
    took_s = [0.0, 0.0]
    errors: list[BaseException] = []

    with averagers() as (early, late):

        def peer(index: int, averager: SwarmAverager, delay_s: float) -> None:
            try:
                time.sleep(delay_s)  # this peer's own work before the round
                started = time.monotonic()
                with recorders[index].span("communication", step=0, hook="on_gradients"):
                    outcomes[index] = averager.average(
                        [torch.full((1000,), float(index))], round_key="grad/0", weight=1.0
                    )
                took_s[index] = time.monotonic() - started
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=peer, args=(0, early, 0.0)),
            threading.Thread(target=peer, args=(1, late, LATE_S)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert not errors, errors
    first, second = outcomes
    assert first is not None
    assert second is not None
    assert first.group_size == second.group_size == 2
    assert torch.allclose(first.tensors[0], torch.full((1000,), 0.5))

    assert first.wait_seconds >= LATE_S * 0.7  # it waited for the late peer
    assert second.wait_seconds < first.wait_seconds
    for outcome in outcomes:
        assert outcome is not None
        assert outcome.communication_seconds > 0
        assert outcome.wait_seconds + outcome.communication_seconds <= outcome.seconds + 1e-6

    for index, outcome in enumerate(outcomes):
        assert outcome is not None
        spans = {s.name: s for s in recorders[index].spans() if s.within}
        assert set(spans) == {"waiting", "communication"}
        assert spans["waiting"].duration_s == pytest.approx(outcome.wait_seconds)
        assert spans["communication"].duration_s == pytest.approx(outcome.communication_seconds)
        assert spans["communication"].attrs["round"] == f"{RUN}/grad/0"
        value = metrics[index].registry.get_sample_value
        per_phase = {p: value("gossamer_time_seconds_total", {"phase": p}) for p in PHASES}
        assert per_phase["waiting"] == pytest.approx(outcome.wait_seconds)
        assert sum(v or 0.0 for v in per_phase.values()) <= took_s[index] + 1e-6
        assert per_phase["communication"] >= outcome.communication_seconds
