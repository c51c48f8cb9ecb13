"""Does a checkpoint fit what it is loaded into? Every difference, before anything changes.

`load_state` compares what was saved with the objects it is given: the model's tensor
names, shapes and dtypes; the optimizer's class, its param groups (how many, their
parameters and settings) and each parameter's state (present for every trainable
parameter; keys and shapes as this optimizer's own, where it already holds state); the
scheduler's class. `load_model` compares names and shapes. Each lists
every difference in one `CheckpointMismatchError`. What an older checkpoint did not
record (the optimizer and scheduler classes) is not checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from accel.errors import CheckpointMismatchError

#: param group entries that are not settings.
_NOT_SETTINGS = frozenset({"params", "param_names"})


def shape_of(tensor: torch.Tensor) -> tuple[int, ...]:
    """The whole tensor's shape: a DTensor's global one, a ZeRO-3 partition's `ds_shape`."""
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def inner_optimizer(optimizer: Any) -> Any:
    """The optimizer that holds the state, inside accel's and engines' wrappers."""
    for _ in range(4):  # AccelOptimizer -> an engine's -> the user's
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or not hasattr(inner, "param_groups"):
            break
        optimizer = inner
    return optimizer


def optimizer_class(optimizer: Any) -> str | None:
    """The class name save_state records for an optimizer: the innermost one's."""
    return None if optimizer is None else type(inner_optimizer(optimizer)).__name__


def scheduler_class(scheduler: Any) -> str | None:
    """The class name save_state records for a scheduler: the one `wrap_scheduler` wraps."""
    return None if scheduler is None else type(getattr(scheduler, "scheduler", scheduler)).__name__


def model_differences(saved: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                      *, dtypes: bool = True, partial: bool = False) -> list[str]:
    """Names the checkpoint lacks (unless `partial`) or has in excess, and shapes (and
    `dtypes`) that differ."""
    lacks = [] if partial else sorted(set(target) - set(saved))
    found = _name_differences("model", lacks, sorted(set(saved) - set(target)))
    for name in sorted(set(saved) & set(target)):
        old, new = saved[name], target[name]
        if shape_of(old) != shape_of(new):
            found.append(f"model {name}: shape {list(shape_of(old))} in the checkpoint, "
                         f"{list(shape_of(new))} in this model")
        elif dtypes and old.dtype != new.dtype:
            found.append(f"model {name}: dtype {old.dtype} in the checkpoint, {new.dtype} here")
    return found


def _name_differences(what: str, lacks: list[str], extra: list[str]) -> list[str]:
    found = []
    if lacks:
        found.append(f"{what}: the checkpoint lacks {', '.join(lacks)}, which this one has")
    if extra:
        found.append(f"{what}: the checkpoint has {', '.join(extra)}, which this one lacks")
    return found


def optimizer_differences(saved: Mapping[str, Any], saved_class: str | None, optimizer: Any,
                          module: nn.Module, *, structure: bool = True,
                          partial: bool = False) -> list[str]:
    """How the saved optimizer state differs from `optimizer` over `module`'s parameters.

    Args:
        saved: the saved state ({"state": {name: {key: tensor}}, "param_groups": [...]}).
        saved_class: the saved optimizer's class name (None: not recorded).
        structure: compare groups and state too (not for engines that regroup the
            parameters into flat partitions, like DeepSpeed).
        partial: the checkpoint may lack the state of some parameters (they keep theirs).
    """
    inner = inner_optimizer(optimizer)
    found = []
    if saved_class is not None and saved_class != type(inner).__name__:
        found.append(f"optimizer: {saved_class} in the checkpoint, {type(inner).__name__} here")
    if not structure:
        return found
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    groups, saved_groups = inner.param_groups, list(saved.get("param_groups", []))
    if len(saved_groups) != len(groups):
        found.append(f"optimizer: {len(saved_groups)} param groups in the checkpoint, "
                     f"{len(groups)} here")
    for index, (old, new) in enumerate(zip(saved_groups, groups, strict=False)):  # counted above
        found += _group_differences(index, old, new, names, inner.defaults)
    return found + _state_differences(saved.get("state", {}), inner, names, module, partial)


