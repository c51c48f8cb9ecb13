"""`shard_model`: the single entry point for the parallelism strategy, and its configs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import attrs
from torch import nn

from accel.backends import backend_for, load_backend
from accel.context import Context
from accel.errors import IncompatibleOptionsError, TransformOrderError


@attrs.frozen
class Single:
    """No parallelism: the model is placed on ctx.device (one process)."""

    backend: ClassVar[str] = "single"


@attrs.frozen
class DDP:
    """torch DistributedDataParallel: full replica per rank, gradients all-reduced.

    Args mirror DistributedDataParallel's; `comm_hook` takes a torch communication hook
    (with `comm_state`), or the shortcuts "fp16", "bf16" (compress gradients for the
    all-reduce) and "powersgd" (low-rank compression, PowerSGDState(rank=1) by default).

    >>> model, ctx = accel.shard_model(model, ctx, strategy=accel.DDP(comm_hook="fp16"))
    """

    backend: ClassVar[str] = "ddp"
    find_unused_parameters: bool = False
    static_graph: bool = False
    bucket_cap_mb: float | None = None
    gradient_as_bucket_view: bool = False
    #: copy rank 0's buffers (BatchNorm statistics) to every rank before each forward.
    sync_buffers: bool = True
    comm_hook: str | Callable[..., Any] | None = None
    comm_state: Any = None


_BY_NAME: dict[str, Callable[[], Any]] = {"single": Single, "ddp": DDP}


def resolve_strategy(strategy: str | Any | None, ctx: Context) -> Any:
    """A strategy config from a name, a config object, or None (DDP when distributed)."""
    if strategy is None:
        return DDP() if ctx.is_distributed else Single()
    if isinstance(strategy, str):
        try:
            return _BY_NAME[strategy.lower()]()
        except KeyError:
            raise IncompatibleOptionsError(
                f"unknown strategy {strategy!r}; use one of {sorted(_BY_NAME)} or a config "
                "object such as accel.DDP(...)"
            ) from None
    if not isinstance(getattr(strategy, "backend", None), str):
        raise IncompatibleOptionsError(
            f"{strategy!r} is not a strategy: pass a name ('ddp') or a config like accel.DDP()"
        )
    return strategy


def shard_model(
    model: nn.Module, ctx: Context, *, strategy: str | Any | None = None
) -> tuple[nn.Module, Context]:
    """Place the model and apply the parallelism strategy (DDP, ...); record it in the Context.

    Args:
        strategy: "single", "ddp", a config object (accel.DDP(...)), or None for DDP when
            the world has several processes and a plain placement otherwise.

    Parameter names of the user's module do not change; `unwrap_model` returns it.

    >>> model, ctx = accel.shard_model(model, ctx, strategy="ddp")
    """
    if ctx.was_applied("shard_model"):
        raise TransformOrderError(
            "shard_model was already applied to this Context; apply it once, after with_amp"
        )
    config = resolve_strategy(strategy, ctx)
    # ctx.backend is still "single" here: it is the strategy being applied that decides
    # whether an engine may replace parameters the wrapped optimizer already holds.
    if ctx.was_applied("wrap_optimizer") and config.backend != "single":
        raise TransformOrderError(
            f"shard_model({config.backend}) must come before wrap_optimizer (the engine may "
            "replace the parameters the optimizer holds); reorder the transforms"
        )
    wrapped = load_backend(config.backend).wrap_model(model, ctx, config)
    return wrapped, ctx.record(f"shard_model({_describe(config)})",
                               backend=config.backend, strategy=config)


def _describe(config: Any) -> str:
    if not attrs.has(type(config)):  # a user's own config class: its name says enough
        return config.backend
    changed = [f"{field.name}={getattr(config, field.name)!r}"
               for field in attrs.fields(type(config))
               if getattr(config, field.name) != field.default]
    return config.backend + (f", {', '.join(changed)}" if changed else "")


def unwrap_model(model: nn.Module, ctx: Context) -> nn.Module:
    """The user's own module inside whatever wrapper the backend put around it.

    Also strips a torch.compile wrapper.
    """
    inner = backend_for(ctx).unwrap_model(model)
    return getattr(inner, "_orig_mod", inner)
