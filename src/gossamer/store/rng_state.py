"""The process's random number generators, captured for a checkpoint and restored on resume.

Covers torch's CPU generator and, where CUDA is available, each CUDA device's (as tensors), and
Python's ``random`` and numpy's global generator (as JSON). Generators a caller owns (a
``torch.Generator`` or ``numpy.random.Generator`` of its own) are the caller's to save.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

__all__ = ["rng_state_capture", "rng_state_restore"]

logger = logging.getLogger(__name__)

_TORCH_CPU = "torch_cpu"
_CUDA_PREFIX = "torch_cuda."


def rng_state_capture() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Capture every global random generator of this process.

    Returns:
        Tensors (``torch_cpu`` and ``torch_cuda.<device index>``) and a JSON tree (``python``,
        ``numpy``, ``num_cuda_devices``) for :func:`rng_state_restore`.
    """
    tensors = {_TORCH_CPU: torch.get_rng_state()}
    num_cuda_devices = 0
    if torch.cuda.is_available():
        cuda_states = torch.cuda.get_rng_state_all()
        num_cuda_devices = len(cuda_states)
        tensors.update({f"{_CUDA_PREFIX}{i}": state for i, state in enumerate(cuda_states)})
    version, internal, gauss_next = random.getstate()
    bit_generator, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    meta: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": bit_generator,
            "key": [int(word) for word in key],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "num_cuda_devices": num_cuda_devices,
    }
    return tensors, meta


def rng_state_restore(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Put back the generators that :func:`rng_state_capture` captured.

    CUDA states are restored for the devices present; if this machine has fewer CUDA devices than
    the one that captured them (a GPU run resumed on CPU, say), the rest are skipped with a warning.

    Raises:
        ValueError: the tensors or meta are not what :func:`rng_state_capture` makes.
    """
    try:
        torch_cpu = tensors[_TORCH_CPU]
        python = meta["python"]
        numpy_state = meta["numpy"]
        python_state = (python["version"], tuple(python["state"]), python["gauss_next"])
        numpy_tuple = (
            numpy_state["bit_generator"],
            np.asarray(numpy_state["key"], dtype=np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"random state is incomplete or malformed: missing {exc}") from exc
    cuda_states = {
        int(name.removeprefix(_CUDA_PREFIX)): state
        for name, state in tensors.items()
        if name.startswith(_CUDA_PREFIX)
    }
    num_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skipped = sorted(index for index in cuda_states if index >= num_devices)
    if skipped:
        logger.warning(
            "not restoring the CUDA random state of device(s) %s: this machine has %d CUDA "
            "device(s)",
            skipped,
            num_devices,
        )
    try:
        random.setstate(python_state)
        np.random.set_state(numpy_tuple)
        torch.set_rng_state(torch_cpu)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"random state could not be restored: {exc}") from exc
    for index, state in cuda_states.items():
        if index < num_devices:
            torch.cuda.set_rng_state(state, device=index)
