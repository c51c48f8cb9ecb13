"""Tensor parallelism for transformers' GPT-2: its Conv1D projections, fused q|k|v included.

torch's ColwiseParallel / RowwiseParallel know nn.Linear and nn.Embedding only, and
GPT-2's `c_attn` holds q, k and v side by side in one (in, 3 * hidden) weight: a plain
column split would give rank 0 all of q. Here each Conv1D weight becomes a DTensor over
the tp mesh: `c_attn` as `_StridedShard(1, split_factor=3)` (each rank holds its heads of
q, of k and of v; its bias stays replicated), `c_fc` as Shard(1), the output projections
as Shard(0). Forward runs on the local shards with Megatron's region functions
(tp_regions.py). Attention modules are told their local head count.

Sequence parallel: the residual stream between the regions holds this rank's slice of
the sequence; the first block cuts the embeddings' output, the norms (torch's
SequenceParallel: replicated DTensor weights whose gradients are summed over the tp
ranks) run on the slice, and the final norm's output is gathered, since GPT2Model
reshapes it to the whole sequence. Loss parallel: the tied embedding and LM head share
one weight sharded over the vocabulary (a vocab-parallel embedding, a column-parallel
head), the logits stay sharded and the cross entropy runs on them inside torch's
loss_parallel. Otherwise embeddings, norms and the tied LM head stay replicated: their
gradients are equal on every tp rank by construction.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.placement_types import _StridedShard

from accel.transforms.tp_regions import (
    AllGatherSequence,
    CopyToRegion,
    GatherSequence,
    ReduceFromRegion,
    ReduceScatterSequence,
    SplitSequence,
    check_divisible,
)


class ShardedConv1DForward:
    """The forward of a Conv1D whose weight and bias are tp DTensors (set as `forward`).

    A fused projection (`fused` = 3 for q|k|v) keeps its bias replicated, since FSDP
    composes a second shard of dim 0 only with plain Shard placements; each rank takes
    its slices, and the gradient is summed over the tp ranks so replicas stay equal.
    """

    def __init__(self, module: nn.Module, mesh: Any, *, rowwise: bool, fused: int = 1,
                 sequence_parallel: bool = False):
        self.module, self.group, self.rowwise = module, mesh.get_group(), rowwise
        self.fused, self.degree, self.rank = fused, mesh.size(), mesh.get_local_rank()
        self.sequence_parallel = sequence_parallel
        if sequence_parallel:  # the input (column) or output (row) is a sequence slice
            self.into, self.out_of = GatherSequence.apply, ReduceScatterSequence.apply
        else:
            self.into, self.out_of = CopyToRegion.apply, ReduceFromRegion.apply

    def _bias(self) -> torch.Tensor:
        bias = self.module.bias.to_local()
        if self.fused == 1:
            return bias
        pieces = CopyToRegion.apply(bias, self.group).view(self.fused, self.degree, -1)
        return pieces[:, self.rank].reshape(-1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.module.weight.to_local(), self._bias()
        if self.rowwise:  # x holds this rank's columns: partial sums, then the bias once
            if self.sequence_parallel:  # added to this rank's tokens: sum its gradient
                bias = CopyToRegion.apply(bias, self.group)
            return self.out_of(x @ weight, self.group) + bias
        return torch.matmul(self.into(x, self.group), weight) + bias


def is_gpt2(model: nn.Module) -> bool:
    inner = getattr(model, "transformer", model)
    blocks = getattr(inner, "h", None)
    return (type(model).__name__.startswith("GPT2") and isinstance(blocks, nn.ModuleList)
            and all(hasattr(block, "attn") and hasattr(block, "mlp") for block in blocks))


def parallelize_gpt2(model: nn.Module, mesh: Any, *, sequence_parallel: bool = False,
                     loss_parallel: bool = False) -> list[str]:
    """Shard every block's projections over `mesh` (1-D tp) in place; the names sharded."""
    inner = getattr(model, "transformer", model)
    degree = mesh.size()
    sharded = []
    for index, block in enumerate(inner.h):
        prefix = ("transformer." if inner is not model else "") + f"h.{index}."
        attn, sp = block.attn, sequence_parallel
        _shard(attn.c_attn, mesh, _StridedShard(1, split_factor=3), Replicate(),
               rowwise=False, fused=3, sequence_parallel=sp)
        _shard(attn.c_proj, mesh, Shard(0), Replicate(), rowwise=True, sequence_parallel=sp)
        _shard(block.mlp.c_fc, mesh, Shard(1), Shard(0), rowwise=False, sequence_parallel=sp)
        _shard(block.mlp.c_proj, mesh, Shard(0), Replicate(), rowwise=True,
               sequence_parallel=sp)
        # The attention splits c_attn's output in three and views heads: local sizes.
        attn.split_size //= degree
        attn.num_heads //= degree
        sharded += [prefix + name for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                               "mlp.c_proj")]
    if sequence_parallel:
        _slice_the_residual_stream(inner, mesh)
    if loss_parallel:
        sharded += _shard_vocabulary(model, inner, mesh, sequence_parallel)
    return sharded


def _slice_the_residual_stream(inner: nn.Module, mesh: Any) -> None:
    group = mesh.get_group()

    def cut(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        check_divisible(args[0], group)
        return (SplitSequence.apply(args[0], group), *args[1:])

    def gather(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return AllGatherSequence.apply(output, group)

    norms = {f"h.{index}.{name}": SequenceParallel(use_local_output=True)
             for index in range(len(inner.h)) for name in ("ln_1", "ln_2")}
    parallelize_module(inner, mesh, {**norms, "ln_f": SequenceParallel(use_local_output=True)})
    inner.h[0].register_forward_pre_hook(cut)
    inner.ln_f.register_forward_hook(gather)  # GPT2Model views it as the whole sequence


def _shard_vocabulary(model: nn.Module, inner: nn.Module, mesh: Any,
                      sequence_parallel: bool) -> list[str]:
    """The embedding and the LM head over the vocabulary; one weight when they are tied."""
    head = getattr(model, "lm_head", None)
    tied = head is not None and head.weight is inner.wte.weight
    parallelize_module(inner.wte, mesh, RowwiseParallel(input_layouts=Replicate(),
                                                        output_layouts=Replicate()))
    if head is None:
        return ["transformer.wte"]
    parallelize_module(head, mesh, ColwiseParallel(
        input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False))
    if tied:  # both hold Shard(0) of the same (vocab, hidden) tensor: keep one parameter
        head.weight = inner.wte.weight
    return ["transformer.wte", "lm_head"]


def _shard(module: nn.Module, mesh: Any, weight_placement: Any, bias_placement: Any, *,
           rowwise: bool, fused: int = 1, sequence_parallel: bool = False) -> None:
    for name, placement in (("weight", weight_placement), ("bias", bias_placement)):
        tensor = getattr(module, name)
        module.register_parameter(name, nn.Parameter(
            distribute_tensor(tensor.detach(), mesh, [placement]),
            requires_grad=tensor.requires_grad))
    module.forward = ShardedConv1DForward(module, mesh, rowwise=rowwise, fused=fused,
                                          sequence_parallel=sequence_parallel)
