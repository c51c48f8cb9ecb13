"""`accel.Custom(parallelize_fn)`: your own parallelism on `ctx.mesh`, accel's loop around it.

`parallelize_fn(model, ctx) -> model` applies whatever it likes (torch's `fully_shard`,
`parallelize_module`, `replicate`, DDP, or nothing) on the mesh of the Context. The loop
stays accel's: gradient sync is switched on the FSDP2 and DDP modules the function
built, gradient norms are global over DTensors, state dicts go through torch's
distributed state-dict API, which understands all of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import attrs
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from accel.backends import COLLECTIVE_BACKWARD, BuiltinStrategy, _state, single
from accel.context import Context
from accel.errors import IncompatibleOptionsError, InvalidOptionError, UnsupportedError
from accel.validation import shown

backward = single.backward
clip_grad_value = single.clip_grad_value
wrap_optimizer = single.wrap_optimizer
clip_grad_norm = _state.clip_grad_norm
get_state_dict = _state.get_state_dict
set_state_dict = _state.set_state_dict


def _check_callable(instance: Any, attribute: Any, value: Any) -> None:
    if not callable(value):
        raise InvalidOptionError(
            "accel.Custom takes a function: parallelize_fn must be a function "
            f"(model, ctx) -> model, got {shown(value)}")


@attrs.frozen
class Custom(BuiltinStrategy):
    """Your own parallelism: `parallelize_fn(model, ctx) -> model`, applied by shard_model.

    The function places the model on `ctx.device` and applies what it wants on
    `ctx.mesh` (e.g. `fully_shard(model, mesh=ctx.mesh["dp_shard"])`). Gradient sync
    for accumulation is switched on the outermost FSDP2 and DDP modules it built.

    >>> def parallelize(model, ctx):
    ...     return fully_shard(model.to(ctx.device), mesh=ctx.mesh["dp_shard"])
    >>> model, ctx = accel.shard_model(model, ctx, strategy=accel.Custom(parallelize))
    """

    parallelize_fn: Callable[[nn.Module, Context], nn.Module] = attrs.field(
        validator=_check_callable)
    capabilities = frozenset({COLLECTIVE_BACKWARD})


STRATEGY = Custom


def wrap_model(model: nn.Module, ctx: Context, strategy: Custom) -> nn.Module:
    result = strategy.parallelize_fn(model, ctx)
    if not isinstance(result, nn.Module):
        raise IncompatibleOptionsError(
            f"accel.Custom's parallelize_fn must return the model (an nn.Module), got "
            f"{type(result).__name__}; end it with `return model`")
    return result


def unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Switch sync on the outermost FSDP2 / DDP modules; a model with neither needs none."""
    for module in _sync_owners(model):
        if isinstance(module, DistributedDataParallel):
            module.require_backward_grad_sync = enabled
        else:
            module.set_requires_gradient_sync(enabled)


def _sync_owners(model: nn.Module) -> Iterator[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    def walk(module: nn.Module) -> Iterator[nn.Module]:
        if isinstance(module, (DistributedDataParallel, FSDPModule)):
            yield module  # it switches everything below it
            return
        for child in module.children():
            yield from walk(child)

    return walk(model)


def join(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    from torch.distributed.algorithms.join import Join

    owners = list(_sync_owners(model))
    if owners and all(isinstance(m, DistributedDataParallel) for m in owners):
        return Join(owners)
    raise UnsupportedError(
        "join_uneven_inputs under accel.Custom needs DDP modules (torch's Join); keep "
        "distribute_loader's even_batches=True, which gives every rank as many batches")


