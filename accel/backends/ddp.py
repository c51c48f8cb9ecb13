"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.distributed.algorithms.join import Join
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.nn.parallel.distributed import _find_tensors
from torch.utils.weak import WeakIdKeyDictionary

from accel.backends import COLLECTIVE_BACKWARD, LOCAL_SGD, BuiltinStrategy, single
from accel.backends import _state as state
from accel.context import Context
from accel.errors import (
    GradSyncOrderError,
    IncompatibleOptionsError,
    InvalidOptionError,
    UnsupportedError,
)
from accel.validation import check_bool, check_number, option_validator, shown

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


_flag = option_validator("DDP", check_bool)
_COMM_HOOKS = ("fp16", "bf16", "powersgd")


def _check_comm_hook(instance: Any, attribute: Any, value: Any) -> None:
    if value is None or callable(value) or value in _COMM_HOOKS:
        return
    raise InvalidOptionError(
        f"accel.DDP: unknown DDP comm_hook {shown(value)}; comm_hook must be one of "
        f"{', '.join(map(repr, _COMM_HOOKS))}, a torch communication hook function "
        "(torch.distributed.algorithms.ddp_comm_hooks) or None")


@attrs.frozen
class DDP(BuiltinStrategy):
    """torch DistributedDataParallel: full replica per rank, gradients all-reduced.

    Args mirror DistributedDataParallel's; `comm_hook` takes a torch communication hook
    (with `comm_state`), or the shortcuts "fp16", "bf16" (compress gradients for the
    all-reduce) and "powersgd" (low-rank compression, PowerSGDState(rank=1) by default).

    >>> model, ctx = accel.shard_model(model, ctx, strategy=accel.DDP(comm_hook="fp16"))
    """

    capabilities = frozenset({COLLECTIVE_BACKWARD, LOCAL_SGD})
    find_unused_parameters: bool = attrs.field(default=False, validator=_flag)
    static_graph: bool = attrs.field(default=False, validator=_flag)
    bucket_cap_mb: float | None = attrs.field(
        default=None, validator=option_validator("DDP", check_number, above=0, optional=True))
    gradient_as_bucket_view: bool = attrs.field(default=False, validator=_flag)
    #: copy rank 0's buffers (BatchNorm statistics) to every rank before each forward.
    sync_buffers: bool = attrs.field(default=True, validator=_flag)
    comm_hook: str | Callable[..., Any] | None = attrs.field(default=None,
                                                             validator=_check_comm_hook)
    comm_state: Any = None


STRATEGY = DDP


def wrap_model(model: nn.Module, ctx: Context, strategy: Any) -> nn.Module:
    _check_process_group(ctx)
    model = model.to(ctx.device)
    if not ctx.layout.only_data_parallel:
        # DDP broadcasts within the data-parallel group only; ranks of other dimensions
        # (tp, cp) hold replicas too until a transform of theirs shards them.
        state.sync_from_rank0(model, ctx)
    if any(isinstance(param, DTensor) for param in model.parameters()):
        raise UnsupportedError(
            "DDP over a tensor-parallel model (DTensor parameters) is not supported; use "
            "strategy=accel.FSDP() (FSDP over dp_shard, HSDP with dp_replicate in the "
            "mesh), as torchtitan composes TP with data parallelism")
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
        hook, hook_state = _comm_hook(strategy, ctx)
        _register_comm_hook(ddp, strategy.comm_hook, hook, hook_state)
    _follow_forwards(ddp)  # from the first forward on, or no_sync could not keep its rule
    return ddp


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
    # "powersgd": the last name the config lets through (_check_comm_hook)
    state = strategy.comm_state or powerSGD_hook.PowerSGDState(
        process_group=ctx.dp_group, matrix_approximation_rank=1, start_powerSGD_iter=2,
    )
    return powerSGD_hook.powerSGD_hook, state


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
    """Whether the backward passes of the forwards that follow all-reduce their gradients."""
    _require_ddp(model, "switching DDP's gradient sync")
    _follow_forwards(model)
    # What DDP.no_sync() toggles; DDP reads it at the start of each forward.
    model.require_backward_grad_sync = enabled


#: each DDP model's _SyncFollowsForward, keyed weakly by the model (no attribute on it).
_FOLLOWERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _follow_forwards(model: DistributedDataParallel) -> None:
    if model not in _FOLLOWERS:
        follower = _FOLLOWERS[model] = _SyncFollowsForward()
        model.register_forward_hook(follower.after_forward)


class _SyncFollowsForward:
    """Makes each DDP backward all-reduce if and only if its graph's forward ran with sync on.

    DDP arms its reducer at a forward with sync on, and the next backward to start uses
    the arm, whichever graph it belongs to: forwards inside and outside accel.no_sync
    followed by their backward passes in another order all-reduced the wrong one, and the
    replicas drifted apart. The outputs of each forward carry a hook that runs as their
    backward starts and re-arms the reducer when an earlier backward took the arm.
    """

    def __init__(self) -> None:
        self.armed = False  # a forward armed the reducer and no backward has started since
        self.synced_task: int | None = None  # the autograd graph task the reducer serves

    def after_forward(self, model: nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return  # DDP arms nothing and there is no graph
        sync = model.require_backward_grad_sync
        self.armed = self.armed or sync
        hook = functools.partial(self.before_backward, model, sync)
        for tensor in _find_tensors(output):
            if tensor.requires_grad:
                tensor.register_hook(hook)

    def before_backward(self, model: nn.Module, sync: bool, grad: torch.Tensor) -> None:
        # Runs before any gradient of this graph reaches a parameter.
        task = torch._C._current_graph_task_id()
        if self.armed:
            self.armed, self.synced_task = False, task
        if sync and self.synced_task != task:
            _rearm(model)
            self.synced_task = task


def _rearm(model: nn.Module) -> None:
    """Make DDP all-reduce in the backward now starting, as its forward would have."""
    blocker = _rearm_blocker(model)
    if blocker:
        raise GradSyncOrderError(
            "this backward's forward ran with gradient sync on (outside accel.no_sync), but "
            "the backward of another graph started after that forward and used the sync: "
            "DDP arms its all-reduce at a forward, for whichever backward comes next. accel "
            f"re-arms it for this backward, but cannot with {blocker}. Backpropagate a graph "
            "built with sync on before starting any other backward (or sum the losses and "
            "call backward once)"
        )
    # As DDP's forward does; the search for unused parameters, which needs the outputs,
    # is ruled out above.
    model.reducer.prepare_for_backward([])


def _rearm_blocker(model: nn.Module) -> str | None:
    """The DDP option that ties the reducer to the forward itself, if any."""
    join_config = getattr(model, "_join_config", None)
    options = {
        "DDP(find_unused_parameters=True)": model.find_unused_parameters,
        "DDP(static_graph=True)": model.static_graph,
        "join_uneven_inputs": join_config is not None and join_config.enable,
        "compiled autograd (DDP's Python reducer)": getattr(model, "_use_python_reducer", False),
        "delay_all_reduce_named_params": getattr(model, "_delay_all_reduce_all_params", False),
    }
    return next((name for name, active in options.items() if active), None)


def join(model: nn.Module) -> Join:
    """torch's Join: a rank out of batches shadows the all-reduces of those still training."""
    _require_ddp(model, "join_uneven_inputs")
    return Join([model])
