"""Tensor parallelism for transformers' GPT-2: its Conv1D projections, fused q|k|v included.

torch's ColwiseParallel / RowwiseParallel know nn.Linear and nn.Embedding only, and
GPT-2's `c_attn` holds q, k and v side by side in one (in, 3 * hidden) weight: a plain
column split would give rank 0 all of q. Here each Conv1D weight becomes a DTensor over
the tp mesh: `c_attn` as `_StridedShard(1, split_factor=3)` (each rank holds its heads of
q, of k and of v; its bias stays replicated), `c_fc` as Shard(1), the output projections
as Shard(0). Forward runs
on the local shards with Megatron's two region functions (copy in: identity forward,
all-reduce backward; reduce out: all-reduce forward, identity backward). Attention
modules are told their local head count. Embeddings, norms and the tied LM head stay
replicated: their gradients are equal on every tp rank by construction.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard


class _CopyToRegion(torch.autograd.Function):
    """Identity forward; backward sums the input gradient over the tp ranks."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return tensor

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    """Forward sums the partial outputs over the tp ranks; identity backward."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        tensor = tensor.contiguous()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class ShardedConv1DForward:
    """The forward of a Conv1D whose weight and bias are tp DTensors (set as `forward`).

    A fused projection (`fused` = 3 for q|k|v) keeps its bias replicated, since FSDP
    composes a second shard of dim 0 only with plain Shard placements; each rank takes
    its slices, and the gradient is summed over the tp ranks so replicas stay equal.
    """

    def __init__(self, module: nn.Module, mesh: Any, *, rowwise: bool, fused: int = 1):
        self.module, self.group, self.rowwise = module, mesh.get_group(), rowwise
        self.fused, self.degree, self.rank = fused, mesh.size(), mesh.get_local_rank()

    def _bias(self) -> torch.Tensor:
        bias = self.module.bias.to_local()
        if self.fused == 1:
            return bias
        pieces = _CopyToRegion.apply(bias, self.group).view(self.fused, self.degree, -1)
        return pieces[:, self.rank].reshape(-1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.module.weight.to_local(), self._bias()
        flat = x.reshape(-1, x.shape[-1])
        if self.rowwise:  # x holds this rank's columns: partial sums, then the bias once
            out = _ReduceFromRegion.apply(flat @ weight, self.group) + bias
        else:
            out = torch.addmm(bias, _CopyToRegion.apply(flat, self.group), weight)
        return out.view(*x.shape[:-1], out.shape[-1])


def is_gpt2(model: nn.Module) -> bool:
    inner = getattr(model, "transformer", model)
    blocks = getattr(inner, "h", None)
    return (type(model).__name__.startswith("GPT2") and isinstance(blocks, nn.ModuleList)
            and all(hasattr(block, "attn") and hasattr(block, "mlp") for block in blocks))


def parallelize_gpt2(model: nn.Module, mesh: Any) -> list[str]:
    """Shard every block's projections over `mesh` (1-D tp) in place; the names sharded."""
    inner = getattr(model, "transformer", model)
    degree = mesh.size()
    sharded = []
    for index, block in enumerate(inner.h):
        prefix = ("transformer." if inner is not model else "") + f"h.{index}."
        attn = block.attn
        _shard(attn.c_attn, mesh, _StridedShard(1, split_factor=3), Replicate(),
               rowwise=False, fused=3)
        _shard(attn.c_proj, mesh, Shard(0), Replicate(), rowwise=True)
        _shard(block.mlp.c_fc, mesh, Shard(1), Shard(0), rowwise=False)
        _shard(block.mlp.c_proj, mesh, Shard(0), Replicate(), rowwise=True)
        # The attention splits c_attn's output in three and views heads: local sizes.
        attn.split_size //= degree
        attn.num_heads //= degree
        sharded += [prefix + name for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                               "mlp.c_proj")]
    return sharded


def _shard(module: nn.Module, mesh: Any, weight_placement: Any, bias_placement: Any, *,
           rowwise: bool, fused: int = 1) -> None:
    for name, placement in (("weight", weight_placement), ("bias", bias_placement)):
        tensor = getattr(module, name)
        module.register_parameter(name, nn.Parameter(
            distribute_tensor(tensor.detach(), mesh, [placement]),
            requires_grad=tensor.requires_grad))
    module.forward = ShardedConv1DForward(module, mesh, rowwise=rowwise, fused=fused)
