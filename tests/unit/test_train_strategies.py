"""DiLoCo and synchronous data parallel among peers that are threads of one process."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from gossamer.core.config import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from gossamer.core.errors import DeadlineExceededError
from gossamer.core.hashing import sha256_state
from gossamer.train import Trainer, TrainResult
from gossamer.train.averaging import InProcessGroup
from gossamer.train.diloco import DiLoCoConfig, DiLoCoStrategy
from gossamer.train.strategy import TrainingStrategy
from gossamer.train.sync import SyncStrategy
from gossamer.train.thread_swarm import run_thread_swarm

NUM_PEERS = 3


def _config(tmp_path: Path, peer: int, max_steps: int) -> RunConfig:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("def f(x):\n    return x + 1\n" * 300 + "import sys\n" * 200)
    return RunConfig(
        model=ModelConfig(num_layers=1, num_heads=2, width=32, context=32),
        data=DataConfig(source="text", path=str(corpus)),
        optim=OptimConfig(lr=1e-2, warmup_steps=2),
        train=TrainConfig(max_steps=max_steps, batch_size=4, eval_every=0, eval_batches=2),
        checkpoint=CheckpointConfig(directory=str(tmp_path / f"peer{peer}"), every_steps=0),
    )


def _run_peers(
    tmp_path: Path, strategies: list[TrainingStrategy], max_steps: int
) -> tuple[list[Trainer], list[TrainResult]]:
    swarm = run_thread_swarm(
        _config(tmp_path, 0, max_steps), strategies, checkpoint_root=tmp_path, timeout_s=120
    )
    return swarm.trainers, swarm.results


def test_diloco_peers_agree_on_global_weights_and_learn(tmp_path: Path) -> None:
    group = InProcessGroup(NUM_PEERS)
    strategies = [
        DiLoCoStrategy(DiLoCoConfig(inner_steps=5), group.averager()) for _ in range(NUM_PEERS)
    ]
    trainers, results = _run_peers(tmp_path, list(strategies), max_steps=20)
    assert {s.outer_step for s in strategies} == {4}
    assert len({s.global_weights_hash() for s in strategies}) == 1
    # After an outer step every local model restarts from the global weights.
    assert len({sha256_state(t.model.state_dict()) for t in trainers}) == 1
    assert all(r.val_loss_after < r.val_loss_before for r in results)
    num_params = sum(p.numel() for p in trainers[0].model.parameters())
    expected = 4 * int(2 * (NUM_PEERS - 1) / NUM_PEERS * num_params * 4)
    assert strategies[0].bytes_sent == expected


def test_sync_peers_stay_identical(tmp_path: Path) -> None:
    group = InProcessGroup(NUM_PEERS)
    strategies = [SyncStrategy(group.averager()) for _ in range(NUM_PEERS)]
    trainers, results = _run_peers(tmp_path, list(strategies), max_steps=6)
    assert len({sha256_state(t.model.state_dict()) for t in trainers}) == 1
    assert all(r.steps_done == 6 for r in results)
    assert all(s.last_group_size == NUM_PEERS for s in strategies)


def test_diloco_state_survives_a_checkpoint(tmp_path: Path) -> None:
    group = InProcessGroup(1)
    config = _config(tmp_path, 0, max_steps=10)
    strategy = DiLoCoStrategy(DiLoCoConfig(inner_steps=3), group.averager())
    with Trainer(config, strategy=strategy) as trainer:
        trainer.run()
    restored = DiLoCoStrategy(DiLoCoConfig(inner_steps=3), group.averager())
    with Trainer(config, strategy=restored):
        assert restored.outer_step == strategy.outer_step == 3
        assert restored.global_weights_hash() == strategy.global_weights_hash()
        assert restored.bytes_sent == strategy.bytes_sent


def test_in_process_round_times_out_when_peers_are_missing() -> None:
    group = InProcessGroup(2, timeout_s=0.05)
    with pytest.raises(DeadlineExceededError, match="1 of 2 peers"):
        group.averager().average([torch.ones(3)], round_key="r", weight=1.0)


def test_weighted_average() -> None:
    group = InProcessGroup(2)
    out: list[torch.Tensor] = []

    def second() -> None:
        out.extend(
            group.averager().average([torch.full((2,), 4.0)], round_key="r", weight=3.0).tensors
        )

    thread = threading.Thread(target=second)
    thread.start()
    mine = group.averager().average([torch.zeros(2)], round_key="r", weight=1.0)
    thread.join(timeout=10)
    assert torch.equal(mine.tensors[0], torch.full((2,), 3.0))
    assert torch.equal(out[0], mine.tensors[0])


def test_diloco_config_is_checked() -> None:
    with pytest.raises(ValueError, match="inner_steps"):
        DiLoCoConfig(inner_steps=0)
    with pytest.raises(ValueError, match="outer_momentum"):
        DiLoCoConfig(outer_momentum=1.0)


def test_lossy_codec_is_applied_and_counted() -> None:
    from gossamer.comm.codecs import CodecPolicy

    exact, lossy = InProcessGroup(1), InProcessGroup(1, codec=CodecPolicy(codec="int8"))
    tensor = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    plain = exact.averager().average([tensor], round_key="r", weight=1.0)
    averager = lossy.averager()
    squeezed = averager.average([tensor], round_key="r", weight=1.0)
    assert torch.equal(plain.tensors[0], tensor)
    assert not torch.equal(squeezed.tensors[0], tensor)
    assert torch.allclose(squeezed.tensors[0], tensor, atol=0.05)
    assert averager.feedback.residual_norm("0") > 0  # the residual is kept for the next round
    group = InProcessGroup(2, codec=CodecPolicy(codec="int8"))
    outcomes = []
    thread = threading.Thread(
        target=lambda: outcomes.append(
            group.averager().average([tensor], round_key="r", weight=1.0)
        )
    )
    thread.start()
    mine = group.averager().average([tensor], round_key="r", weight=1.0)
    thread.join(timeout=10)
    fp32_ring_bytes = 2 * (1 / 2) * tensor.numel() * 4
    assert mine.bytes_sent < fp32_ring_bytes / 3.5
