"""FSDP2's gradient sync follows each forward: `no_sync`'s rule for sharded models.

FSDP2 reads its switch (`set_requires_gradient_sync`) during backward, so a graph built
inside `no_sync` and one built outside would share whatever the switch says when their
backward runs. Each forward's outputs carry the value it ran with and set the switch
as their graph's backward starts.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel.distributed import _find_tensors
from torch.utils.weak import WeakIdKeyDictionary

#: each FSDP2 root's _SyncFollowsForward, keyed weakly by the model (no attribute on it).
_FOLLOWERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def follow_forwards(model: FSDPModule) -> _SyncFollowsForward:
    if model not in _FOLLOWERS:
        follower = _FOLLOWERS[model] = _SyncFollowsForward()
        model.register_forward_hook(follower.after_forward)
    return _FOLLOWERS[model]


class _SyncFollowsForward:
    """Sets FSDP2's switch at the start of each backward from the forwards of its graphs."""

    def __init__(self) -> None:
        self.sync = True  # set_grad_sync's value, for the forwards that follow
        self.task: int | None = None  # the autograd graph task running now, if any
        self.task_sync = True

    def after_forward(self, model: nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        hook = functools.partial(self.before_backward, model, self.sync)
        for tensor in _find_tensors(output):
            if tensor.requires_grad:
                tensor.register_hook(hook)

    def before_backward(self, model: FSDPModule, sync: bool, grad: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task != self.task:
            self.task, self.task_sync = task, sync
            torch.autograd.Variable._execution_engine.queue_callback(
                functools.partial(self.after_backward, model))
        # One backward of graphs built both ways (a sum of their losses) is reduced: what
        # the local ones accumulated before is reduced with it.
        self.task_sync = self.task_sync or sync
        model.set_requires_gradient_sync(self.task_sync)

    def after_backward(self, model: FSDPModule) -> None:
        # Graphs of forwards from before the first set_grad_sync carry no hook: on for them.
        self.task = None
        model.set_requires_gradient_sync(True)
