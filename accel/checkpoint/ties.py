"""Tied weights: one tensor under several state-dict names (GPT-2's lm_head and wte).

safetensors refuses to store two names that share memory, and storing the tensor twice
would waste space and untie it on load. Every writer (save_model, save_state's full and
sharded layouts) keeps one name per shared tensor, the one transformers keeps too;
save_state records the dropped aliases, and its loader fills them back from the kept
name before handing the state to torch (the model's own tie makes one copy enough).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import nn
from torch.distributed.tensor import DTensor

Value = TypeVar("Value")


def alias_groups(state: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Groups of names that share one tensor (tied weights), each with more than one name."""
    groups: dict[Any, list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(identity(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def tied_aliases(module: nn.Module, state: Mapping[str, torch.Tensor] | None = None
                 ) -> dict[str, str]:
    """{alias: kept name} for every duplicate name of a shared tensor of `module`.

    `state` is the module's live state (``state_dict(keep_vars=True)``, the default).
    The kept name is the first one not in a `_tied_weights_keys` (transformers drops
    those and ties them again on load), else the first.

    >>> tied_aliases(gpt2)
    {'lm_head.weight': 'transformer.wte.weight'}
    """
    live = module.state_dict(keep_vars=True) if state is None else state
    tied = _tied_names(module)
    aliases = {}
    for names in alias_groups(live):
        kept = next((name for name in names if name not in tied), names[0])
        aliases.update({name: kept for name in names if name != kept})
    return aliases


def kept_names(module: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of `state` (the module's live state) minus the aliases of tied tensors."""
    aliases = tied_aliases(module, state)
    return [name for name in state if name not in aliases]


def drop_aliases(state: dict[str, Value], aliases: Mapping[str, str]
                 ) -> tuple[dict[str, Value], dict[str, str]]:
    """`state` without the aliases whose kept name it holds; and the aliases dropped."""
    dropped = {alias: kept for alias, kept in aliases.items() if alias in state and kept in state}
    return {name: value for name, value in state.items() if name not in dropped}, dropped


def restore_aliases(state: dict[str, Value], aliases: Mapping[str, str]) -> dict[str, Value]:
    """`state` with each dropped alias back, as the kept name's very tensor."""
    restored = dict(state)
    for alias, kept in aliases.items():
        if kept in restored:
            restored.setdefault(alias, restored[kept])
    return restored


def identity(tensor: torch.Tensor) -> Any:
    """What two names of one shared tensor have in common."""
    # Tied parameters are one object; two views of the same memory are the same tensor too.
    if isinstance(tensor, DTensor) or tensor.is_meta or tensor.numel() == 0:
        return id(tensor)
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
            tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def _tied_names(module: nn.Module) -> set[str]:
    names = set()
    for prefix, sub in module.named_modules():
        keys = getattr(sub, "_tied_weights_keys", None) or ()
        # transformers 5: {tied: source}; 4.x: [tied, ...]
        names.update(f"{prefix}.{key}" if prefix else key for key in keys)
    return names
