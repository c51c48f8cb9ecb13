"""FSDP2 (torch's `fully_shard`): parameters, gradients and optimizer state sharded.

Each shard unit (by default the repeated blocks of the model) is one all-gather before
its forward and one reduce-scatter after its backward; the root unit holds the rest.
`fully_shard` turns parameters into DTensors in place: names do not change and the
model stays the user's own module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.weak import WeakIdKeyDictionary

from accel.backends import (
    COLLECTIVE_BACKWARD,
    CONTEXT_PARALLEL,
    SHARDED_CHECKPOINT,
    BuiltinStrategy,
    _float8,
    collect_engine_cycles_at_exit,
    single,
)
from accel.backends import _state as state
from accel.backends._checkpointing import (  # noqa: F401  (CheckpointedForward: public here)
    CheckpointedForward,
    checkpoint_module,
    is_checkpointed,
)
from accel.backends._fsdp_mesh import fsdp_mesh, sum_over_cp
from accel.backends._fsdp_sync import follow_forwards as _follow_forwards
from accel.context import Context
from accel.errors import IncompatibleOptionsError, InvalidOptionError, UnsupportedError
from accel.launch_settings import Setting
from accel.validation import (
    check_bool,
    check_callable,
    check_int,
    check_type,
    option_validator,
    shown,
)

# Clipping by the norm of all gradient shards together: the norm of the whole model.
clip_grad_norm = state.clip_grad_norm
# Loss scaling is the single-process one: GradScaler's inf check on DTensor gradients is
# all-reduced by DTensor itself (found_inf_reduce_handler), so every rank skips together.
backward = single.backward
# Element-wise clamping needs no communication: each rank clamps its own gradient shards.
clip_grad_value = single.clip_grad_value
# torch's state-dict functions gather or keep the DTensor shards (full=True / False).
get_state_dict = state.get_state_dict
set_state_dict = state.set_state_dict

#: parameter dtype FSDP2 gathers for the forward, per ctx.precision (fp8: torchao's
#: Float8Linear casts for itself, autocast lowers the rest, so shards stay fp32).
_PARAM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _to_shard_units(value: Any) -> Any:
    """One module class, or a list or set of them, as a tuple (frozen configs hash)."""
    if isinstance(value, type):
        return (value,)
    if isinstance(value, (list, set, frozenset)):
        return tuple(value)
    return value


def _check_shard_units(instance: Any, attribute: Any, spec: Any) -> None:
    """What select_shard_units understands: classes, a count, a predicate, or None."""
    if spec is None or (callable(spec) and not isinstance(spec, type)):
        return
    if isinstance(spec, int) and not isinstance(spec, bool) and spec >= 1:
        return
    if isinstance(spec, tuple) and spec and all(
            isinstance(cls, type) and issubclass(cls, nn.Module) for cls in spec):
        return
    raise InvalidOptionError(
        f"accel.FSDP: shard_units={shown(spec)} is not understood; shard_units must be "
        "module classes, a parameter count >= 1, a function module -> bool, or None for "
        "the repeated blocks")


def _check_reshard(instance: Any, attribute: Any, value: Any) -> None:
    # torch's fully_shard: a bool, or an int (the smaller world to reshard to).
    if value is None or isinstance(value, bool) or (isinstance(value, int) and value >= 1):
        return
    raise InvalidOptionError(
        f"accel.FSDP: reshard_after_forward must be True, False, None (torch's choice) or "
        f"an int >= 1 (reshard to that many ranks), got {shown(value)}")


@attrs.frozen
class FSDP(BuiltinStrategy):
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
        keep_meta: leave a model built on the meta device unallocated: its shards stay
            on meta (nothing initialised or sent) until `accel.load_pretrained` fills
            each rank's slices from a checkpoint.

    >>> model, ctx = accel.shard_model(model, ctx, strategy=accel.FSDP(shard_units=Block))
    """

    capabilities = frozenset({COLLECTIVE_BACKWARD, SHARDED_CHECKPOINT, CONTEXT_PARALLEL})
    #: the options `accel config` asks and `accel launch` passes (`[fsdp]` in a config file).
    settings = (
        Setting("fsdp_reshard_after_forward", bool, None, "free gathered parameters after "
                "forward", training=True, section="fsdp",
                question="FSDP: free gathered parameters after forward", ask_default=True),
        Setting("fsdp_cpu_offload", bool, None, "shards, gradients and optimizer state on "
                "the CPU", training=True, section="fsdp", question="FSDP: offload "
                "parameters, gradients and optimizer state to the CPU", ask_default=False),
        Setting("fsdp_activation_checkpointing", bool, None, "recompute activations in "
                "backward", training=True, section="fsdp", question="FSDP: activation "
                "checkpointing (recompute activations in backward)", ask_default=False),
    )
    shard_units: (tuple[type[nn.Module], ...] | int | Callable[[nn.Module], bool] | None) = (
        attrs.field(default=None, converter=_to_shard_units, validator=_check_shard_units))
    reshard_after_forward: bool | int | None = attrs.field(default=None,
                                                           validator=_check_reshard)
    mixed_precision: MixedPrecisionPolicy | None = attrs.field(
        default=None, validator=option_validator(
            "FSDP", check_type, MixedPrecisionPolicy,
            "None or a torch.distributed.fsdp.MixedPrecisionPolicy", optional=True))
    cpu_offload: bool | OffloadPolicy = attrs.field(
        default=False, validator=option_validator(
            "FSDP", check_type, (bool, OffloadPolicy), "True, False or a torch CPUOffloadPolicy"))
    activation_checkpointing: bool = attrs.field(
        default=False, validator=option_validator("FSDP", check_bool))
    replicate_degree: int | None = attrs.field(
        default=None, validator=option_validator("FSDP", check_int, minimum=1, optional=True))
    mesh: DeviceMesh | None = attrs.field(
        default=None, validator=option_validator(
            "FSDP", check_type, DeviceMesh, "a torch DeviceMesh (1-D FSDP, 2-D HSDP)",
            optional=True))
    init_fn: Callable[[nn.Module], None] | None = attrs.field(
        default=None, validator=option_validator(
            "FSDP", check_callable, "a function of one module", optional=True))
    keep_meta: bool = attrs.field(default=False, validator=option_validator("FSDP", check_bool))

    @classmethod
    def from_settings(cls, settings: Any) -> FSDP:
        """FSDP with the fsdp_* options of `accel launch` / `accel config`."""
        return cls(reshard_after_forward=settings.fsdp_reshard_after_forward,
                   cpu_offload=bool(settings.fsdp_cpu_offload),
                   activation_checkpointing=bool(settings.fsdp_activation_checkpointing))


