"""State dicts of the torch-native engines (single, ddp, fsdp), through one implementation.

torch.distributed.checkpoint.state_dict strips DDP's ``module.`` prefix, gathers or keeps
FSDP2's DTensor shards, and keys optimizer state by parameter name instead of position:
whatever engine trained a model, its state dicts carry the user's own names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.placement_types import _StridedShard
from torch.utils._pytree import tree_leaves

from accel.backends._optimizer import AccelOptimizer
from accel.errors import InvalidArgumentError


def get_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, *, full: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The model's (and optimizer's) state: full on rank 0's CPU, or in native sharded form.

    Args:
        full: True gathers unsharded tensors to the CPU of rank 0 (the other ranks of a
            multi-process world get empty dicts, so no rank but one holds a full copy);
            False returns the engine's own form (DTensor shards under FSDP2; tensors that
            share memory with the model otherwise) for torch.distributed.checkpoint.

    Returns:
        (model state, optimizer state or None when `optimizer` is None).
    """
    options = StateDictOptions(full_state_dict=full, cpu_offload=full)
    model_state = _without_strided_shards(get_model_state_dict(model, options=options))
    if optimizer is None:
        return model_state, None
    inner = _torch_optimizer(optimizer)
    with _initialised(inner):
        optimizer_state = get_optimizer_state_dict(model, inner, options=options)
    return model_state, _without_strided_shards(optimizer_state)


def set_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer | None,
    model_state: dict[str, Any], optimizer_state: dict[str, Any] | None, *, full: bool,
) -> None:
    """Load state dicts in the form `get_state_dict(..., full=full)` returns.

    With full=True in a multi-process world only rank 0's dicts are read and broadcast
    (other ranks may pass {}), so a checkpoint file need only be read on rank 0.
    The dicts passed in are left as they are.
    """
    if (optimizer is None) != (optimizer_state is None):
        raise InvalidArgumentError(
            "pass both optimizer and optimizer_state to load optimizer state, or neither "
            "(optimizer=None, optimizer_state=None) to load the model only"
        )
    broadcast = full and dist.is_available() and dist.is_initialized() and (
        dist.get_world_size() > 1)
    options = StateDictOptions(full_state_dict=full, broadcast_from_rank0=broadcast)
    # torch renames and pops keys of the dicts it is given: it gets copies. Model and
    # optimizer load separately: torch's combined call skips the model on a rank whose
    # model dict is empty, and rank 0 then waits forever in the broadcast.
    layouts = _strided_layouts(model)
    set_model_state_dict(model, _restride(dict(model_state), layouts), options=options)
    if optimizer is not None:
        inner, state = _torch_optimizer(optimizer), _copy_containers(optimizer_state)
        if full and not inner.state and _is_stateless(inner):
            # torch's whole-state load takes the device from a tensor of the optimizer's
            # state and asserts without one ("Expected device to be set"); a stateless
            # optimizer (SGD without momentum) has none, and its state is only its param
            # groups: every rank loads them as its own.
            state = _from_rank0(state) if broadcast else state
            options = StateDictOptions(full_state_dict=False)
        with _initialised(inner):
            set_optimizer_state_dict(model, inner, _restride(state, layouts), options=options)


def _torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    # torch reads param_groups and state and calls step(); the wrapper's own extras (loss
    # scale, accumulation micro-step) are not part of the engine's state.
    return optimizer.optimizer if isinstance(optimizer, AccelOptimizer) else optimizer


def _without_strided_shards(value: Any) -> Any:
    """`value` with each strided-shard DTensor laid out as plain shards and replicas.

    A strided shard (GPT-2's fused q|k|v under tensor_parallel) holds several separate
    column blocks, which torch.distributed.checkpoint cannot describe as one chunk (it
    refuses the save: "overlapping chunks"); gathered over those dimensions it can.
    """
    if isinstance(value, dict):
        return {key: _without_strided_shards(item) for key, item in value.items()}
    if isinstance(value, DTensor) and any(isinstance(p, _StridedShard)
                                          for p in value.placements):
        plain = [Replicate() if isinstance(p, _StridedShard) else p for p in value.placements]
        return value.redistribute(value.device_mesh, plain)
    return value


