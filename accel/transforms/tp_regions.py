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


class CopyToRegion(torch.autograd.Function):
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


class ReduceFromRegion(torch.autograd.Function):
    """Forward sums the partial outputs over the tp ranks; identity backward."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        tensor = tensor.contiguous()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _gather(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """[b, s/tp, ...] slices of every rank -> [b, s, ...], in rank order."""
    local = tensor.transpose(0, 1).contiguous()  # the collective concatenates dimension 0
    whole = local.new_empty((local.shape[0] * dist.get_world_size(group), *local.shape[1:]))
    dist.all_gather_into_tensor(whole, local, group=group)
    return whole.transpose(0, 1)


def _reduce_scatter(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """[b, s, ...] partial sums -> this rank's [b, s/tp, ...] slice of their total."""
    whole = tensor.transpose(0, 1).contiguous()
    local = whole.new_empty((whole.shape[0] // dist.get_world_size(group), *whole.shape[1:]))
    dist.reduce_scatter_tensor(local, whole, group=group)
    return local.transpose(0, 1)


def _slice(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    size = tensor.shape[1] // dist.get_world_size(group)
    return tensor.narrow(1, dist.get_rank(group) * size, size)


class GatherSequence(torch.autograd.Function):
    """Forward gathers the sequence slices; backward reduce-scatters the gradient."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _gather(tensor, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _reduce_scatter(grad, ctx.group), None


class ReduceScatterSequence(torch.autograd.Function):
    """Forward sums the partial outputs into sequence slices; backward gathers."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter(tensor, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _gather(grad, ctx.group), None


class SplitSequence(torch.autograd.Function):
    """Forward keeps this rank's slice of a whole sequence; backward gathers the gradient
    (every rank's slice of it: the whole gradient, equal on every rank)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _slice(tensor, group).contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _gather(grad.contiguous(), ctx.group), None


class AllGatherSequence(torch.autograd.Function):
    """Forward gathers the sequence slices; backward keeps this rank's slice (the
    consumer's gradient is whole and equal on every rank)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _gather(tensor, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _slice(grad, ctx.group).contiguous(), None


def check_divisible(tensor: torch.Tensor, group: Any) -> None:
    degree = dist.get_world_size(group)
    if tensor.dim() < 2 or tensor.shape[1] % degree:
        raise IncompatibleOptionsError(
            f"tensor_parallel(sequence_parallel=True) cuts the sequence into {degree} equal "
            f"slices, and this batch's hidden states have shape {tuple(tensor.shape)}: pad "
            f"the sequence length to a multiple of {degree} (the collator's "
            f"pad_to_multiple_of), or drop sequence_parallel")
