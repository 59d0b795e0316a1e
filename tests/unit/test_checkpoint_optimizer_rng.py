"""Optimizer state and random state survive a checkpoint exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gossamer.store import (
    CheckpointState,
    CheckpointStore,
    flatten_optimizer_state,
    rng_state_capture,
    rng_state_restore,
    unflatten_optimizer_state,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 6, generator=generator)
    y = torch.randn(4, 3, generator=generator)
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().view(-1).view(torch.uint8)


def test_adamw_resumed_from_a_checkpoint_steps_bit_exactly_like_the_original(
    tmp_path: Path,
) -> None:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    for seed in range(3):
        _step(model, optimizer, seed)

    opt_tensors, opt_meta = flatten_optimizer_state(optimizer.state_dict())
    store = CheckpointStore(tmp_path)
    path = store.save(
        CheckpointState(
            step=3,
            tensors={"model": model.state_dict(), "optimizer": opt_tensors},
            meta={"optimizer": opt_meta},
        )
    )
    loaded = store.load(path)

    resumed = _model()
    resumed.load_state_dict(loaded.tensors["model"])
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=123.0)
    restored = unflatten_optimizer_state(loaded.tensors["optimizer"], loaded.meta["optimizer"])
    resumed_optimizer.load_state_dict(restored)

    # The restored state dict is the original, types included (betas a tuple, step a tensor).
    original = optimizer.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    assert isinstance(restored["param_groups"][0]["betas"], tuple)
    for index, per_param in original["state"].items():
        assert restored["state"][index].keys() == per_param.keys()
        for key, value in per_param.items():
            assert restored["state"][index][key].dtype == value.dtype
            assert torch.equal(_bits(restored["state"][index][key]), _bits(value))

    for seed in range(3, 6):
        _step(model, optimizer, seed)
        _step(resumed, resumed_optimizer, seed)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(_bits(a), _bits(b)), name


def test_optimizer_flattening_handles_awkward_trees() -> None:
    state: dict[str, Any] = {
        "state": {0: {"buf": torch.ones(2), "count": 3, "none": None}, 1: {}},
        "param_groups": [
            {"params": [0, 1], "lr": torch.tensor(0.5), "betas": (0.9, 0.99), "name": "g"}
        ],
        "tagged": {"__tensor__": "not a tensor", "a.b": torch.zeros(1)},
        "a": {"b": torch.full((1,), 2.0)},  # its path collides with the key "a.b" above
        "tuple_keys": {(1, "x"): [1.5, float("inf")]},
    }
    tensors, meta = flatten_optimizer_state(state)
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    assert len(tensors) == 4
    restored = unflatten_optimizer_state(tensors, json.loads(json.dumps(meta)))
    assert restored.keys() == state.keys()
    assert restored["state"][0]["count"] == 3
    assert restored["state"][0]["none"] is None
    assert restored["state"][1] == {}
    assert restored["param_groups"][0]["betas"] == (0.9, 0.99)
    assert torch.equal(restored["param_groups"][0]["lr"], torch.tensor(0.5))
    assert restored["tagged"]["__tensor__"] == "not a tensor"
    assert torch.equal(restored["tagged"]["a.b"], torch.zeros(1))
    assert torch.equal(restored["a"]["b"], torch.full((1,), 2.0))
    assert restored["tuple_keys"] == {(1, "x"): [1.5, float("inf")]}


def test_optimizer_unflattening_refuses_mismatched_inputs() -> None:
    tensors, meta = flatten_optimizer_state({"state": {0: {"m": torch.zeros(1)}}})
    with pytest.raises(ValueError, match="missing"):
        unflatten_optimizer_state({}, meta)
    with pytest.raises(ValueError, match="not referenced"):
        unflatten_optimizer_state({**tensors, "extra": torch.zeros(1)}, meta)
    with pytest.raises(ValueError, match="encoding"):
        unflatten_optimizer_state(tensors, {"state": {}})
    with pytest.raises(TypeError, match="object"):
        flatten_optimizer_state({"state": {0: {"bad": object()}}})


def _draw() -> tuple[list[float], list[float], list[float], list[float]]:
    return (
        torch.rand(5).tolist(),
        torch.randn(3).tolist(),
        [random.random(), random.gauss(0, 1)],
        [*np.random.rand(3).tolist(), float(np.random.standard_normal())],
    )


def test_rng_restore_reproduces_the_same_random_numbers(tmp_path: Path) -> None:
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    _draw()
    random.gauss(0, 1)  # leaves a cached gaussian in random's state
    np.random.standard_normal()  # and in numpy's
    tensors, meta = rng_state_capture()
    store = CheckpointStore(tmp_path)
    path = store.save(CheckpointState(step=1, tensors={"rng": tensors}, meta={"rng": meta}))
    expected = _draw()

    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    loaded = store.load(path)
    rng_state_restore(loaded.tensors["rng"], loaded.meta["rng"])
    assert _draw() == expected


def test_rng_restore_refuses_malformed_state() -> None:
    tensors, meta = rng_state_capture()
    with pytest.raises(ValueError, match="random state"):
        rng_state_restore({}, meta)
    with pytest.raises(ValueError, match="random state"):
        rng_state_restore(tensors, {"python": meta["python"]})


_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_trees = st.recursive(
    _scalars | st.builds(torch.tensor, st.lists(st.floats(allow_nan=False), max_size=3)),
    lambda children: (
        st.lists(children, max_size=3)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=5) | st.integers(), children, max_size=3)
    ),
    max_leaves=12,
)


@given(st.dictionaries(st.text(max_size=5), _trees, max_size=4))
@settings(max_examples=60, deadline=None)
def test_any_optimizer_like_tree_survives_flattening_and_json(state: dict[str, Any]) -> None:
    tensors, meta = flatten_optimizer_state(state)
    restored = unflatten_optimizer_state(tensors, json.loads(json.dumps(meta)))
    _assert_tree_equal(restored, state)


def _assert_tree_equal(got: Any, want: Any) -> None:
    assert type(got) is type(want)
    if isinstance(want, torch.Tensor):
        assert got is want
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            _assert_tree_equal(got[key], want[key])
    elif isinstance(want, list | tuple):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            _assert_tree_equal(a, b)
    else:
        assert got == want
