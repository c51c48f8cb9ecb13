"""DeepSpeed ZeRO (stages 1-3, CPU offload) behind the same transforms and loop as DDP.

DeepSpeed couples model and optimizer in one engine; accel's transforms take them one
at a time. How they meet, in the terms of DESIGN.md:

- `shard_model(model, ctx, strategy=accel.DeepSpeed(...))` checks what it can already
  (process group, stage, offload, precision against the user's config) and returns a
  `DeepSpeedModel`: the user's module, same parameter names, with the engine behind
  its forward. Each parameter keeps a weak link to it (no registry, no global).
- `wrap_optimizer` follows that link from the optimizer's parameters to the model and
  returns a `DeepSpeedOptimizer`, an AccelOptimizer bound to the model.
- The engine (`deepspeed.initialize(model, optimizer, config)`) is built once, at the
  model's first forward, when everything it needs is known: precision (with_amp, in the
  Context), accumulation steps and loader (accumulate_grads, on the optimizer), batch
  size (that loader, else the first batch). A model with no optimizer gets an inference
  engine. Each model has its own engine: any number live side by side.
- The loop does not change: `accel.backward` divides the loss for accumulation (the
  engine is told not to: ``scale_wrt_gas=False``) and calls `engine.backward`, which
  scales fp16 losses; accel's accumulation counter decides the boundary and tells the
  engine at each forward (`set_gradient_accumulation_boundary`), so DeepSpeed reduces
  and steps exactly where accel's optimizer does; `optimizer.step()` is `engine.step()`;
  `accel.clip_grad_norm` sets the engine's `gradient_clipping` (DeepSpeed clips the
  partitioned fp32 gradients inside its step) and returns the norm DeepSpeed computes.
- Precision: ctx.precision selects DeepSpeed's bf16/fp16 mode (16-bit parameters, fp32
  master weights in the optimizer). with_amp's autocast stays on the forward: on
  16-bit weights it changes no arithmetic and casts fp32 inputs from the loader, so the
  loop needs no `.half()`; its fp32 outputs keep the loss in fp32.

DeepSpeed-specific hooks beyond the protocol: `save_checkpoint`, `load_checkpoint`
(its sharded checkpoint directories), `save_fp32_weights`, `checkpoint_to_fp32`
(consolidated fp32 weights as safetensors), `deepspeed_init` (ZeRO-3 zero.Init).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from accel.backends import collect_engine_cycles_at_exit
from accel.backends._optimizer import AccelOptimizer
from accel.backends.deepspeed.checkpoint import (
    checkpoint_to_fp32,
    load_checkpoint,
    save_checkpoint,
    save_fp32_weights,
)
from accel.backends.deepspeed.config import DeepSpeed, explicit_clipping
from accel.backends.deepspeed.engine import (
    DeepSpeedModel,
    DeepSpeedOptimizer,
    deepspeed_init,
    link_optimizer,
    wrap,
)
from accel.backends.deepspeed.full_state import (
    get_full_model_state,
    get_full_optimizer_state,
    set_full_model_state,
    set_full_optimizer_state,
)
from accel.context import Context
from accel.errors import IncompatibleOptionsError, TransformOrderError, UnsupportedError

#: the strategy this engine implements (`accel.DeepSpeed`).
STRATEGY = DeepSpeed

__all__ = [
    "STRATEGY", "DeepSpeed", "DeepSpeedModel", "DeepSpeedOptimizer", "backward",
    "checkpoint_to_fp32", "clip_grad_norm",
    "deepspeed_init", "get_state_dict", "join", "load_checkpoint", "save_checkpoint",
    "save_fp32_weights", "set_grad_sync", "set_state_dict", "unwrap_model", "wrap_model",
    "wrap_optimizer",
]


def wrap_model(model: nn.Module, ctx: Context, strategy: Any) -> nn.Module:
    collect_engine_cycles_at_exit()
    return wrap(model, ctx, strategy)


def unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DeepSpeedModel) else model


def wrap_optimizer(optimizer: AccelOptimizer, ctx: Context) -> AccelOptimizer:
    return link_optimizer(optimizer)


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Whether the next forward's backward ends an accumulation cycle (applied at forward)."""
    model = _require_model(model, "switching DeepSpeed's gradient sync")
    accumulation = model.optimizer.accumulation if model.optimizer is not None else None
    # accumulate_grads switches sync off only when it counts more than one micro-batch.
    if not enabled and (accumulation is None or accumulation.steps == 1):
        raise UnsupportedError(
            "DeepSpeed accumulates gradients only through accel.accumulate_grads (the count is "
            "part of its config), and ZeRO's partitioned optimizer cannot let ranks train "
            "apart (local SGD); use accumulate_grads(model, optimizer, ctx, steps=k)"
        )
    model.grad_sync = enabled


def backward(loss: torch.Tensor, optimizer: AccelOptimizer, **kwargs: Any) -> None:
    engine = _require_optimizer(optimizer, "accel.backward").engine("accel.backward")
    unknown = sorted(set(kwargs) - {"retain_graph"})
    if unknown:
        raise IncompatibleOptionsError(
            f"DeepSpeed's backward takes retain_graph only, not {unknown}"
        )
    # accel.backward already divided the loss for accumulation: the engine must not again.
    engine.backward(loss, scale_wrt_gas=False, **kwargs)


