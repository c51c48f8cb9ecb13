"""`shard_model`: apply the parallelism strategy to the model; `unwrap_model` undoes the view.

The strategies themselves live with their engines in accel/backends/ (accel.DDP in
ddp.py, accel.FSDP in fsdp.py, ...); any object implementing `accel.Strategy` works too.
"""

from __future__ import annotations

from typing import Any

import attrs
from torch import nn

from accel.backends import (
    CONTEXT_PARALLEL,
    KEEPS_PARAMETERS,
    Strategy,
    engine_of,
    resolve_strategy,
)
from accel.context import Context
from accel.errors import IncompatibleOptionsError, TransformOrderError
from accel.launch_settings import pick, without_unapplied_precision
from accel.transforms.settings import launch_strategy
from accel.validation import check_context, check_module


def shard_model(
    model: nn.Module, ctx: Context, *, strategy: str | Strategy | None = None
) -> tuple[nn.Module, Context]:
    """Apply the parallelism strategy to the model (in place); record it in the Context.

    (in place) The user's module is changed, not copied: it is moved to ctx.device
    (`model.to`). FSDP shards it where it is (torch's `fully_shard`: parameters become
    DTensors, FSDP hooks are added, its class becomes an FSDPModule subclass,
    `activation_checkpointing` replaces the units' `forward`, and rank 0's values are
    copied into every rank). XLA moves it to the XLA device (new parameter objects in the
    same module) and marks SPMD shardings. DeepSpeed's engine, built at the first forward,
    re-lays out the parameters' data and adds DeepSpeed's own attributes to them. DDP
    wraps it in a new DistributedDataParallel. On a mesh (`accel.init(mesh=...)`), data
    parallelism acts on the data-parallel dimensions only (dp_replicate x dp_shard).

    Args:
        strategy: a name ("single", "ddp", "fsdp", "deepspeed", "xla"), a config object
            (accel.DDP(...), accel.FSDP(...)), accel.Custom(parallelize_fn), your own
            `accel.Strategy`, or None: the launch's `--strategy` (with its engine's
            options from the config file; `ctx.settings.strategy`), else XLA() on an XLA
            device, DDP when the world has several processes and a plain placement
            otherwise. A strategy of another engine than the launch's wins, with a
            warning naming both.

    Parameter names of the user's module do not change; `unwrap_model` returns it.

    >>> model, ctx = accel.shard_model(model, ctx)                  # the launch's strategy
    >>> model, ctx = accel.shard_model(model, ctx, strategy="ddp")  # DDP whatever the launch
    """
    check_module("shard_model", "model", model)
    check_context("shard_model", ctx)
    if ctx.was_applied("shard_model"):
        raise TransformOrderError(
            "shard_model was already applied to this Context; apply it once, after with_amp"
        )
    ctx = without_unapplied_precision(ctx, "shard_model")
    config = resolve_strategy(strategy, ctx) if strategy is not None else None
    if config is not None:  # only the engine is compared: options have no launch flag
        pick(ctx.settings, "strategy", config.name, ctx.settings.strategy,
             "shard_model(strategy=...)", warn=ctx.is_main_process)
    config = config or launch_strategy(ctx.settings) or resolve_strategy(None, ctx)
    # An engine may replace the parameters an already wrapped optimizer holds.
    if ctx.was_applied("wrap_optimizer") and KEEPS_PARAMETERS not in config.capabilities:
        raise TransformOrderError(
            f"shard_model({config.name}) must come before wrap_optimizer (the engine may "
            "replace the parameters the optimizer holds); reorder the transforms"
        )
    if ctx.context_parallel and CONTEXT_PARALLEL not in config.capabilities:
        raise IncompatibleOptionsError(
            f"shard_model({config.name}) does not reduce gradients over the cp ranks of "
            "accel.context_parallel; use strategy=accel.FSDP(), which shards over dp_shard x cp"
        )
    # A strategy an earlier transform recorded (pipeline_parallel's) runs this one inside.
    around = getattr(ctx.strategy, "around", None)
    engine = around(config) if callable(around) else config
    wrapped = engine.wrap_model(model, ctx)
    return wrapped, ctx.record(f"shard_model({_describe(config)})",
                               backend=config.name, strategy=engine)


def _describe(config: Any) -> str:
    if not attrs.has(type(config)):  # a user's own config class: its name says enough
        return config.name
    changed = [f"{field.name}={getattr(config, field.name)!r}"
               for field in attrs.fields(type(config))
               if getattr(config, field.name) != field.default]
    return config.name + (f", {', '.join(changed)}" if changed else "")


def unwrap_model(model: nn.Module, ctx: Context) -> nn.Module:
    """The user's own module inside whatever wrapper the backend put around it.

    Also strips a torch.compile wrapper.
    """
    check_module("unwrap_model", "model", model)
    check_context("unwrap_model", ctx)
    inner = engine_of(ctx).unwrap_model(model)
    return getattr(inner, "_orig_mod", inner)
