"""The optimizer side of a step: wrap_optimizer, wrap_scheduler, backward, gradient clipping.

The wrapped optimizer holds the per-step state a training loop needs and no Context can:
the fp16 gradient scaler, the accumulation counter, and whether the last `step()` really
changed the parameters (`step_was_skipped`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from accel.backends import _master_weights, backend_for
from accel.backends._optimizer import AccelOptimizer
from accel.context import Context
from accel.errors import IncompatibleOptionsError, TransformOrderError
from accel.launch_settings import without_unapplied_precision
from accel.validation import check_context, check_module, check_number, check_type, fail


def wrap_optimizer(
    optimizer: torch.optim.Optimizer, ctx: Context, *, scaler: Any = None
) -> tuple[AccelOptimizer, Context]:
    """Wrap an optimizer for the Context's precision and backend.

    Under fp16 it holds a `torch.amp.GradScaler` for ctx.device (pass `scaler` to choose
    its settings). Works whether the optimizer was built before or after `shard_model`.
    After `with_amp(..., params="bf16", master_weights=True)` it steps fp32 copies of the
    bf16 parameters (kept in its state, so checkpoints carry them; not with DTensors).

    (in place) Returns a new AccelOptimizer around yours, sharing its param groups and
    state. Under FSDP and XLA an optimizer built before shard_model is repointed where it
    is: its param groups and state move from the replaced parameters to the sharded (XLA)
    ones, and existing state is sharded like them. Under DeepSpeed the engine, built at
    the model's first forward, replaces its param groups by flat partitions.

    >>> optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters()), ctx)
    """
    if isinstance(optimizer, AccelOptimizer):
        raise TransformOrderError(
            "wrap_optimizer was already applied to this optimizer; use it as it is"
        )
    check_type("wrap_optimizer", "optimizer", optimizer, torch.optim.Optimizer,
               "a torch.optim.Optimizer built over the model's parameters")
    check_context("wrap_optimizer", ctx)
    check_type("wrap_optimizer", "scaler", scaler, torch.amp.GradScaler,
               "a torch.amp.GradScaler (or None)", optional=True)
    ctx = without_unapplied_precision(ctx, "wrap_optimizer")
    if ctx.precision == "fp16" and scaler is None:
        scaler = torch.amp.GradScaler(ctx.device.type)
    elif ctx.precision != "fp16" and scaler is not None:
        raise IncompatibleOptionsError(
            f"a gradient scaler is for fp16, but the Context's precision is {ctx.precision!r}; "
            "apply with_amp(model, ctx, dtype='fp16') first or drop the scaler"
        )
    if ctx.context_parallel and not ctx.was_applied("shard_model"):
        raise TransformOrderError(
            "under accel.context_parallel each cp rank holds part of every sequence's "
            "gradient: apply shard_model(model, ctx, strategy=accel.FSDP()) before "
            "wrap_optimizer, so the parts are summed")
    wrapped = backend_for(ctx).wrap_optimizer(AccelOptimizer(optimizer, scaler), ctx)
    if _master_weights.wanted(ctx):  # with_amp(params="bf16", master_weights=True)
        _master_weights.attach(wrapped)
    return wrapped, ctx.record(f"wrap_optimizer({type(optimizer).__name__})")


class AccelScheduler:
    """An LR scheduler that steps exactly once per real optimizer step."""

    def __init__(self, scheduler: Any, optimizer: AccelOptimizer):
        self.scheduler = scheduler
        self.optimizer = optimizer
        self._seen_steps = optimizer.real_steps

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Advance the schedule if the optimizer updated the parameters since the last call."""
        if self.optimizer.real_steps == self._seen_steps:
            return
        self._seen_steps = self.optimizer.real_steps
        self.scheduler.step(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)
        self._seen_steps = self.optimizer.real_steps

    def __getattr__(self, name: str) -> Any:
        if name == "scheduler":
            raise AttributeError(name)
        return getattr(self.scheduler, name)


def wrap_scheduler(scheduler: Any, ctx: Context, optimizer: AccelOptimizer) -> tuple[Any, Context]:
    """Make `scheduler.step()` advance once per real optimizer step.

    Schedules count optimizer updates: not micro-steps of gradient accumulation, not
    steps skipped on an fp16 overflow, and not processes (every rank steps its own copy
    of the same schedule once). Size a schedule in optimizer steps:
    ``len(loader) // grad_accum_steps * epochs``.

    >>> scheduler, ctx = accel.wrap_scheduler(scheduler, ctx, optimizer)
    """
    check_context("wrap_scheduler", ctx)
    if not isinstance(optimizer, AccelOptimizer):
        raise TransformOrderError(
            "wrap_scheduler needs the optimizer returned by wrap_optimizer: apply "
            "wrap_optimizer first and pass its result"
        )
    if isinstance(scheduler, AccelScheduler):
        raise TransformOrderError(
            "wrap_scheduler was already applied to this scheduler; use it as it is"
        )
    # Duck-typed: DeepSpeed's and transformers' schedules are no torch LRScheduler.
    if not (callable(getattr(scheduler, "step", None))
            and callable(getattr(scheduler, "state_dict", None))):
        fail("wrap_scheduler", "scheduler", scheduler,
             "a learning-rate scheduler (torch.optim.lr_scheduler.*, with step and state_dict)")
    own = getattr(scheduler, "optimizer", None)
    if own is not None and own is not optimizer and own is not optimizer.optimizer:
        raise IncompatibleOptionsError(
            "the scheduler was built for a different optimizer than the one passed to "
            "wrap_scheduler; pass the optimizer whose learning rate it schedules"
        )
    return AccelScheduler(scheduler, optimizer), ctx.record(
        f"wrap_scheduler({type(scheduler).__name__})"
    )


