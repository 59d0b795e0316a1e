"""Optimizer state dicts split into flat named tensors plus JSON, and joined back exactly.

A torch optimizer's ``state_dict()`` is a tree of dicts (keyed by ints and strings), lists, tuples,
numbers and tensors. :func:`flatten_optimizer_state` pulls every tensor out under a name made from
its path (``state.0.exp_avg``) and leaves a JSON tree with a placeholder where each tensor was;
:func:`unflatten_optimizer_state` puts them back. The tree is encoded generically, so any optimizer
round-trips, not only AdamW: JSON objects stand for dicts with string keys, and a few tagged objects
stand for what JSON lacks:

- ``{"__tensor__": name}``: the tensor of that name;
- ``{"__tuple__": [...]}``: a tuple (AdamW's ``betas``);
- ``{"__dict__": [[key, value], ...]}``: a dict with a non-string key (``state`` is keyed by
  parameter index) or with a key that looks like one of these tags.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["flatten_optimizer_state", "unflatten_optimizer_state"]

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_DICT = "__dict__"
_TAGS = frozenset({_TENSOR, _TUPLE, _DICT})
_ENCODING_KEY = "encoding"
_ENCODING = "gossamer-optimizer-state/1"


def flatten_optimizer_state(
    state_dict: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer ``state_dict()`` into named tensors and a JSON-serializable tree.

    Args:
        state_dict: what ``torch.optim.Optimizer.state_dict()`` returns (or any tree of dicts,
            lists, tuples, JSON scalars and tensors).

    Returns:
        The tensors by name (the caller's tensors, not copies) and the JSON tree that
        :func:`unflatten_optimizer_state` needs to rebuild ``state_dict`` exactly.

    Raises:
        TypeError: a value in the tree is neither a tensor nor JSON-representable.
    """
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state_dict, "", tensors)
    return tensors, {_ENCODING_KEY: _ENCODING, "tree": tree}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: object) -> dict[str, Any]:
    """Rebuild the ``state_dict`` that :func:`flatten_optimizer_state` split; the exact inverse.

    Raises:
        ValueError: ``meta`` is not such a tree, or it and ``tensors`` do not belong together.
    """
    if not isinstance(meta, dict):  # (it may come from the network)
        raise ValueError(f"optimizer meta is a {type(meta).__name__}, not a JSON object")
    if meta.get(_ENCODING_KEY) != _ENCODING or "tree" not in meta:
        raise ValueError(
            f"optimizer meta is not of encoding {_ENCODING!r} "
            f"(got {meta.get(_ENCODING_KEY)!r}); was it made by flatten_optimizer_state?"
        )
    used: set[str] = set()
    state = _decode(meta["tree"], tensors, used)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"optimizer tensors not referenced by the optimizer meta: {unused[:5]}")
    if not isinstance(state, dict):
        raise ValueError("optimizer meta does not encode a dict")
    return state


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        name = path or "tensor"
        suffix = 0
        while name in tensors:  # a key with a '.' in it can collide with a path
            suffix += 1
            name = f"{path}#{suffix}"
        tensors[name] = value
        return {_TENSOR: name}
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value) and not _TAGS & value.keys():
            return {key: _encode(item, _join(path, key), tensors) for key, item in value.items()}
        return {
            _DICT: [
                [
                    _encode(key, _join(path, "key"), tensors),
                    _encode(item, _join(path, key), tensors),
                ]
                for key, item in value.items()
            ]
        }
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(item, _join(path, i), tensors) for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, _join(path, i), tensors) for i, item in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(
        f"optimizer state at {path or '<root>'!r} holds a {type(value).__name__}, which is "
        "neither a tensor nor JSON-representable"
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor], used: set[str]) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors, used) for item in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and _TENSOR in value:
        name = value[_TENSOR]
        if name not in tensors:
            raise ValueError(f"optimizer tensor {name!r} is listed in the meta but missing")
        used.add(name)
        return tensors[name]
    if len(value) == 1 and _TUPLE in value:
        return tuple(_decode(item, tensors, used) for item in value[_TUPLE])
    if len(value) == 1 and _DICT in value:
        return {
            _decode(key, tensors, used): _decode(item, tensors, used) for key, item in value[_DICT]
        }
    return {key: _decode(item, tensors, used) for key, item in value.items()}


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)
