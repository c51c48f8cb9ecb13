"""`checkpoint_activations`: recompute the activations of the model's blocks in backward.

One transform for every engine (single, DDP, FSDP2, tensor parallel): the blocks'
`forward` is replaced in place (accel.backends._checkpointing, which
`accel.FSDP(activation_checkpointing=True)` uses too), so parameter names never change.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from accel.backends._checkpointing import SAVED_OPS, checkpoint_module, is_checkpointed
from accel.context import Context
from accel.errors import IncompatibleOptionsError, TransformOrderError
from accel.transforms._blocks import BlockSpec, find_blocks
from accel.validation import check_bool, check_context, check_module, fail

POLICIES = ("full", "selective")


def checkpoint_activations(
    model: nn.Module, ctx: Context, *, policy: str | int = "full", offload: bool = False,
    blocks: BlockSpec = None,
) -> tuple[nn.Module, Context]:
    """Recompute the activations of the model's blocks in backward instead of keeping them.

    (in place) Each chosen block's `forward` becomes a `CheckpointedForward`
    (torch.utils.checkpoint, non-reentrant); `block.forward = block.forward.forward`
    undoes it. Names, parameters and results do not change: only what backward keeps.

    Args:
        policy: "full": each block keeps only its inputs and recomputes its whole forward
            in backward; "selective": op level (torch's selective checkpointing): the
            outputs of matmuls and attention (`accel.backends._checkpointing.SAVED_OPS`)
            are kept, everything else (norms, activations, elementwise) is recomputed;
            an int N: full recomputation of every N-th block (the 1st, N+1-th, ...), the
            others keep their activations.
        offload: keep what the checkpointed blocks still save for backward (with "full",
            their inputs) in CPU memory (torch's save_on_cpu); on a CPU device this
            changes nothing.
        blocks: the blocks: None for the entries of each nn.ModuleList of 2+ modules of
            one class (transformer layers), a class, a tuple of classes, or a function
            module -> bool.

    Apply it before compile_model (the compiled code includes the recomputation) and
    before shard_model (torchtitan's order: tensor_parallel, checkpoint_activations,
    compile_model, shard_model).

    Raises:
        TransformOrderError: applied twice, after compile_model or shard_model.
        IncompatibleOptionsError: no blocks, or transformers' own gradient
            checkpointing is on as well.

    >>> model, ctx = accel.checkpoint_activations(model, ctx, policy="selective")
    """
    _check_arguments(model, ctx, policy, offload)
    chosen = find_blocks("checkpoint_activations", model, blocks)
    if isinstance(policy, int):
        chosen = chosen[::policy]
    for block in chosen:
        checkpoint_module(block, selective=policy == "selective", offload=offload)
    detail = f"{policy!r}, {len(chosen)} blocks" + (", offload" if offload else "")
    return model, ctx.record(f"checkpoint_activations({detail})")


def _check_arguments(model: Any, ctx: Any, policy: Any, offload: Any) -> None:
    check_module("checkpoint_activations", "model", model)
    check_context("checkpoint_activations", ctx)
    every_n = isinstance(policy, int) and not isinstance(policy, bool) and policy >= 1
    if not (every_n or policy in POLICIES):
        fail("checkpoint_activations", "policy", policy,
             "'full', 'selective' or an int N >= 1 (every N-th block)",
             wrong_type=not isinstance(policy, (str, int)))
    check_bool("checkpoint_activations", "offload", offload)
    for later in ("compile_model", "shard_model"):
        if ctx.was_applied(later):
            raise TransformOrderError(
                f"checkpoint_activations must come before {later} (the compiled code and "
                "the engine are built around the blocks' forward); reorder: "
                "tensor_parallel, checkpoint_activations, compile_model, shard_model")
    if ctx.was_applied("checkpoint_activations") or any(
            is_checkpointed(module) for module in model.modules()):
        raise TransformOrderError(
            "checkpoint_activations was already applied to this model; apply it once")
    if _transformers_checkpointing(model):
        raise IncompatibleOptionsError(
            "accel.checkpoint_activations: transformers' own gradient checkpointing is on "
            "(model.gradient_checkpointing_enable()): every block would be recomputed twice; "
            "call model.gradient_checkpointing_disable() or keep only that")


def _transformers_checkpointing(model: nn.Module) -> bool:
    # transformers 5 renamed the property (the old name warns); older releases have one.
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


__all__ = ["POLICIES", "SAVED_OPS", "checkpoint_activations"]