STRATEGY = FSDP


def wrap_model(model: nn.Module, ctx: Context, strategy: Any) -> nn.Module:
    """Shard every unit, then the root; a meta-device model is allocated unit by unit."""
    _check_process_group(ctx)
    units = select_shard_units(model, strategy.shard_units)
    on_meta = not strategy.keep_meta and any(t.is_meta for t in _tensors(model, recurse=True))
    if on_meta:
        _check_initialisable(model, strategy.init_fn)
    options: dict[str, Any] = dict(
        mesh=fsdp_mesh(ctx, strategy), mp_policy=_mixed_precision(strategy, ctx),
        offload_policy=_offload_policy(strategy, ctx),
    )
    if strategy.reshard_after_forward is not None:
        options["reshard_after_forward"] = strategy.reshard_after_forward
    if strategy.activation_checkpointing:
        _checkpoint_activations(units)
    for unit in (*units, model):  # innermost first: fully_shard groups what is left
        slots = _parameter_slots(unit)
        if on_meta:
            _materialise(unit, ctx.device, strategy.init_fn)
        # fully_shard keeps each rank's own slice: ranks initialised differently would
        # train a model stitched from several, and HSDP replicas would never agree.
        state.sync_from_rank0(unit, ctx)
        fully_shard(unit, **options)
        sum_over_cp(unit, ctx)
        _link_sharded_parameters(slots)
    collect_engine_cycles_at_exit()
    _follow_forwards(model)  # from the first forward on, so no_sync's rule always holds
    _float8.remember_fsdp_root(model)  # float8 all-gather: scales precomputed per step
    return model


