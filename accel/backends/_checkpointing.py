"""Activation checkpointing of one module: its forward recomputed in backward.

Shared by `accel.checkpoint_activations` (any engine) and `accel.FSDP(
activation_checkpointing=True)`. The module's `forward` is replaced in place by a
`CheckpointedForward` (as `with_amp` does): parameter names stay the user's own, where
torch's `checkpoint_wrapper` would insert `_checkpoint_wrapped_module.` into every name
that optimizers, checkpoints and exports see. FSDP2 composes with it either way: its
hooks sit on the module, around the forward, and unshard the parameters for the
recomputation in backward.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

#: the ops whose outputs selective checkpointing keeps for backward; the outputs of every
#: other op (norms, activations, softmax, elementwise, casts) are recomputed. Matmuls and
#: attention are where the compute is, their outputs are what the rest is cheap to
#: recompute from (torchtitan's choice, here without its every-other-matmul thinning).
SAVED_OPS: tuple[str, ...] = (
    "mm", "addmm", "bmm", "baddbmm", "_scaled_mm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
)


@functools.cache
def _saved_ops() -> frozenset[Any]:
    # Resolved on first use: an op this torch build lacks is simply not in the set.
    return frozenset(getattr(torch.ops.aten, name).default for name in SAVED_OPS
                     if hasattr(torch.ops.aten, name))


def _save_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if op in _saved_ops():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_contexts() -> tuple[Any, Any]:
    """torch's selective checkpointing contexts for the `SAVED_OPS` policy."""
    return create_selective_checkpoint_contexts(_save_matmuls)


class CheckpointedForward:
    """A forward whose activations are recomputed in backward (torch.utils.checkpoint).

    selective: keep the outputs of `SAVED_OPS` and recompute the rest (op level), rather
    than recomputing the whole forward. offload: run under torch's `save_on_cpu`, so what
    the module still keeps for backward (its inputs, when nothing else is kept) waits
    on the CPU.
    """

    def __init__(self, forward: Callable[..., Any], *, selective: bool = False,
                 offload: bool = False):
        functools.update_wrapper(self, forward)
        self.forward = forward
        self.selective = selective
        self.offload = offload

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.offloading():
            return self.recompute(*args, **kwargs)

    def recompute(self, *args: Any, **kwargs: Any) -> Any:
        """The forward under torch.utils.checkpoint: what compile_model compiles (dynamo
        does not trace save_on_cpu's hooks, which therefore stay around the compiled code)."""
        if self.selective:
            return checkpoint(self.forward, *args, use_reentrant=False,
                              context_fn=selective_contexts, **kwargs)
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)

    def offloading(self) -> contextlib.AbstractContextManager[Any]:
        """save_on_cpu with offload=True, else nothing: entered around `recompute`."""
        if not self.offload:
            return contextlib.nullcontext()
        # Pinned pages make the copies back to an accelerator asynchronous; a CPU run has none.
        return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())


def is_checkpointed(module: nn.Module) -> bool:
    """Whether `module`'s forward already runs through a CheckpointedForward."""
    return isinstance(module.__dict__.get("forward"), CheckpointedForward)


def checkpoint_module(module: nn.Module, *, selective: bool = False,
                      offload: bool = False) -> None:
    """Make `module` recompute its activations in backward (in place: its `forward`)."""
    module.forward = CheckpointedForward(module.forward, selective=selective, offload=offload)
