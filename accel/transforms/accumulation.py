"""Gradient accumulation: k micro-batches per optimizer update, synchronised once.

On a micro-step that does not end the cycle, ranks do not exchange gradients (DDP's
`no_sync`; FSDP2's `set_requires_gradient_sync(False)`), the optimizer does not step and
does not zero. Skipping that all-reduce is what keeps multi-node accumulation fast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from accel.backends import backend_for
from accel.context import Context
from accel.errors import IncompatibleOptionsError, TransformOrderError
from accel.launch_settings import pick
from accel.transforms.optim import AccelOptimizer
from accel.validation import check_bool, check_context, check_module


class GradientAccumulation:
    """The micro-step counter of one (model, optimizer, loader) triple.

    Whether a micro-batch ends its cycle (`is_boundary`, the optimizer's
    `sync_gradients`) is decided at its first forward (with gradients enabled) and holds
    until the next micro-batch's first forward: it reads the same before and after
    `optimizer.step()`, as Accelerate's `sync_gradients` does in its `accumulate` block.
    """

    def __init__(self, steps: int, model: nn.Module, loader: Any, sync_each_batch: bool,
                 backend: Any):
        self.steps = steps
        self.micro_step = 0  # micro-steps already taken in the current cycle
        self.model = model
        self.loader = loader
        self.sync_each_batch = sync_each_batch
        self._backend = backend
        #: the current micro-batch's answer, fixed at its first forward; None: no forward yet.
        self._latched: bool | None = None
        #: step() counted the latched micro-batch: the next forward starts a new one.
        self._stepped = False
        self._handle = model.register_forward_pre_hook(self._before_forward)

    def _ends_cycle(self) -> bool:
        last_batch = self.loader is not None and self.loader.is_last_batch
        return self.micro_step + 1 >= self.steps or last_batch

    @property
    def is_boundary(self) -> bool:
        """Whether the current micro-batch is the last of its cycle (or of the epoch):
        fixed from its first forward until the next micro-batch's first forward."""
        return self._ends_cycle() if self._latched is None else self._latched

    def advance(self) -> bool:
        """Count one micro-step; True (and a new cycle) when it was a boundary."""
        if self._latched is None or self._stepped:  # a step without a forward since
            self._latched = self._ends_cycle()
        boundary = self._latched
        self.micro_step = 0 if boundary else self.micro_step + 1
        self._stepped = True
        return boundary

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        # A forward without gradients (evaluation between epochs) starts no micro-batch:
        # the loader may still stand at the last epoch's end.
        if torch.is_grad_enabled() and (self._latched is None or self._stepped):
            self._latched, self._stepped = self._ends_cycle(), False
        # The switch decides for the backward of the forward that follows (the engines
        # carry it to that backward); inside no_sync, its own hook runs after this one and
        # switches sync off again.
        self._backend.set_grad_sync(module, self.sync_each_batch or self.is_boundary)

    def state_dict(self) -> dict[str, int]:
        return {"micro_step": self.micro_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.micro_step = int(state["micro_step"])
        self._latched, self._stepped = None, False

    def remove(self) -> None:
        """Detach from the model (the forward hook) and the optimizer."""
        self._handle.remove()


def accumulate_grads(
    model: nn.Module,
    optimizer: AccelOptimizer,
    ctx: Context,
    *,
    steps: int | None = None,
    loader: Any = None,
    sync_each_batch: bool = False,
) -> tuple[nn.Module, AccelOptimizer, Context]:
    """Update the parameters once every `steps` micro-batches (and at the loader's end).

    (in place) The model gets a forward pre-hook that switches gradient sync on or off
    before each forward; `optimizer.accumulation.remove()` takes it away (an FSDP2 model
    also keeps a forward hook that carries each forward's choice to its backward, see
    `no_sync`). The optimizer returned is the one passed, holding the micro-step counter
    (`optimizer.accumulation`).

    Call `accel.backward`, `optimizer.step()` and `optimizer.zero_grad()` on every
    micro-batch as usual: the loss is divided by `steps`, gradients are synchronised only
    on the last micro-batch of each cycle, and step/zero_grad act only there.
    `optimizer.sync_gradients` says whether the current micro-batch is that last one:
    decided at its first forward, it reads the same before and after `optimizer.step()`
    and changes at the next micro-batch's first forward.

    Args:
        steps: micro-batches per optimizer update. None (the default): the launch's
            `--grad-accum-steps` (`ctx.settings.grad_accum_steps`), else 1. A value that
            contradicts a launch setting wins, with a warning naming both.
        loader: the loader from `distribute_loader`; its last batch ends a cycle early.
        sync_each_batch: synchronise gradients on every micro-batch (less memory for
            sharded engines, more communication).

    >>> model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx, steps=4)
    >>> model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx)  # the launch's
    """
    check_module("accumulate_grads", "model", model)
    check_context("accumulate_grads", ctx)
    check_bool("accumulate_grads", "sync_each_batch", sync_each_batch)
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool)
                              or steps < 1):
        raise IncompatibleOptionsError(
            f"steps must be a positive integer (micro-batches per optimizer update) or None "
            f"(the launch's --grad-accum-steps), got {steps!r}; pass e.g. steps=4"
        )
    if not isinstance(optimizer, AccelOptimizer):
        raise TransformOrderError("accumulate_grads needs the optimizer from wrap_optimizer; "
                                  "apply wrap_optimizer first")
    if optimizer.accumulation is not None or ctx.was_applied("accumulate_grads"):
        raise TransformOrderError("accumulate_grads was already applied; apply it once")
    if loader is not None and not hasattr(loader, "is_last_batch"):
        raise IncompatibleOptionsError(
            "loader must be the loader returned by accel.distribute_loader (it tells "
            "accumulate_grads where the epoch ends)"
        )
    steps = pick(ctx.settings, "grad_accum_steps", steps, ctx.settings.grad_accum_steps,
                 "accumulate_grads(steps=...)", warn=ctx.is_main_process)
    backend = backend_for(ctx)
    backend.set_grad_sync(model, True)  # the state between cycles; rejects a wrong model early
    optimizer.accumulation = GradientAccumulation(steps, model, loader, sync_each_batch, backend)
    return model, optimizer, ctx.record(f"accumulate_grads(steps={steps})", grad_accum_steps=steps)