def select_shard_units(model: nn.Module, spec: Any) -> list[nn.Module]:
    """The modules to shard before the root, innermost first (the order fully_shard needs).

    `spec` is an FSDP config's shard_units, which `_check_shard_units` let through.
    """
    if spec is None:
        units = _repeated_blocks(model)
    elif isinstance(spec, int):
        units = _by_parameter_count(model, spec)
    elif isinstance(spec, tuple):
        units = _matching(model, lambda module: isinstance(module, spec), spec)
    else:
        units = _matching(model, spec, spec)
    position = {id(module): index for index, module in enumerate(model.modules())}
    unique = {id(unit): unit for unit in units if _has_parameters(unit)}
    return sorted(unique.values(), key=lambda unit: -position[id(unit)])


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The entries of every nn.ModuleList of 2+ modules of one class: transformer layers."""
    units: list[nn.Module] = []
    inside: set[int] = set()  # modules within a chosen block: no units nested in units
    for module in model.modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList):
            continue
        blocks = list(module)
        if (len(blocks) >= 2 and len({type(block) for block in blocks}) == 1
                and all(_has_parameters(block) for block in blocks)):
            units.extend(blocks)
            inside.update(id(sub) for block in blocks for sub in block.modules())
    return units


def _by_parameter_count(model: nn.Module, threshold: int) -> list[nn.Module]:
    """The smallest modules holding `threshold`+ parameters not already in a unit."""
    units: list[nn.Module] = []

    def remaining(module: nn.Module) -> int:
        count = sum(param.numel() for param in module.parameters(recurse=False))
        count += sum(remaining(child) for child in module.children())
        if module is not model and count >= threshold:
            units.append(module)
            return 0
        return count

    remaining(model)
    return units


def _matching(model: nn.Module, predicate: Callable[[nn.Module], bool], spec: Any) -> list:
    units = [module for module in model.modules() if module is not model and predicate(module)]
    if not units:
        raise IncompatibleOptionsError(
            f"FSDP(shard_units={spec!r}) matches no module below the root of this "
            f"{type(model).__name__}; check the classes or the function"
        )
    return units


def _check_process_group(ctx: Context) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise IncompatibleOptionsError(
            "strategy FSDP needs a started process group: launch with `accel launch -n 2 "
            "script.py` and use accel.init(); for one process start a group of size 1 "
            "(torch.distributed.init_process_group) and use accel.Context.from_process_group()"
        )


def _mixed_precision(strategy: Any, ctx: Context) -> MixedPrecisionPolicy:
    policy = strategy.mixed_precision
    if policy is not None:  # the config checked its type
        return policy
    dtype = _PARAM_DTYPES.get(ctx.precision)
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def _offload_policy(strategy: Any, ctx: Context) -> OffloadPolicy:
    offload = strategy.cpu_offload
    if isinstance(offload, OffloadPolicy):
        return offload
    if offload:  # True or False: the config checked
        # Pinned pages speed up copies to an accelerator; without one pinning fails.
        return CPUOffloadPolicy(pin_memory=ctx.device.type != "cpu")
    return OffloadPolicy()


def _checkpoint_activations(units: list[nn.Module]) -> None:
    if not units:
        raise IncompatibleOptionsError(
            "FSDP(activation_checkpointing=True) checkpoints the shard units, but this model "
            "has none below the root; name them with FSDP(shard_units=YourBlock)"
        )
    for unit in units:  # units accel.checkpoint_activations already wrapped stay as they are
        if not is_checkpointed(unit):
            checkpoint_module(unit)


def _tensors(module: nn.Module, recurse: bool) -> Iterator[torch.Tensor]:
    yield from module.parameters(recurse=recurse)
    yield from module.buffers(recurse=recurse)


def _holds_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in _tensors(module, recurse=False))


def _check_initialisable(model: nn.Module, init_fn: Any) -> None:
    if init_fn is not None:  # a function: the config checked
        return
    lacking = [name or type(model).__name__ for name, module in model.named_modules()
               if _holds_meta(module) and not callable(getattr(module, "reset_parameters", None))]
    if lacking:
        raise IncompatibleOptionsError(
            f"the model is on the meta device, but {lacking[:3]} hold parameters or buffers "
            "and have no reset_parameters(): pass FSDP(init_fn=fn), fn(module) initialising "
            "the module's own tensors, or FSDP(keep_meta=True) and accel.load_pretrained"
        )


def _materialise(unit: nn.Module, device: torch.device, init_fn: Any) -> None:
    """Allocate the unit's meta tensors on `device` and initialise them, ties kept.

    Runs just before the unit is sharded (then rank 0's values are broadcast), so shards
    are slices of one initialised model and no rank ever holds more than one unsharded
    unit beside its shards.
    """
    owners = [module for module in unit.modules() if _holds_meta(module)]
    allocated: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def allocate(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in allocated:
            real = torch.empty_like(tensor, device=device)
            if isinstance(tensor, nn.Parameter):
                real = nn.Parameter(real, requires_grad=tensor.requires_grad)
            allocated[id(tensor)] = (tensor, real)  # the meta tensor is kept: ids stay unique
        return allocated[id(tensor)][1]

    for module in owners:
        for name, tensor in [*module.named_parameters(recurse=False),
                             *module.named_buffers(recurse=False)]:
            if tensor.is_meta:
                setattr(module, name, allocate(tensor))
    with torch.no_grad():
        for module in owners:
            init_fn(module) if init_fn is not None else module.reset_parameters()


def _parameter_slots(unit: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """Where the parameters that sharding `unit` will replace are registered."""
    return [(module, name, param) for module in unit.modules()
            for name, param in module.named_parameters(recurse=False)
            if not isinstance(param, DTensor)]


#: replaced parameter -> its sharded successor, for `wrap_optimizer` (an optimizer built
#: before shard_model). Weak: an entry lives as long as something (that optimizer) still
#: holds the old parameter; by identity, as Tensor.__eq__ is elementwise.
_SHARDED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _link_sharded_parameters(slots: list[tuple[nn.Module, str, nn.Parameter]]) -> None:
    """Record each replaced parameter's sharded successor, for `wrap_optimizer`.

    Unit by unit, so that no list holds the unsharded parameters of the whole model.
    """
    for module, name, original in slots:
        sharded = getattr(module, name)
        if sharded is not original:
            _SHARDED[original] = sharded


def unwrap_model(model: nn.Module) -> nn.Module:
    return model


def wrap_optimizer(optimizer: Any, ctx: Context) -> Any:
    """Point an optimizer built before shard_model at the sharded parameters.

    State the optimizer already has (it stepped before sharding) is sharded the same way
    as its parameter; an optimizer built after shard_model is left as it is.
    """
    for group in optimizer.param_groups:
        group["params"] = [_SHARDED.get(param, param) for param in group["params"]]
    state = optimizer.state
    for old in [param for param in state if param in _SHARDED]:
        new = _SHARDED[old]
        state[new] = {key: _shard_like(value, new) for key, value in state.pop(old).items()}
    _float8.precompute_after_steps(optimizer)
    return optimizer


def _shard_like(value: Any, param: DTensor) -> Any:
    if not isinstance(value, torch.Tensor) or isinstance(value, DTensor):
        return value
    if value.shape != param.shape:  # step counters and other scalars
        return value
    # Every rank holds the same full tensor: each keeps its own slice, nothing is sent.
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                             src_data_rank=None)


def _require_fsdp(model: nn.Module, purpose: str) -> None:
    if not isinstance(model, FSDPModule):
        raise IncompatibleOptionsError(
            f"{purpose} needs the model shard_model(strategy=FSDP) returned, got a "
            f"{type(model).__name__} that fully_shard did not touch"
        )


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Whether the backward passes of the forwards that follow reduce-scatter their gradients.

    FSDP2 reads its own switch during backward, so accel does not set it here: each
    graph's outputs carry the value of their forward and set it as their backward starts.
    A graph built inside no_sync then stays local (its unsharded gradients accumulate)
    and one built outside is reduced, whichever order the backward passes run in.
    """
    _require_fsdp(model, "switching FSDP's gradient sync")
    _follow_forwards(model).sync = enabled


def join(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    raise UnsupportedError(
        "FSDP2 has no Join support for uneven inputs: keep distribute_loader's default "
        "even_batches=True, which gives every rank the same number of batches"
    )
