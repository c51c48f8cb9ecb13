"""Nested state dicts as (a JSON skeleton, a flat dict of tensors): checkpoints without pickle.

A state dict is a tree of dicts, lists and tuples whose leaves are tensors and plain
values. `flatten` moves every tensor into a flat ``{key: tensor}`` dict (for a
safetensors file or torch.distributed.checkpoint) and leaves a JSON-able skeleton in
which each tensor is ``{"__tensor__": key}``; `unflatten` puts them back together.

Keys are the path of the tensor joined by "/" (``state/fc.weight/exp_avg``); a flat
model state dict therefore keeps its parameter names as keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from accel.errors import InvalidArgumentError

TENSOR = "__tensor__"
TUPLE = "__tuple__"
#: a dict whose keys are not all strings (torch's optimizer state is keyed by position).
ITEMS = "__items__"
_MARKERS = (TENSOR, TUPLE, ITEMS)
_PLAIN = (str, int, float, bool, type(None))


def flatten(tree: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split `tree` into a JSON-able skeleton and ``{key: tensor}``.

    Raises:
        InvalidArgumentError: a leaf is neither a tensor nor a JSON value (str, int,
            float, bool, None); the message names its path.

    >>> skeleton, tensors = flatten({"w": torch.ones(2), "lr": 0.1})
    >>> skeleton
    {'w': {'__tensor__': 'w'}, 'lr': 0.1}
    """
    tensors: dict[str, torch.Tensor] = {}
    return _flatten(tree, prefix, tensors), tensors


def _flatten(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return {TENSOR: _add_tensor(path, value, tensors)}
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, Mapping):
        return _flatten_mapping(value, path, tensors)
    if isinstance(value, tuple):
        return {TUPLE: [_flatten(item, _join(path, i), tensors) for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_flatten(item, _join(path, i), tensors) for i, item in enumerate(value)]
    raise InvalidArgumentError(
        f"cannot save the {type(value).__name__} at {path or 'the top level'!r}: accel "
        "checkpoints hold tensors and JSON values (str, int, float, bool, None) in dicts, "
        "lists and tuples, never pickled objects; convert it in your state_dict() (e.g. "
        "to a tensor or a string)"
    )


def _flatten_mapping(value: Mapping, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    keys = list(value)
    if all(isinstance(key, str) for key in keys) and not any(k in _MARKERS for k in keys):
        return {key: _flatten(item, _join(path, key), tensors) for key, item in value.items()}
    for key in keys:
        if not isinstance(key, _PLAIN):
            raise InvalidArgumentError(
                f"cannot save the dict key {key!r} ({type(key).__name__}) at "
                f"{path or 'the top level'!r}: keys must be str, int, float, bool or None"
            )
    return {ITEMS: [[key, _flatten(item, _join(path, key), tensors)]
                    for key, item in value.items()]}


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def _add_tensor(path: str, tensor: torch.Tensor, tensors: dict[str, torch.Tensor]) -> str:
    key, suffix = path or "tensor", 1
    while key in tensors:  # keys that contain "/" themselves can meet another path
        key, suffix = f"{path}#{suffix}", suffix + 1
    tensors[key] = tensor
    return key


def unflatten(skeleton: Any, tensors: Mapping[str, torch.Tensor], *, source: str = "") -> Any:
    """Rebuild the tree `flatten` split; `source` names the file in error messages.

    Raises:
        InvalidArgumentError: the skeleton names a tensor that `tensors` lacks.
    """
    if isinstance(skeleton, list):
        return [unflatten(item, tensors, source=source) for item in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if TENSOR in skeleton:
        key = skeleton[TENSOR]
        if key not in tensors:
            raise InvalidArgumentError(
                f"the checkpoint structure names the tensor {key!r}, which "
                f"{source or 'the tensor file'} does not hold; the checkpoint is incomplete "
                "or mixed up")
        return tensors[key]
    if TUPLE in skeleton:
        return tuple(unflatten(item, tensors, source=source) for item in skeleton[TUPLE])
    if ITEMS in skeleton:
        return {key: unflatten(item, tensors, source=source) for key, item in skeleton[ITEMS]}
    return {key: unflatten(item, tensors, source=source) for key, item in skeleton.items()}


def tensor_keys(skeleton: Any) -> list[str]:
    """Every tensor key the skeleton refers to, in order."""
    if isinstance(skeleton, list):
        return [key for item in skeleton for key in tensor_keys(item)]
    if not isinstance(skeleton, dict):
        return []
    if TENSOR in skeleton:
        return [skeleton[TENSOR]]
    if TUPLE in skeleton:
        return tensor_keys(skeleton[TUPLE])
    if ITEMS in skeleton:
        return [key for _, item in skeleton[ITEMS] for key in tensor_keys(item)]
    return [key for item in skeleton.values() for key in tensor_keys(item)]


def keep_tensors(skeleton: Any, keys: set[str]) -> Any:
    """The skeleton without the entries whose tensors are all outside `keys`.

    A pipeline stage loads its own tensors from a checkpoint of every stage's: the other
    stages' entries go; values without tensors (param groups, settings) stay.
    """
    if isinstance(skeleton, list):
        return [keep_tensors(item, keys) for item in skeleton]
    if not isinstance(skeleton, dict) or any(marker in skeleton for marker in _MARKERS):
        return skeleton
    kept = {}
    for key, value in skeleton.items():
        found = tensor_keys(value)
        if not found or any(name in keys for name in found):
            kept[key] = keep_tensors(value, keys)
    return kept