def clip_grad_norm(model: nn.Module, max_norm: float, norm_type: float) -> torch.Tensor:
    """Have the engine's step clip at `max_norm`; return the current total gradient norm."""
    model = _require_model(model, "clip_grad_norm")
    if float(norm_type) != 2.0:
        raise UnsupportedError(f"DeepSpeed clips by the L2 norm only; use norm_type=2.0, "
                               f"not {norm_type}")
    if model.optimizer is None:
        raise TransformOrderError("clip_grad_norm needs the model's optimizer: wrap_optimizer")
    engine = model.optimizer.engine("clip_grad_norm")
    configured = explicit_clipping(model.user_config)
    if configured is not None and configured != float(max_norm):
        raise IncompatibleOptionsError(
            f"the DeepSpeed config sets gradient_clipping={configured}, but clip_grad_norm "
            f"asks for max_norm={max_norm}; remove gradient_clipping from the config (accel "
            "fills it in) or pass the same value"
        )
    # DeepSpeed reads the threshold at step time from these two (set at construction).
    engine._config.gradient_clipping = float(max_norm)
    engine.optimizer.clip_grad = float(max_norm)
    return _total_norm(engine.optimizer)


def _total_norm(zero_optimizer: Any) -> torch.Tensor:
    """The global L2 norm of the reduced, partitioned gradients, as the step computes it."""
    if hasattr(zero_optimizer, "scaled_global_norm"):  # ZeRO 1 and 2
        scaled = torch.as_tensor(zero_optimizer.scaled_global_norm(), dtype=torch.float32)
    else:  # ZeRO 3: one norm per sub-group; DeepSpeed marks inf/nan ones with -1
        groups = torch.stack([torch.as_tensor(norm, dtype=torch.float32)
                              for norm in zero_optimizer._get_norm_groups()])
        scaled = (groups.new_tensor(float("inf")) if bool((groups < 0).any())
                  else torch.linalg.vector_norm(groups))
    return (scaled / zero_optimizer.loss_scale).detach()


def clip_grad_value(model: nn.Module, clip_value: float) -> None:
    raise UnsupportedError(
        "DeepSpeed keeps gradients in its own partitions and clips by norm only; use "
        "accel.clip_grad_norm(model, ctx, max_norm, optimizer=optimizer)"
    )




def join(model: nn.Module) -> Any:
    raise UnsupportedError(
        "DeepSpeed has no join for uneven inputs; keep distribute_loader's even_batches=True "
        "(every rank gets the same number of batches)"
    )


def get_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, *, full: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Full only: fp32 master weights and optimizer state keyed by parameter name.

    DeepSpeed's sharded form is its checkpoint directory (`save_checkpoint`).
    """
    model = _require_model(model, "get_state_dict")
    _require_full(full, "get_state_dict", "save_checkpoint(model, optimizer, directory)")
    names = _names(model)
    model_state = get_full_model_state(model)
    optimizer_state = None
    if optimizer is not None:
        optimizer = _require_optimizer(optimizer, "get_state_dict")
        optimizer_state = get_full_optimizer_state(optimizer, key_of=lambda p: names[id(p)])
    if dist.get_rank() != 0:  # gathered on every rank; kept on rank 0 as the protocol says
        return {}, ({} if optimizer is not None else None)
    return model_state, optimizer_state


def set_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer | None,
    model_state: dict[str, Any], optimizer_state: dict[str, Any] | None, *, full: bool,
) -> None:
    """Load full state dicts; rank 0's are broadcast (the others may pass {})."""
    model = _require_model(model, "set_state_dict")
    _require_full(full, "set_state_dict", "load_checkpoint(model, optimizer, directory)")
    if (optimizer is None) != (optimizer_state is None):
        raise IncompatibleOptionsError(
            "pass both optimizer and optimizer_state, or neither (to load the model only)"
        )
    shared = [model_state, optimizer_state]
    dist.broadcast_object_list(shared, src=0)
    set_full_model_state(model, shared[0])
    if optimizer is not None:
        names = _names(model)
        optimizer = _require_optimizer(optimizer, "set_state_dict")
        set_full_optimizer_state(optimizer, shared[1], key_of=lambda p: names[id(p)])


def _names(model: DeepSpeedModel) -> dict[int, str]:
    return {id(p): name for name, p in model.module.named_parameters()}


def _require_full(full: bool, name: str, instead: str) -> None:
    if not full:
        raise UnsupportedError(
            f"{name}(full=False): DeepSpeed's sharded state is its checkpoint directory; use "
            f"accel.backends.deepspeed.{instead}, or full=True"
        )


def _require_model(model: nn.Module, purpose: str) -> DeepSpeedModel:
    if not isinstance(model, DeepSpeedModel):
        raise IncompatibleOptionsError(
            f"{purpose} needs the model shard_model returned, got a {type(model).__name__}; "
            "pass that model, not accel.unwrap_model(model, ctx)"
        )
    return model


def _require_optimizer(optimizer: Any, purpose: str) -> DeepSpeedOptimizer:
    if not isinstance(optimizer, DeepSpeedOptimizer):
        raise TransformOrderError(
            f"{purpose} needs the optimizer wrap_optimizer returned under the DeepSpeed "
            f"strategy, got {type(optimizer).__name__}"
        )
    return optimizer
