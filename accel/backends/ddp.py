"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from accel.backends import single
from accel.context import Context
from accel.errors import IncompatibleOptionsError

_HAS_FORWARD_SYNC = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters

# Everything that does not depend on DDP is the single-process behaviour.
wrap_optimizer = single.wrap_optimizer
backward = single.backward
# Gradients are identical on every rank after the all-reduce: the local norm is the global one.
clip_grad_norm = single.clip_grad_norm


def wrap_model(model: nn.Module, ctx: Context, strategy: Any) -> nn.Module:
    model = model.to(ctx.device)
    kwargs: dict[str, Any] = dict(
        find_unused_parameters=strategy.find_unused_parameters,
        static_graph=strategy.static_graph,
        gradient_as_bucket_view=strategy.gradient_as_bucket_view,
        process_group=ctx.group,
    )
    # torch 2.13 renamed broadcast_buffers; older releases (the XLA lane's 2.9) lack the new name.
    sync_name = "forward_sync_buffers" if _HAS_FORWARD_SYNC else "broadcast_buffers"
    kwargs[sync_name] = strategy.sync_buffers
    if strategy.bucket_cap_mb is not None:
        kwargs["bucket_cap_mb"] = strategy.bucket_cap_mb
    if ctx.device.type == "cuda":
        kwargs.update(device_ids=[ctx.device], output_device=ctx.device)
    ddp = DistributedDataParallel(model, **kwargs)
    if strategy.comm_hook is not None:
        hook, state = _comm_hook(strategy, ctx)
        ddp.register_comm_hook(state, hook)
    return ddp


def _comm_hook(strategy: Any, ctx: Context) -> tuple[Any, Any]:
    hook = strategy.comm_hook
    if callable(hook):
        return hook, strategy.comm_state
    if hook == "fp16":
        return default_hooks.fp16_compress_hook, strategy.comm_state or ctx.group
    if hook == "bf16":
        return default_hooks.bf16_compress_hook, strategy.comm_state or ctx.group
    if hook == "powersgd":
        state = strategy.comm_state or powerSGD_hook.PowerSGDState(
            process_group=ctx.group, matrix_approximation_rank=1, start_powerSGD_iter=2,
        )
        return powerSGD_hook.powerSGD_hook, state
    raise IncompatibleOptionsError(
        f"unknown DDP comm_hook {hook!r}: use 'fp16', 'bf16', 'powersgd' or a torch "
        "communication hook function (torch.distributed.algorithms.ddp_comm_hooks)"
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    # What DDP.no_sync() toggles; DDP reads it at the start of each forward.
    model.require_backward_grad_sync = enabled

