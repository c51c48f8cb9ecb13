"""Megatron's region functions for hand-sharded layers (GPT-2's Conv1D): the collective a
tensor-parallel region needs at its border, forward and backward.

Without sequence parallelism the activations between regions are whole on every tp
rank: a column-sharded layer's input is copied in (its gradient summed over the ranks),
a row-sharded layer's partial output is summed (all-reduce). With it, the activations
between regions hold this rank's slice of the sequence (dimension 1): the column layer
gathers the sequence first (its backward reduce-scatters), the row layer reduce-scatters
its partial output back into slices (its backward gathers). Same bytes as an all-reduce,
split in two, and the norms and dropouts between run on 1/tp of the tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from accel.errors import IncompatibleOptionsError


def _region(name: str, forward: Any, backward: Any, doc: str) -> type:
    """An autograd Function(tensor, group): `forward` on the way in, `backward` on the
    gradient, each a function (tensor, group) -> tensor."""

    class Region(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
            ctx.group = group
            return forward(tensor, group)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            return backward(grad, ctx.group), None

    Region.__name__ = Region.__qualname__ = name
    Region.__doc__ = doc
    return Region


# torch 2.13 renamed the one-tensor collectives and warns on the old names; older torch
# (the XLA lane's 2.9) has only those.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _same(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    return tensor


def _sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    tensor = tensor.contiguous()
    dist.all_reduce(tensor, group=group)
    return tensor


def _gather(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """[b, s/tp, ...] slices of every rank -> [b, s, ...], in rank order."""
    local = tensor.transpose(0, 1).contiguous()  # the collective concatenates dimension 0
    whole = local.new_empty((local.shape[0] * dist.get_world_size(group), *local.shape[1:]))
    _ALL_GATHER(whole, local, group=group)
    return whole.transpose(0, 1)


def _reduce_scatter(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """[b, s, ...] partial sums -> this rank's [b, s/tp, ...] slice of their total."""
    whole = tensor.transpose(0, 1).contiguous()
    local = whole.new_empty((whole.shape[0] // dist.get_world_size(group), *whole.shape[1:]))
    _REDUCE_SCATTER(local, whole, group=group)
    return local.transpose(0, 1)


def _slice(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """This rank's slice of a whole sequence (every rank holds the same whole)."""
    size = tensor.shape[1] // dist.get_world_size(group)
    return tensor.narrow(1, dist.get_rank(group) * size, size).contiguous()


CopyToRegion = _region("CopyToRegion", _same, _sum,
                       "Identity forward; backward sums the input gradient over the tp ranks.")
ReduceFromRegion = _region("ReduceFromRegion", _sum, _same,
                           "Forward sums the partial outputs over the tp ranks.")
GatherSequence = _region("GatherSequence", _gather, _reduce_scatter,
                         "Forward gathers the sequence slices; backward reduce-scatters.")
ReduceScatterSequence = _region("ReduceScatterSequence", _reduce_scatter, _gather,
                                "Forward sums partial outputs into sequence slices.")
SplitSequence = _region("SplitSequence", _slice, _gather,
                        "A whole sequence -> this rank's slice; backward gathers the "
                        "gradient (whole and equal on every rank).")
AllGatherSequence = _region("AllGatherSequence", _gather, _slice,
                            "Slices -> the whole sequence, for a consumer whose gradient "
                            "is whole and equal on every rank; backward keeps the slice.")


def check_divisible(tensor: torch.Tensor, group: Any) -> None:
    degree = dist.get_world_size(group)
    if tensor.dim() < 2 or tensor.shape[1] % degree:
        raise IncompatibleOptionsError(
            f"tensor_parallel(sequence_parallel=True) cuts the sequence into {degree} equal "
            f"slices, and this batch's hidden states have shape {tuple(tensor.shape)}: pad "
            f"the sequence length to a multiple of {degree} (the collator's "
            f"pad_to_multiple_of), or drop sequence_parallel")
