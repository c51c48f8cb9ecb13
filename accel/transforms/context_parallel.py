"""`context_parallel`: split every sequence over the `cp` dimension of the mesh.

Long sequences do not fit one device's activations; with context parallelism each rank
of the `cp` dimension holds a slice of every sequence and attention runs as ring
attention (accel.transforms.ring_attention). `distribute_loader` cuts the batches
(accel.data.sequence), and FSDP shards over `dp_shard x cp` and sums the cp ranks'
gradients, which are parts of one sequence's gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from accel.context import Context
from accel.errors import IncompatibleOptionsError, TransformOrderError, UnsupportedError
from accel.transforms.ring_attention import ring_attention
from accel.validation import check_context, check_module

#: the prefix of the attention implementation registered with transformers per cp group.
IMPLEMENTATION = "accel_ring"


def context_parallel(model: nn.Module, ctx: Context) -> tuple[nn.Module, Context]:
    """Run the model's attention as ring attention over the mesh's `cp` dimension (in place).

    (in place) The transformers model's attention implementation becomes accel's ring
    attention (`model.config._attn_implementation`), which takes causal attention over
    sequences split across the cp ranks. After it, `distribute_loader` gives each cp rank
    its slice of every sequence (dict batches, transformers-style: `input_ids`, `labels`;
    `position_ids` are added and stay global, labels are shifted before the cut and
    `num_items_in_batch` counts the whole batch's tokens), and `shard_model` with FSDP
    shards over `dp_shard x cp`. The loss a rank computes is its part of the batch's
    loss; reduce it with `accel.reduce(loss, ctx, op="sum", ranks="all")` over cp to log.
    Runs on CPU (gloo) and CUDA. Apply before `shard_model` and `wrap_optimizer`.

    Raises:
        IncompatibleOptionsError: no `cp` dimension of 2 or more in the mesh.
        UnsupportedError: not a transformers model with causal attention.
        TransformOrderError: after shard_model or wrap_optimizer, or applied twice.

    >>> ctx = accel.init(mesh={"dp_shard": 2, "cp": 2})
    >>> model, ctx = accel.context_parallel(model, ctx)
    >>> model, ctx = accel.shard_model(model, ctx, strategy=accel.FSDP())
    >>> loader, ctx = accel.distribute_loader(loader, ctx)     # sequences split over cp
    """
    check_module("context_parallel", "model", model)
    check_context("context_parallel", ctx)
    _check_order(ctx)
    config = _causal_lm_config(model)
    group = ctx.mesh["cp"].get_group()
    name = f"{IMPLEMENTATION}_{group.group_name}"
    _register(name, group)
    config._attn_implementation = name
    return model, ctx.record(f"context_parallel(cp={ctx.cp_size})", context_parallel=True)


def _check_order(ctx: Context) -> None:
    if ctx.cp_size < 2:
        raise IncompatibleOptionsError(
            f"context_parallel needs a 'cp' dimension of 2 or more in the mesh, but the "
            f"Context's mesh is {ctx.layout}; start with accel.init(mesh={{'cp': 2, ...}})")
    for later in ("context_parallel", "shard_model", "wrap_optimizer", "distribute_loader"):
        if ctx.was_applied(later):
            raise TransformOrderError(
                f"context_parallel must come before {later} (once): FSDP shards over the "
                "cp ranks and the loader cuts sequences only when it knows")


def _causal_lm_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise UnsupportedError(
            f"context_parallel knows transformers models (a `config` with an attention "
            f"implementation); {type(model).__name__} has none. In your own attention "
            "call accel.transforms.ring_attention.ring_attention(q, k, v, group)")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedError(
            f"context_parallel supports causal decoder models; {type(model).__name__} is "
            "an encoder-decoder")
    return config


def _register(name: str, group: Any) -> None:
    from transformers import AttentionInterface

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, attention_mask: Any, dropout: float = 0.0,
                  scaling: float | None = None, **_: Any) -> tuple[torch.Tensor, None]:
        _check_call(module, attention_mask, dropout)
        key, value = _repeat_kv(key, value, query.shape[1])
        out = ring_attention(query.contiguous(), key.contiguous(), value.contiguous(),
                             group, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, attention)


def _check_call(module: nn.Module, attention_mask: Any, dropout: float) -> None:
    if attention_mask is not None:
        raise UnsupportedError(
            "context parallel attention received an attention mask: padded or packed "
            "batches are not supported under context_parallel; give full-length "
            "sequences (the loader drops an all-ones attention_mask)")
    if not getattr(module, "is_causal", True):
        raise UnsupportedError(
            f"context parallel attention is causal; {type(module).__name__} attends both "
            "ways")
    if dropout and module.training:
        raise UnsupportedError(
            "context parallel attention has no dropout; set the model's attention_dropout "
            "to 0")


def _repeat_kv(key: torch.Tensor, value: torch.Tensor,
               heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention: the CPU kernel wants as many key heads as query heads."""
    groups = heads // key.shape[1]
    if groups == 1:
        return key, value
    return key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
