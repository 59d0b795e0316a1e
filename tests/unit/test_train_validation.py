"""Validation losses compare across runs whatever their training batch size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gossamer.core.config import CheckpointConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
from gossamer.data import TokenSource, validation_batches
from gossamer.data.streams import VALIDATION_SEQUENCES_PER_BATCH
from gossamer.train import Trainer

TEXT = "def add(a, b):\n    return a + b\n\n" * 200 + "class Point:\n    x: int\n    y: int\n" * 100


def _config(tmp_path: Path, batch_size: int) -> RunConfig:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(TEXT)
    return RunConfig(
        model=ModelConfig(num_layers=1, num_heads=2, width=32, context=32),
        data=DataConfig(source="text", path=str(corpus), validation_fraction=0.1),
        train=TrainConfig(max_steps=4, batch_size=batch_size, eval_every=0, eval_batches=2),
        checkpoint=CheckpointConfig(directory=str(tmp_path / f"b{batch_size}"), every_steps=0),
    )


@pytest.mark.parametrize("batch_size", [1, 3, 4, 6, 16, 64])
def test_the_validation_set_does_not_depend_on_the_training_batch_size(
    tmp_path: Path, batch_size: int
) -> None:
    # The validation batches were cut by train.batch_size: the same checkpoint's validation
    # loss changed with it (3.43 at 4, 3.38 at 16 in the review's run).
    with Trainer(_config(tmp_path, 16)) as reference:
        expected = torch.cat([inputs for inputs, _ in reference.val_batches])
        model = reference.model
        loss = reference.evaluate()
    with Trainer(_config(tmp_path, batch_size)) as other:
        sequences = torch.cat([inputs for inputs, _ in other.val_batches])
        assert torch.equal(sequences, expected)
        assert len(sequences) == 2 * VALIDATION_SEQUENCES_PER_BATCH
        # (batches of one size, at most the training batch: no more memory than a step)
        sizes = {len(inputs) for inputs, _ in other.val_batches}
        assert len(sizes) == 1
        assert sizes.pop() <= batch_size
        other.run_state.model.load_state_dict(model.state_dict())
        assert other.evaluate() == pytest.approx(loss, rel=1e-5)


def test_validation_batches_take_their_sequences_from_the_number_of_batches() -> None:
    source = TokenSource(torch.arange(4000).numpy() % 200, "validation")
    small = validation_batches(source, seq_len=8, batch_size=2, num_batches=3)
    large = validation_batches(source, seq_len=8, batch_size=32, num_batches=3)
    assert [len(inputs) for inputs, _ in small] == [2] * 24
    assert [len(inputs) for inputs, _ in large] == [16] * 3
    assert torch.equal(torch.cat([i for i, _ in small]), torch.cat([i for i, _ in large]))
