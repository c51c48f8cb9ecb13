"""`shard_model`: the single entry point for the parallelism strategy, and its configs."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
from torch import nn

from accel.backends import backend_for, load_backend
from accel.context import Context
from accel.errors import IncompatibleOptionsError, TransformOrderError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy


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


def _to_shard_units(value: Any) -> Any:
    """One module class, or a list or set of them, as a tuple (frozen configs hash)."""
    if isinstance(value, type):
        return (value,)
    if isinstance(value, (list, set, frozenset)):
        return tuple(value)
    return value


@attrs.frozen
class FSDP:
    """torch FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded.

    Args:
        shard_units: the modules that become their own shard unit (one all-gather and
            one reduce-scatter each): module classes, a parameter count (the smallest
            modules holding that many parameters not yet in a unit), or a function
            `module -> bool`. Default: the repeated blocks of each nn.ModuleList
            (transformer layers), else the root alone.
        reshard_after_forward: free gathered parameters after forward (True) or keep them
            for backward (False); None is torch's choice (True for units, False for root).
        mixed_precision: a torch `MixedPrecisionPolicy`; by default from the Context
            (bf16/fp16: parameters gathered in that dtype, gradients reduced in fp32).
        cpu_offload: keep shards, gradients and optimizer state on the CPU: True, or a
            torch `CPUOffloadPolicy` (True pins memory only for an accelerator device).
        activation_checkpointing: recompute each shard unit's activations in backward.
        replicate_degree: HSDP: a (replicate_degree, world_size / replicate_degree)
            device mesh; parameters are sharded along the second dimension, replicated
            along the first.
        mesh: your own torch DeviceMesh (1-D: FSDP, 2-D: HSDP) instead.
        init_fn: for a model built on the meta device, called on each module holding
            parameters or buffers once they are allocated; default `reset_parameters()`.

    >>> model, ctx = accel.shard_model(model, ctx, strategy=accel.FSDP(shard_units=Block))
    """

    backend: ClassVar[str] = "fsdp"
    shard_units: (tuple[type[nn.Module], ...] | int | Callable[[nn.Module], bool] | None) = (
        attrs.field(default=None, converter=_to_shard_units))
    reshard_after_forward: bool | int | None = None
    mixed_precision: MixedPrecisionPolicy | None = None
    cpu_offload: bool | OffloadPolicy = False
    activation_checkpointing: bool = False
    replicate_degree: int | None = None
    mesh: DeviceMesh | None = None
    init_fn: Callable[[nn.Module], None] | None = None


def _check_deepspeed_stage(instance: Any, attribute: Any, value: int | None) -> None:
    if value not in (None, 1, 2, 3):
        raise IncompatibleOptionsError(
            f"DeepSpeed stage must be 1 (optimizer state partitioned), 2 (+ gradients) or "
            f"3 (+ parameters), got {value!r}"
        )


@attrs.frozen
class DeepSpeed:
    """DeepSpeed ZeRO: optimizer state (stage 1), gradients (2) and parameters (3) partitioned.

    `shard_model` wraps the model; `wrap_optimizer` links the optimizer to it; the engine
    (`deepspeed.initialize`) is built at the model's first forward, once accumulation
    and batch size are known. The loop stays the one of every other strategy:
    `accel.backward`, `optimizer.step()`, `optimizer.zero_grad()`, `accel.clip_grad_norm`
    go through the engine.

    One source of truth: precision (with_amp), gradient accumulation (accumulate_grads),
    clipping (clip_grad_norm), batch size (the loader linked to accumulate_grads, else the
    first forward's batch) and fp16 loss scaling (the GradScaler of wrap_optimizer) are
    written into the DeepSpeed config. `config` adds everything else; where it sets one
    of those to another value an error names both ("auto" is filled in).

    Args:
        stage: ZeRO stage 1, 2 or 3; None: the config's, else 2.
        offload_optimizer: keep optimizer state and fp32 master weights on the CPU.
        offload_params: keep partitioned parameters on the CPU (stage 3 only).
        config: a DeepSpeed config dict or JSON file path (zero_optimization tuning,
            communication settings, ...). None: accel's settings alone.

    >>> model, ctx = accel.shard_model(model, ctx, strategy=accel.DeepSpeed(stage=3))
    """

    backend: ClassVar[str] = "deepspeed"
    stage: int | None = attrs.field(default=None, validator=_check_deepspeed_stage)
    offload_optimizer: bool | None = None
    offload_params: bool | None = None
    # A dict does not hash: compared, but left out of the hash of the frozen config.
    config: Any = attrs.field(default=None, hash=False)


def _to_optional_tuple(value: Any) -> tuple[Any, ...] | None:
    return None if value is None else tuple(value)


@attrs.frozen
class XLA:
    """torch_xla: the model on an XLA device (TPU, or PJRT's CPU device in tests).

    Without a mesh, each process holds a replica (one per TPU core under `accel launch
    --xla`) and the optimizer step averages gradients across replicas, as
    `xm.optimizer_step`. With `mesh_shape` or `fsdp`, SPMD: one process drives every
    device of the host through a device mesh; batches from `distribute_loader` are
    sharded along their first (batch) dimension over all mesh axes.

    Args:
        mesh_shape: devices per mesh axis (their product is the device count); default
            with SPMD: all devices on one axis.
        axis_names: one name per mesh axis; default ("fsdp",) for one axis, else
            ("data", "fsdp", ...).
        fsdp: FSDP-style parameter sharding: dim 0 of every parameter is split over the
            mesh axis `fsdp_axis` (parameters whose dim 0 does not divide stay replicated).
        fsdp_axis: the name of the mesh axis parameters are sharded over.

    >>> model, ctx = accel.shard_model(model, ctx, strategy=accel.XLA(fsdp=True))
    """

    backend: ClassVar[str] = "xla"
    mesh_shape: tuple[int, ...] | None = attrs.field(default=None,
                                                     converter=_to_optional_tuple)
    axis_names: tuple[str, ...] | None = attrs.field(default=None,
                                                     converter=_to_optional_tuple)
    fsdp: bool = False
    fsdp_axis: str = "fsdp"

    @property
    def spmd(self) -> bool:
        """Whether one process drives all devices through a mesh (SPMD)."""
        return self.fsdp or self.mesh_shape is not None


_BY_NAME: dict[str, Callable[[], Any]] = {"single": Single, "ddp": DDP, "fsdp": FSDP,
                                          "deepspeed": DeepSpeed, "xla": XLA}


def resolve_strategy(strategy: str | Any | None, ctx: Context) -> Any:
    """A strategy config from a name, a config object, or None (DDP when distributed)."""
    if strategy is None:
        if ctx.device.type == "xla":  # replicas on XLA devices: torch_xla, not DDP
            return XLA()
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
        strategy: "single", "ddp", a config object (accel.DDP(...)), or None for XLA()
            on an XLA device, DDP when the world has several processes and a plain
            placement otherwise.

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
