"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel

from accel.backends import COLLECTIVE_BACKWARD, LOCAL_SGD, BuiltinStrategy, single
from accel.backends import _state as state
from accel.context import Context
from accel.errors import IncompatibleOptionsError, UnsupportedError

_HAS_FORWARD_SYNC = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters

# Everything that does not depend on DDP is the single-process behaviour.
wrap_optimizer = single.wrap_optimizer
backward = single.backward
# Gradients are identical on every rank after the all-reduce: the local norm is the global one.
clip_grad_norm = single.clip_grad_norm
clip_grad_value = single.clip_grad_value
# torch's state-dict functions strip DDP's `module.` prefix: keys are the user's names.
get_state_dict = state.get_state_dict
set_state_dict = state.set_state_dict


@attrs.frozen
class DDP(BuiltinStrategy):
    """torch DistributedDataParallel: full replica per rank, gradients all-reduced.

    Args mirror DistributedDataParallel's; `comm_hook` takes a torch communication hook
    (with `comm_state`), or the shortcuts "fp16", "bf16" (compress gradients for the
    all-reduce) and "powersgd" (low-rank compression, PowerSGDState(rank=1) by default).

    >>> model, ctx = accel.shard_model(model, ctx, strategy=accel.DDP(comm_hook="fp16"))
    """

    capabilities = frozenset({COLLECTIVE_BACKWARD, LOCAL_SGD})
    find_unused_parameters: bool = False
    static_graph: bool = False
    bucket_cap_mb: float | None = None
    gradient_as_bucket_view: bool = False
    #: copy rank 0's buffers (BatchNorm statistics) to every rank before each forward.
    sync_buffers: bool = True
    comm_hook: str | Callable[..., Any] | None = None
    comm_state: Any = None


STRATEGY = DDP


def wrap_model(model: nn.Module, ctx: Context, strategy: Any) -> nn.Module:
    _check_process_group(ctx)
    model = model.to(ctx.device)
    if not ctx.layout.only_data_parallel:
        _sync_replicas(model, ctx)
    kwargs: dict[str, Any] = dict(
        find_unused_parameters=strategy.find_unused_parameters,
        static_graph=strategy.static_graph,
        gradient_as_bucket_view=strategy.gradient_as_bucket_view,
        process_group=ctx.dp_group,  # replicas across the data-parallel ranks only
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
        _register_comm_hook(ddp, strategy.comm_hook, hook, state)
    return ddp


def _sync_replicas(model: nn.Module, ctx: Context) -> None:
    """Give every rank of the mesh rank 0's tensors before DDP syncs its own group.

    DDP broadcasts within the data-parallel group only; ranks of other dimensions (tp,
    cp) hold replicas too until a transform of theirs shards them.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.detach(), group_src=0, group=ctx.group)


def _check_process_group(ctx: Context) -> None:
    if not ctx.is_distributed:
        raise IncompatibleOptionsError(
            "strategy DDP needs a process group of 2 or more ranks; launch with "
            "`accel launch -n 2 script.py`, or use strategy='single' for one process"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise IncompatibleOptionsError(
            f"strategy DDP needs a started process group, but this Context describes rank "
            f"{ctx.rank} of {ctx.world_size} with none; get the Context from accel.init() "
            "(or Context.from_process_group() when your framework started the group)"
        )


def _register_comm_hook(ddp: DistributedDataParallel, name: Any, hook: Any, state: Any) -> None:
    try:
        ddp.register_comm_hook(state, hook)
    except TypeError as exc:
        # torch accepts its bf16 hook only on CUDA+NCCL (or XPU+XCCL) builds.
        if name != "bf16":
            raise
        raise UnsupportedError(
            f"DDP comm_hook='bf16' cannot run here ({exc}); use comm_hook='fp16', or none"
        ) from exc


def _comm_hook(strategy: Any, ctx: Context) -> tuple[Any, Any]:
    hook = strategy.comm_hook
    if callable(hook):
        return hook, strategy.comm_state
    if hook == "fp16":
        return default_hooks.fp16_compress_hook, strategy.comm_state or ctx.dp_group
    if hook == "bf16":
        return default_hooks.bf16_compress_hook, strategy.comm_state or ctx.dp_group
    if hook == "powersgd":
        state = strategy.comm_state or powerSGD_hook.PowerSGDState(
            process_group=ctx.dp_group, matrix_approximation_rank=1, start_powerSGD_iter=2,
        )
        return powerSGD_hook.powerSGD_hook, state
    raise IncompatibleOptionsError(
        f"unknown DDP comm_hook {hook!r}: use 'fp16', 'bf16', 'powersgd' or a torch "
        "communication hook function (torch.distributed.algorithms.ddp_comm_hooks)"
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _require_ddp(model: nn.Module, purpose: str) -> None:
    # On the inner module the switches would be plain attributes DDP never reads.
    if not isinstance(model, DistributedDataParallel):
        raise IncompatibleOptionsError(
            f"{purpose} needs the model shard_model returned, got a {type(model).__name__}; "
            "pass that model, not accel.unwrap_model(model, ctx)"
        )


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    _require_ddp(model, "switching DDP's gradient sync")
    # What DDP.no_sync() toggles; DDP reads it at the start of each forward.
    model.require_backward_grad_sync = enabled


def join(model: nn.Module) -> Join:
    """torch's Join: a rank out of batches shadows the all-reduces of those still training."""
    _require_ddp(model, "join_uneven_inputs")
    return Join([model])