class _SyncOff:
    """no_sync's forward pre-hook: registered after accumulate_grads' own, so it wins."""

    def __init__(self, backend: Any):
        self.backend = backend

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.backend.set_grad_sync(module, False)


@contextlib.contextmanager
def no_sync(model: nn.Module, ctx: Context) -> Iterator[None]:
    """Do not synchronise gradients of backward passes whose forward runs in this block.

    The rule holds in any order: a backward reduces its gradients across ranks if and
    only if its graph's forward ran outside the block, wherever the backward runs; the
    gradients of the others accumulate locally, and the next synchronised backward
    reduces them with its own. Forwards collected inside and after the block and
    backpropagated later therefore end with the same gradients on every rank. One
    backward of graphs from both sides (the sum of their losses) is synchronised. DDP
    may also all-reduce a backward from the block that starts while a graph from outside
    waits for its own (DDP arms at the forward): an extra all-reduce, the same gradients.

    Inside the block the model has a forward pre-hook of its own, removed on exit; the
    outermost block switches sync back on as it leaves. (in place, FSDP2) The first block
    leaves a forward hook on the model that marks each forward's outputs.

    Raises:
        GradSyncOrderError: under DDP with find_unused_parameters, static_graph or
            join_uneven_inputs, the backward of a graph from outside the block starts
            after another backward took the all-reduce its forward armed.

    >>> with accel.no_sync(model, ctx):
    ...     accel.backward(model(x).sum(), optimizer, ctx)
    """
    check_module("no_sync", "model", model)
    check_context("no_sync", ctx)
    backend = backend_for(ctx)
    backend.set_grad_sync(model, False)
    handle = model.register_forward_pre_hook(_SyncOff(backend))
    try:
        yield
    finally:
        handle.remove()
        # The hooks of enclosing blocks are the nesting depth: only the last one out
        # switches sync back on.
        if not any(isinstance(hook, _SyncOff) for hook in model._forward_pre_hooks.values()):
            backend.set_grad_sync(model, True)
