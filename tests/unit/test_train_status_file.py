"""The status file a swarm peer keeps: what others read before training starts there."""

from __future__ import annotations

import json
from pathlib import Path

from gossamer.train.strategy import LocalStrategy
from gossamer.train.swarm import StatusFileListener


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