def _strided_layouts(model: nn.Module) -> dict[str, DTensor]:
    """The model's strided-shard parameters by name: where loaded values go back to."""
    return {name: param for name, param in model.named_parameters()
            if isinstance(param, DTensor)
            and any(isinstance(p, _StridedShard) for p in param.placements)}


def _restride(state: dict[str, Any], layouts: dict[str, DTensor]) -> dict[str, Any]:
    """Undo `_without_strided_shards` for a model's (by name) or optimizer's state dict."""
    if not layouts:
        return state
    for name, param in layouts.items():
        entries = [(state, name)] if name in state else []
        per_param = state.get("state", {}).get(name)
        if isinstance(per_param, dict):
            entries += [(per_param, key) for key in per_param]
        for container, key in entries:
            value = container[key]
            if isinstance(value, DTensor) and value.shape == param.shape:
                container[key] = value.redistribute(param.device_mesh, param.placements)
    return state


def _is_stateless(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a step leaves no tensor of one dimension or more in the optimizer's state
    (SGD without momentum): tried on a one-element parameter per param group, with the
    group's settings. False where that cannot be tried (an optimizer whose groups hold
    settings its constructor does not take)."""
    for group in optimizer.param_groups:
        probe = torch.zeros(1, requires_grad=True)
        probe.grad = torch.zeros(1)
        try:
            twin = type(optimizer)([probe], **{key: group[key] for key in optimizer.defaults
                                               if key in group})
            twin.step()
        except Exception:  # noqa: BLE001 - not constructible so: assume it has state
            return False
        if any(tensor.dim() > 0 for tensor in tree_leaves(dict(twin.state))
               if isinstance(tensor, torch.Tensor)):
            return False
    return True


@contextlib.contextmanager
def _initialised(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Keep torch's optimizer-state helpers from initialising a stateless optimizer.

    Given an optimizer with no state and no gradients, they first take a step of zero
    gradients on every parameter (a full-size zero tensor each, then the step) so that
    every state tensor exists. A stateless one (SGD without momentum) gains nothing
    from it, on every save and load; one small gradient, present for the call, tells
    torch that the optimizer is ready.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]
              if p.requires_grad]
    if optimizer.state or not params or any(p.grad is not None for p in params) or (
            not _is_stateless(optimizer)):
        yield
        return
    smallest = min(params, key=lambda p: p.numel())
    smallest.grad = torch.zeros_like(smallest)
    try:
        yield
    finally:
        smallest.grad = None


def _from_rank0(state: Any) -> Any:
    """Rank 0's (small, tensor-free) optimizer state on every rank."""
    box = [state]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _copy_containers(value: Any) -> Any:
    """A copy of nested dicts and lists; the tensors in them are shared, not copied."""
    if isinstance(value, dict):
        return {key: _copy_containers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_containers(item) for item in value]
    return value


def clip_grad_norm(model: nn.Module, max_norm: float, norm_type: float) -> torch.Tensor:
    """Clip by the norm of all gradients, DTensor shards included: the whole model's norm.

    Under tensor parallelism x FSDP the gradients live on several meshes (2-D for the
    TP-sharded weights, 1-D for the rest); each mesh's norm is taken apart, made whole,
    and the parts combined, since torch's foreach kernels take one mesh at a time.
    """
    params = [param for param in model.parameters() if param.grad is not None]
    groups: dict[Any, list[torch.Tensor]] = {}
    for param in params:
        mesh = param.grad.device_mesh if isinstance(param.grad, DTensor) else None
        groups.setdefault(mesh, []).append(param)
    norms = [_whole(torch.nn.utils.get_total_norm([p.grad for p in group], norm_type))
             for group in groups.values()]
    if not norms:
        return torch.tensor(0.0)
    total = torch.nn.utils.get_total_norm(norms, norm_type) if len(norms) > 1 else norms[0]
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def _whole(norm: torch.Tensor) -> torch.Tensor:
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def sync_from_rank0(module: nn.Module, ctx: Any) -> None:
    """Give every rank of the world rank 0's parameters and buffers of `module`.

    Skips DTensors (a shard is its rank's own), meta tensors (no data yet) and a tensor
    seen before (tied weights are sent once).
    """
    seen: set[int] = set()
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if isinstance(tensor, DTensor) or tensor.is_meta or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            dist.broadcast(tensor.detach(), group_src=0, group=ctx.group)
