"""One process, no wrapper: the model is placed on ctx.device and trained as it is."""

from __future__ import annotations

import contextlib
from typing import Any

import attrs
import torch
from torch import nn

from accel.backends import KEEPS_PARAMETERS, LOCAL_SGD, BuiltinStrategy
from accel.backends import _state as state
from accel.context import Context

# State dicts go through torch.distributed.checkpoint, the same for every torch engine.
get_state_dict = state.get_state_dict
# DTensor-aware (tensor_parallel without data parallelism); torch's clip_grad_norm_ otherwise.
clip_grad_norm = state.clip_grad_norm
set_state_dict = state.set_state_dict


@attrs.frozen
class Single(BuiltinStrategy):
    """No parallelism: the model is placed on ctx.device (one process)."""

    capabilities = frozenset({KEEPS_PARAMETERS, LOCAL_SGD})


STRATEGY = Single


def wrap_model(model: nn.Module, ctx: Context, strategy: Any) -> nn.Module:
    return model.to(ctx.device)


def unwrap_model(model: nn.Module) -> nn.Module:
    return model


def wrap_optimizer(optimizer: Any, ctx: Context) -> Any:
    return optimizer


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Nothing to synchronise with one process: gradients simply accumulate."""


def backward(loss: torch.Tensor, optimizer: Any, **kwargs: Any) -> None:
    scaler = optimizer.scaler
    (scaler.scale(loss) if scaler is not None else loss).backward(**kwargs)


def clip_grad_value(model: nn.Module, clip_value: float) -> None:
    params = [p for p in model.parameters() if p.grad is not None]
    if params:  # torch's clip_grad_value_ raises on a model with no gradient yet
        torch.nn.utils.clip_grad_value_(params, clip_value)


def join(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """One process has no peers to wait for."""
    return contextlib.nullcontext()
