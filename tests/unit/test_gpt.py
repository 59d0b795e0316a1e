"""The built-in GPT: shapes, causality, weight tying, determinism, generate."""

from __future__ import annotations

import math

import pytest
import torch

from gossamer.core.config import ModelConfig
from gossamer.models import GPT

TINY = ModelConfig(num_layers=2, num_heads=2, width=32, context=16, vocab_size=64)


def _model(config: ModelConfig = TINY, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def _tokens(batch: int, seq_len: int, seed: int = 1, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def test_forward_gives_logits_per_position() -> None:
    logits = _model()(_tokens(3, 10))
    assert logits.shape == (3, 10, TINY.vocab_size)
    assert logits.dtype == torch.float32


def test_full_context_is_accepted_and_longer_is_a_clear_error() -> None:
    model = _model()
    assert model(_tokens(1, TINY.context)).shape[1] == TINY.context
    with pytest.raises(ValueError, match="longer than the model's context of 16"):
        model(_tokens(1, TINY.context + 1))


def test_bad_token_tensors_are_rejected() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"\[batch, seq_len\]"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(1, 4))


def test_changing_a_future_token_leaves_earlier_logits_unchanged() -> None:
    model = _model()
    tokens = _tokens(2, 12)
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % TINY.vocab_size
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :7], after[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_tied_weights_share_storage_and_untied_do_not() -> None:
    tied = _model()
    assert tied.output_projection.weight is tied.token_embedding.weight
    untied = _model(ModelConfig(num_layers=1, num_heads=2, width=32, context=8, tie_weights=False))
    assert untied.output_projection.weight.data_ptr() != untied.token_embedding.weight.data_ptr()
    embedding_size = 256 * 32
    assert (
        untied.num_parameters() - embedding_size
        == _model(ModelConfig(num_layers=1, num_heads=2, width=32, context=8)).num_parameters()
    )


def test_num_parameters_counts_a_tied_weight_once() -> None:
    model = _model()
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_parameters() == sum(unique.values())
    assert model.num_parameters() < sum(p.numel() for p in model.state_dict().values())


def test_construction_is_deterministic_under_manual_seed() -> None:
    first, second, other = _model(seed=3), _model(seed=3), _model(seed=4)
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert not torch.equal(first.token_embedding.weight, other.token_embedding.weight)


def test_residual_projections_get_the_scaled_down_init() -> None:
    config = ModelConfig(num_layers=8, num_heads=4, width=256, context=8)
    model = _model(config)
    expected = 0.02 / math.sqrt(2 * config.num_layers)
    for block in model.blocks:
        for projection in block.residual_projections():  # type: ignore[operator]
            assert projection.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_loss_at_init_is_near_uniform() -> None:
    model = _model()
    logits = model(_tokens(4, 16, seed=1))
    targets = _tokens(4, 16, seed=2)
    loss = torch.nn.functional.cross_entropy(logits.view(-1, TINY.vocab_size), targets.view(-1))
    assert loss.item() == pytest.approx(math.log(TINY.vocab_size), rel=0.05)


def test_generate_appends_tokens_and_is_reproducible_with_a_generator() -> None:
    model = _model()
    prompt = _tokens(2, 5)
    first = model.generate(prompt, 30, generator=torch.Generator().manual_seed(7), top_k=10)
    second = model.generate(prompt, 30, generator=torch.Generator().manual_seed(7), top_k=10)
    assert first.shape == (2, 35)
    assert torch.equal(first[:, :5], prompt)
    assert torch.equal(first, second)
    assert int(first.max()) < TINY.vocab_size


def test_generate_crops_to_the_context_and_restores_training_mode() -> None:
    model = _model().train()
    # 40 new tokens after a 12-token prompt runs far past the 16-token context.
    out = model.generate(_tokens(1, 12), 40, temperature=0.0)
    assert out.shape == (1, 52)
    assert model.training


def test_greedy_generation_takes_the_argmax() -> None:
    model = _model()
    prompt = _tokens(1, 6)
    out = model.generate(prompt, 1, temperature=0.0)
    assert int(out[0, -1]) == int(model(prompt)[0, -1].argmax())


def test_top_k_one_matches_greedy() -> None:
    model = _model()
    prompt = _tokens(2, 4)
    sampled = model.generate(prompt, 8, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, model.generate(prompt, 8, temperature=0.0))


def test_a_tiny_temperature_samples_as_greedy_picking_does() -> None:
    # Divided by 1e-39 the logits overflowed and the softmax gave NaN: a RuntimeError.
    model = _model()
    prompt = _tokens(2, 4)
    sampled = model.generate(
        prompt, 8, temperature=1e-39, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(sampled, model.generate(prompt, 8, temperature=0.0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_new_tokens": 1, "temperature": -0.5}, "temperature"),
        ({"max_new_tokens": 1, "top_k": 0}, "top_k"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _model().generate(_tokens(1, 3), **kwargs)  # type: ignore[arg-type]


def test_a_training_step_reduces_the_loss() -> None:
    model = _model().train()
    tokens = _tokens(4, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, TINY.vocab_size), tokens[:, 1:].reshape(-1)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
