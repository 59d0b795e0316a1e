"""A training peer serves Prometheus metrics over real HTTP on loopback."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gossamer.core.config import CheckpointConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
from gossamer.obs.metrics import PeerMetrics, serve_metrics
from gossamer.obs.trace import SpanRecorder
from gossamer.train import Trainer


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_training_metrics_are_served(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("while True:\n    break\n" * 500)
    config = RunConfig(
        model=ModelConfig(num_layers=1, num_heads=2, width=32, context=32),
        data=DataConfig(source="text", path=str(corpus)),
        train=TrainConfig(max_steps=6, batch_size=2, eval_batches=1, eval_every=0),
        checkpoint=CheckpointConfig(directory=str(tmp_path / "ckpt"), every_steps=3),
    )
    metrics = PeerMetrics()
    server = serve_metrics(metrics.registry, port=0)
    try:
        assert server.port > 0
        with Trainer(config, metrics=metrics, spans=SpanRecorder(peer="p0")) as trainer:
            trainer.run()
        samples = _scrape(server.url)
    finally:
        server.close()
    assert samples[("gossamer_train_step", ())] == 6
    assert samples[("gossamer_train_tokens_total", ())] == 6 * 2 * 32
    assert 0 < samples[("gossamer_train_loss", ())] < 10
    assert samples[("gossamer_time_seconds_total", (("phase", "compute"),))] > 0
    assert samples[("gossamer_time_seconds_total", (("phase", "checkpoint"),))] > 0
    assert samples[("gossamer_checkpoint_write_seconds_count", ())] == 2
    assert 0 < samples[("gossamer_goodput_ratio", ())] <= 1.0
    assert samples[("gossamer_train_tokens_per_second", ())] > 0
