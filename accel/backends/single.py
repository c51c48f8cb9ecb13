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


def clip_grad_norm(model: nn.Module, max_norm: float, norm_type: float) -> torch.Tensor:
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type=norm_type)


def clip_grad_value(model: nn.Module, clip_value: float) -> None:
    torch.nn.utils.clip_grad_value_(model.parameters(), clip_value)


def join(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """One process has no peers to wait for."""
    return contextlib.nullcontext()
