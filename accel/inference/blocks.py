"""The structure device maps work with: blocks that are never split, tied tensors, entries.

A device-map entry names a module (with everything under it) or one tensor. A tensor
belongs to the entry with the longest name that is a prefix of its own.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator, Mapping

import torch
from torch import nn

from accel.errors import InvalidArgumentError
from accel.inference.empty import tensor_bytes
from accel.validation import shown


def no_split_classes(model: nn.Module, given: Iterable[str] | None) -> frozenset[str]:
    """The class names never split across devices: `given`, else the model's own list.

    transformers models declare theirs in `_no_split_modules` (e.g. {"GPT2Block"}).
    """
    if given is None:
        given = getattr(model, "_no_split_modules", None) or ()
    if isinstance(given, str):
        raise InvalidArgumentError(
            f"no_split_module_classes must be a list of class names, got the string {given!r}; "
            f"write [{given!r}]"
        )
    names = tuple(given) if isinstance(given, (list, tuple, set, frozenset)) else None
    if names is None or not all(isinstance(name, str) for name in names):
        raise InvalidArgumentError(
            f"no_split_module_classes must be a list of class names (str), got {shown(given)}")
    return frozenset(names)


def all_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by every name it has (a tied tensor appears under each)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return named


def tensors_under(name: str, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The tensor names inside entry `name` ("" is the whole model)."""
    if name in tensors:
        return [name]
    if name == "":
        return list(tensors)
    prefix = name + "."
    return [t for t in tensors if t.startswith(prefix)]


def owner_entry(tensor_name: str, entries: Container[str]) -> str | None:
    """The entry a tensor belongs to: the longest entry naming it or one of its parents."""
    parts = tensor_name.split(".")
    for depth in range(len(parts), -1, -1):
        candidate = ".".join(parts[:depth])
        if candidate in entries:
            return candidate
    return None


def is_splittable(module: nn.Module, no_split: frozenset[str]) -> bool:
    return type(module).__name__ not in no_split and any(True for _ in module.children())


def split_entry(name: str, module: nn.Module) -> list[str]:
    """The entries that replace a split module: its own tensors first, then its children."""
    prefix = f"{name}." if name else ""
    direct = [prefix + n for n, _ in module.named_parameters(recurse=False)]
    direct += [prefix + n for n, _ in module.named_buffers(recurse=False)]
    return direct + [prefix + n for n, _ in module.named_children()]


def iter_blocks(module: nn.Module, name: str, no_split: frozenset[str]
                ) -> Iterator[tuple[str, nn.Module, bool]]:
    """The smallest units weights move in: (name, module, only its direct tensors).

    A no-split module or a module without children is one block; a module that is split
    gives one block of its direct tensors (if it has any) and then its children's blocks.
    """
    if not is_splittable(module, no_split):
        yield name, module, False
        return
    if any(True for _ in module.parameters(recurse=False)):
        yield name, module, True
    prefix = f"{name}." if name else ""
    for child_name, child in module.named_children():
        yield from iter_blocks(child, prefix + child_name, no_split)


def block_bytes(module: nn.Module, direct_only: bool, dtype: torch.dtype | None) -> int:
    """Bytes of a block's parameters (buffers stay on the execution device, never offloaded)."""
    unique = {id(p): p for p in module.parameters(recurse=not direct_only)}
    return sum(tensor_bytes(p, dtype) for p in unique.values())


def largest_block(model: nn.Module, no_split: frozenset[str], dtype: torch.dtype | None
                  ) -> tuple[str, int]:
    """The name and parameter bytes of the biggest block: what offloading must make room for."""
    best = ("", 0)
    for name, module, direct_only in iter_blocks(model, "", no_split):
        size = block_bytes(module, direct_only, dtype)
        if size > best[1]:
            best = (name, size)
    return best


def tied_names(tensors: Mapping[str, torch.Tensor]) -> dict[int, list[str]]:
    """For every tensor known under more than one name: its names, by the tensor's id."""
    names: dict[int, list[str]] = {}
    for name, tensor in tensors.items():
        names.setdefault(id(tensor), []).append(name)
    return {key: group for key, group in names.items() if len(group) > 1}
