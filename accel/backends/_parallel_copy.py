"""Loading whole tensors into a plain module's own, on several threads.

torch's `load_state_dict` copies one tensor after another on the calling thread. The
tensors of a checkpoint are independent, so accel copies them in pieces on as many
threads as the hashing of a verified load uses (`copy_` releases the GIL). It does so
only where that is all torch would do: every tensor of the module a plain CPU tensor,
the state's names exactly the module's, equal shapes, and no module with hooks on its
state dict or its own `_load_from_state_dict`. Anything else goes through torch.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

#: bytes of one copy task: large enough to amortise the task, small enough to balance.
PIECE = 16 << 20


def copy_into(model: nn.Module, state: Mapping[str, Any]) -> bool:
    """Copy `state`'s tensors into `model`'s as `model.load_state_dict(state)` would, on
    several threads; False (nothing copied) where this path does not apply."""
    targets = model.state_dict(keep_vars=True)
    if not _applies(model, targets, state):
        return False
    tasks, seen = [], set()
    for name, target in targets.items():
        if target.data_ptr() in seen:  # tied: one tensor under two names
            continue
        seen.add(target.data_ptr())
        tasks += _pieces(target.detach(), state[name])
    workers = min(_cores(), len(tasks))
    with torch.no_grad():
        if workers <= 1:
            for task in tasks:
                task()
        else:
            with concurrent.futures.ThreadPoolExecutor(
                    workers, thread_name_prefix="accel-load") as pool:
                list(pool.map(lambda task: task(), tasks))
    return True


def _applies(model: nn.Module, targets: Mapping[str, Any], state: Mapping[str, Any]) -> bool:
    if set(targets) != set(state):
        return False
    for name, target in targets.items():
        source = state[name]
        if (isinstance(target, DTensor) or isinstance(source, DTensor)
                or not isinstance(source, torch.Tensor) or target.device.type != "cpu"
                or source.device.type != "cpu" or target.shape != source.shape):
            return False
    return not any(_has_own_loading(module) for module in model.modules())


def _has_own_loading(module: nn.Module) -> bool:
    return bool(module._load_state_dict_pre_hooks or module._load_state_dict_post_hooks
                or module._state_dict_hooks or module._state_dict_pre_hooks
                or type(module)._load_from_state_dict is not nn.Module._load_from_state_dict)


def _pieces(target: torch.Tensor, source: torch.Tensor) -> list[Callable[[], Any]]:
    if not (target.is_contiguous() and source.is_contiguous()) or target.numel() == 0:
        return [lambda: target.copy_(source)]
    flat_target, flat_source = target.view(-1), source.view(-1)
    step = max(1, PIECE // max(1, target.element_size()))
    return [lambda start=start: flat_target[start:start + step].copy_(
        flat_source[start:start + step]) for start in range(0, target.numel(), step)]


def _cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cores or 1))
