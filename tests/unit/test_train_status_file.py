"""The status file a swarm peer keeps: what others read before training starts there."""

from __future__ import annotations

import json
import math
from pathlib import Path

from gossamer.train.run_events import TrainResult
from gossamer.train.strategy import LocalStrategy
from gossamer.train.swarm_status_file import StatusFileListener


def test_the_address_is_in_the_status_file_before_training_starts(tmp_path: Path) -> None:
    # Peers (and the demo, and the fault tests) join through an address they read here. It
    # was written only with the first training event, seconds after the node listened: the
    # first peer of a run trained that long alone before anyone could join it.
    path = tmp_path / "peer.json"
    status = StatusFileListener(path, peer_id="p", strategy=LocalStrategy())
    assert json.loads(path.read_text())["state"] == "starting"
    status.publish(address="127.0.0.1:4000", metrics_url="http://127.0.0.1:9000/metrics")
    written = json.loads(path.read_text())
    assert written["address"] == "127.0.0.1:4000"
    assert written["metrics_url"] == "http://127.0.0.1:9000/metrics"
    assert written["state"] == "starting"


def test_a_run_interrupted_says_so_and_no_stale_loss(tmp_path: Path) -> None:
    # A peer stopped by Ctrl-C or SIGTERM wrote "done" (the demo and the fault tests take
    # that for a finished run), with the loss measured when it started.
    path = tmp_path / "peer.json"
    status = StatusFileListener(path, peer_id="p", strategy=LocalStrategy())
    result = TrainResult(
        start_step=0,
        steps_done=37,
        tokens_trained=370,
        tokens_this_session=370,
        train_seconds=1.0,
        wall_seconds=1.5,
        val_loss_before=5.5,
        val_loss_after=math.nan,
        final_train_loss=2.0,
        checkpoint_path=tmp_path / "step-000000037",
        resumed_from=None,
        stopped_by_time_budget=False,
        num_parameters=10,
        interrupted=True,
    )
    status.finish(result)
    written = json.loads(path.read_text())  # (strict JSON: NaN is none)
    assert (written["state"], written["step"], written["val_loss"]) == ("interrupted", 37, None)