def _group_differences(index: int, old: Mapping[str, Any], new: Mapping[str, Any],
                       names: Mapping[int, list[str]], defaults: Mapping[str, Any]) -> list[str]:
    where, found = f"optimizer param group {index}", []
    saved_params, params = list(old.get("params", [])), new["params"]
    if len(saved_params) != len(params):
        found.append(f"{where}: {len(saved_params)} parameters in the checkpoint, "
                     f"{len(params)} here")
    else:
        here = {alias for param in params for alias in names.get(id(param), [])}
        absent = [name for name in saved_params if isinstance(name, str) and name not in here]
        if absent and here:
            found.append(f"{where}: the checkpoint's {', '.join(absent)} are not in it here")
    only_saved = sorted(set(old) - set(new) - _NOT_SETTINGS)
    # A setting this torch added since (in the optimizer's defaults) is filled in on load.
    only_here = sorted(set(new) - set(old) - _NOT_SETTINGS - set(defaults))
    if only_saved:
        found.append(f"{where}: settings {', '.join(only_saved)} only in the checkpoint")
    if only_here:
        found.append(f"{where}: settings {', '.join(only_here)} only here")
    return found


def _state_differences(state: Mapping[str, Any], inner: Any, names: Mapping[int, list[str]],
                       module: nn.Module, partial: bool) -> list[str]:
    params = dict(module.named_parameters(remove_duplicate=False))
    # The state this optimizer already holds (after steps), by every name of its parameter.
    current = {alias: entry for param, entry in inner.state.items() for alias in
               names.get(id(param), [])}
    found = []
    for name, entry in sorted(state.items()):
        if name not in params:
            found.append(f"optimizer state for {name}, which this model lacks")
        elif current.get(name):
            found += _entry_differences(name, entry, current[name])
    # torch refuses a trainable parameter without state among others with one
    if state and not partial:
        lacking = [names[id(param)][0] for group in inner.param_groups
                   for param in group["params"] if param.requires_grad and id(param) in names
                   and not any(alias in state for alias in names[id(param)])]
        if lacking:
            found.append(f"optimizer: the checkpoint holds no state for {', '.join(lacking)}")
    return found


def _entry_differences(name: str, saved: Mapping[str, Any], here: Mapping[str, Any]
                       ) -> list[str]:
    found = []
    if set(saved) != set(here):
        found.append(f"optimizer state {name}: {sorted(saved)} in the checkpoint, "
                     f"{sorted(here)} here")
    for key in sorted(set(saved) & set(here)):
        old, new = saved[key], here[key]
        if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor) and (
                shape_of(old) != shape_of(new)):
            found.append(f"optimizer state {name}/{key}: shape {list(shape_of(old))} in the "
                         f"checkpoint, {list(shape_of(new))} here")
    return found


def scheduler_differences(saved_class: str | None, scheduler: Any) -> list[str]:
    """The saved scheduler's class against `scheduler`'s (None: not recorded, not checked)."""
    here = scheduler_class(scheduler)
    if saved_class is None or here is None or saved_class == here:
        return []
    return [f"scheduler: {saved_class} in the checkpoint, {here} here"]


def raise_if_different(differences: list[str], source: Any, fix: str) -> None:
    """Raise one error listing every difference between `source` and the objects.

    Raises:
        CheckpointMismatchError: `differences` is not empty; the message ends with `fix`.
    """
    if differences:
        lines = "\n".join(f"  - {line}" for line in differences)
        raise CheckpointMismatchError(
            f"{source} does not fit what it is loaded into ({len(differences)} "
            f"difference{'s' if len(differences) > 1 else ''}); nothing was loaded:\n{lines}\n"
            f"{fix}")
