"""The torch backend's in-place scaling pass (no process group needed)."""

from __future__ import annotations

import torch

from gossamer.comm.torch_backend import _scale_


def test_a_contiguous_float32_tensor_is_scaled_in_place_like_mul_() -> None:
    tensor = torch.randn(1000)
    expected = tensor.clone().mul_(0.3)
    storage = tensor.data_ptr()
    _scale_(tensor, 0.3)
    assert tensor.data_ptr() == storage
    assert torch.equal(tensor, expected)


def test_other_tensors_are_scaled_too_and_a_scale_of_one_is_a_no_op() -> None:
    strided = torch.randn(10, 10).t()
    expected = strided.clone().mul_(0.25)
    _scale_(strided, 0.25)
    assert torch.equal(strided, expected)
    doubles = torch.randn(10, dtype=torch.float64)
    expected = doubles * 2.0
    _scale_(doubles, 2.0)
    assert torch.equal(doubles, expected)
    same = torch.randn(10)
    before = same.clone()
    _scale_(same, 1.0)
    assert torch.equal(same, before)


def test_a_scale_of_zero_makes_exact_zeros_of_nan_and_inf_too() -> None:
    # A weight-0 member's values are in no average; scaled by 0 a NaN or inf stayed NaN, and
    # the all-reduce made every member's average NaN there.
    for tensor in (torch.ones(6), torch.ones(6, 2).t(), torch.ones(6, dtype=torch.float64)):
        values = tensor
        if values.dim() == 1:
            values[0], values[1] = float("nan"), float("inf")
        else:
            values[0, 0], values[1, 1] = float("nan"), float("-inf")
        _scale_(values, 0.0)
        assert torch.equal(values, torch.zeros_like(values))
