"""A swarm round's time, split: waiting for the group to form apart from the all-reduce.

Two real nodes on 127.0.0.1 average through :class:`SwarmAverager`; one comes to the round a
second late, so the other waits for it. Each averages inside a "communication" span, as the
training loop runs a strategy hook; the round's parts must be recorded nested in it under their
own phases, and no peer's phases may add up to more than the time it spent.
"""

from __future__ import annotations

import contextlib

import pytest

from gossamer.obs.metrics import PeerMetrics
from gossamer.obs.trace import PHASES, SpanRecorder
from gossamer.train.swarm_averager_config import SwarmAveragerConfig
from loopback_nodes import average_one_late

RUN = "time-split"
LATE_S = 1.0


def test_round_records_waiting_and_allreduce_nested_in_the_hook_span() -> None:
    metrics = [PeerMetrics(), PeerMetrics()]
    recorders = [SpanRecorder(peer=f"p{i}", sinks=[m.record_span]) for i, m in enumerate(metrics)]

    def hook_span(index: int) -> contextlib.AbstractContextManager[object]:
        return recorders[index].span("communication", step=0, hook="on_gradients")

    outcomes, took_s = average_one_late(
        SwarmAveragerConfig(run_id=RUN), LATE_S, "grad/0", around=hook_span
    )
    first, second = outcomes
    assert first.wait_seconds >= LATE_S * 0.7  # it waited for the late peer
    assert second.wait_seconds < first.wait_seconds
    for outcome in outcomes:
        assert outcome.communication_seconds > 0
        assert outcome.wait_seconds + outcome.communication_seconds <= outcome.seconds + 1e-6

    for index, outcome in enumerate(outcomes):
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