def backward(loss: torch.Tensor, optimizer: AccelOptimizer, ctx: Context, **kwargs: Any) -> None:
    """Backpropagate `loss`: divided for gradient accumulation, scaled for fp16.

    >>> accel.backward(loss, optimizer, ctx)
    """
    # Every step: two isinstance checks and the one of _require_wrapped.
    check_type("backward", "loss", loss, torch.Tensor, "a torch.Tensor (the loss)")
    check_context("backward", ctx)
    _require_wrapped(optimizer, "backward")
    if optimizer.accumulation is not None and optimizer.accumulation.steps > 1:
        loss = loss / optimizer.accumulation.steps
    if ctx.loss_parallel:  # the loss came from vocabulary-sharded logits
        from accel.transforms.tensor_parallel import loss_parallel

        with loss_parallel(ctx):
            backend_for(ctx).backward(loss, optimizer, **kwargs)
        return
    backend_for(ctx).backward(loss, optimizer, **kwargs)


def clip_grad_norm(
    model: nn.Module, ctx: Context, max_norm: float, *, norm_type: float = 2.0,
    optimizer: AccelOptimizer | None = None,
) -> torch.Tensor | None:
    """Clip gradients to a total norm of `max_norm`; return the norm before clipping.

    With fp16 or gradient accumulation pass `optimizer`: fp16 gradients are unscaled
    first, and in the middle of an accumulation cycle nothing is clipped (None is
    returned) since the gradients are still partial sums.

    >>> norm = accel.clip_grad_norm(model, ctx, 1.0, optimizer=optimizer)
    """
    _check_clip("clip_grad_norm", model, ctx, "max_norm", max_norm)
    # torch's norms: any p > 0, or float("inf") for the largest element.
    check_number("clip_grad_norm", "norm_type", norm_type, above=0, finite=False)
    if not _ready_to_clip(ctx, optimizer, "clip_grad_norm"):
        return None
    return backend_for(ctx).clip_grad_norm(model, max_norm, norm_type)


def clip_grad_value(
    model: nn.Module, ctx: Context, clip_value: float, *, optimizer: AccelOptimizer | None = None
) -> None:
    """Clamp every gradient element to [-clip_value, clip_value] (see clip_grad_norm)."""
    _check_clip("clip_grad_value", model, ctx, "clip_value", clip_value)
    if _ready_to_clip(ctx, optimizer, "clip_grad_value"):
        backend_for(ctx).clip_grad_value(model, clip_value)


def _check_clip(function: str, model: Any, ctx: Any, name: str, bound: Any) -> None:
    # A bound <= 0 zeroes every gradient and nan poisons them: mistakes. inf clips nothing
    # and is how a loop measures the gradient norm without clipping: allowed.
    check_module(function, "model", model)
    check_context(function, ctx)
    check_number(function, name, bound, above=0, finite=False)


def _ready_to_clip(ctx: Context, optimizer: AccelOptimizer | None, name: str) -> bool:
    if optimizer is None:
        if ctx.precision == "fp16" or ctx.grad_accum_steps > 1:
            raise IncompatibleOptionsError(
                f"{name} under fp16 or gradient accumulation needs the wrapped optimizer "
                f"(it holds the loss scale and the micro-step): {name}(model, ctx, ..., "
                "optimizer=optimizer)"
            )
        return True
    _require_wrapped(optimizer, name)
    if not optimizer.sync_gradients:
        return False
    optimizer.unscale_gradients()
    return True


def _require_wrapped(optimizer: Any, name: str) -> None:
    if isinstance(optimizer, AccelOptimizer):
        return
    if not isinstance(optimizer, torch.optim.Optimizer):  # not a step left out: a wrong object
        fail(name, "optimizer", optimizer, "the optimizer returned by accel.wrap_optimizer")
    raise TransformOrderError(
        f"{name} needs the optimizer returned by accel.wrap_optimizer, got "
        f"{type(optimizer).__name__}; wrap it first"
    )
