"""A real Prometheus server scrapes a training peer and answers queries about it."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from gossamer.core.config import CheckpointConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
from gossamer.obs.metrics import PeerMetrics, serve_metrics
from gossamer.obs.trace import PHASES
from gossamer.train import Trainer

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="needs Debian's prometheus package (make test installs it when run as root)",
)


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _query(base: str, expr: str) -> list[dict[str, object]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success"
    result: list[dict[str, object]] = body["data"]["result"]
    return result


def _wait_for_series(base: str, expr: str, deadline_s: float) -> list[dict[str, object]]:
    deadline = time.monotonic() + deadline_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = _query(base, expr)
            if result:
                return result
        except OSError as exc:  # not listening yet
            last_error = exc
        time.sleep(0.25)
    raise AssertionError(f"no series for {expr} within {deadline_s} s (last error: {last_error})")


def test_prometheus_scrapes_a_training_peer(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("x = [i * i for i in range(9)]\n" * 400)
    config = RunConfig(
        model=ModelConfig(num_layers=1, num_heads=2, width=32, context=32),
        data=DataConfig(source="text", path=str(corpus)),
        train=TrainConfig(max_steps=8, batch_size=2, eval_batches=1, eval_every=0),
        checkpoint=CheckpointConfig(directory=str(tmp_path / "ckpt")),
    )
    metrics = PeerMetrics()
    server = serve_metrics(metrics.registry, port=0)
    web_port = _free_loopback_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: gossamer\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.port}']\n"
    )
    assert PROMETHEUS is not None
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        started = time.monotonic()
        with Trainer(config, metrics=metrics) as trainer:
            trainer.run()
        wall_s = time.monotonic() - started
        base = f"http://127.0.0.1:{web_port}"
        steps = _wait_for_series(base, "gossamer_train_step == 8", deadline_s=40)
        assert steps[0]["metric"]["job"] == "gossamer"  # type: ignore[index]
        compute = _wait_for_series(
            base, 'gossamer_time_seconds_total{phase="compute"} > 0', deadline_s=10
        )
        assert float(compute[0]["value"][1]) > 0  # type: ignore[index]
        # The time split: every phase is a series, the setup and the end are "sync", and no
        # second is counted twice (the phases add up to at most the run's wall time).
        phases = _wait_for_series(base, "gossamer_time_seconds_total", deadline_s=10)
        assert {p["metric"]["phase"] for p in phases} == set(PHASES)  # type: ignore[index]
        _wait_for_series(base, 'gossamer_time_seconds_total{phase="sync"} > 0', deadline_s=10)
        total = _wait_for_series(base, "sum(gossamer_time_seconds_total)", deadline_s=10)
        assert 0 < float(total[0]["value"][1]) <= wall_s  # type: ignore[index]
        tokens = _wait_for_series(base, "gossamer_train_tokens_total", deadline_s=10)
        assert float(tokens[0]["value"][1]) == 8 * 2 * 32  # type: ignore[index]
        goodput = _wait_for_series(base, "gossamer_goodput_ratio", deadline_s=10)
        assert 0 < float(goodput[0]["value"][1]) <= 1  # type: ignore[index]
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()
        server.close()
