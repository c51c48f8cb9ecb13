"""`tensor_parallel`: shard a model's layers over the `tp` dimension of the mesh.

torch's `parallelize_module` does the work; accel resolves the plan (name patterns or a
built-in one), checks that it fits the model (every pattern matches, head counts divide
the degree), makes every rank start from rank 0's weights, and records the choice in
the Context, so that `shard_model` (FSDP over dp_shard), `backward` (loss parallel) and
checkpoints compose with it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from accel.backends._state import sync_from_rank0
from accel.context import Context
from accel.errors import (
    IncompatibleOptionsError,
    InvalidArgumentError,
    TransformOrderError,
)
from accel.transforms.tp_gpt2 import is_gpt2, parallelize_gpt2
from accel.transforms.tp_plans import auto_plan
from accel.validation import check_bool, check_context, check_module, fail


def tensor_parallel(
    model: nn.Module, ctx: Context, *, plan: str | Mapping[str, ParallelStyle] = "auto",
    sequence_parallel: bool = False, loss_parallel: bool = False,
) -> tuple[nn.Module, Context]:
    """Shard the model's layers over the mesh's `tp` dimension (in place).

    (in place) Like torch's `parallelize_module`, which it calls: the planned modules'
    parameters become DTensors sharded over `ctx.mesh["tp"]`, and hooks lay out their
    inputs and outputs. Apply it after `with_amp` and before `shard_model` (FSDP then
    shards the other dimension, as torchtitan composes them) and `wrap_optimizer`.
    Tied parameters (an embedding and LM head with tie_word_embeddings) stay one tensor,
    as torch's parallelize_module alone would not keep them.

    Args:
        plan: {module-name pattern (fnmatch, e.g. "model.layers.*.mlp.up_proj"): torch
            ParallelStyle}, or "auto": the built-in plan of transformers' Llama family, or
            of GPT-2 (its Conv1D projections, fused q|k|v included; attention and MLP).
        sequence_parallel: ("auto") norms and the residual stream hold a slice of the
            sequence, gathered before attention and the MLP: less activation memory.
            GPT-2's needs sequence lengths that are multiples of the tp degree.
        loss_parallel: ("auto") the LM head's logits stay sharded over the vocabulary
            (with GPT-2's tied embedding, the embedding too: one weight, vocab-parallel);
            cross entropy on them runs inside `accel.loss_parallel(ctx)` (transformers'
            own loss in forward, and `accel.backward`, enter it for you).

    Raises:
        IncompatibleOptionsError: no `tp` dimension, a head count the degree does not
            divide, a pattern that matches no module, two patterns on one module, tied
            parameters the plan lays out differently.
        UnsupportedError: plan="auto" for a model class without a built-in plan.
        TransformOrderError: after shard_model or wrap_optimizer, or applied twice.

    >>> ctx = accel.init(mesh={"dp_shard": 2, "tp": 2})
    >>> model, ctx = accel.tensor_parallel(model, ctx, plan="auto", sequence_parallel=True)
    >>> model, ctx = accel.shard_model(model, ctx, strategy=accel.FSDP())
    """
    check_module("tensor_parallel", "model", model)
    check_context("tensor_parallel", ctx)
    if not (isinstance(plan, Mapping) or (isinstance(plan, str) and plan == "auto")):
        fail("tensor_parallel", "plan", plan,
             "'auto' or a dict of module-name patterns to torch ParallelStyles",
             wrong_type=not isinstance(plan, str))
    check_bool("tensor_parallel", "sequence_parallel", sequence_parallel)
    check_bool("tensor_parallel", "loss_parallel", loss_parallel)
    _check_order(model, ctx)
    if isinstance(plan, str) and is_gpt2(model):  # Conv1D projections: accel's own styles
        return _parallelize_gpt2(model, ctx, sequence_parallel=sequence_parallel,
                                 loss_parallel=loss_parallel)
    if isinstance(plan, str):  # "auto"
        plan = auto_plan(model, sequence_parallel=sequence_parallel,
                         loss_parallel=loss_parallel)
    elif sequence_parallel or loss_parallel:
        raise IncompatibleOptionsError(
            "sequence_parallel and loss_parallel choose parts of the built-in plan; with "
            "your own plan, put SequenceParallel / loss layouts in it and drop the flags")
    resolved = expand_plan(model, plan)
    check_head_counts(model, ctx.tp_size)
    if not any(p.is_meta for p in model.parameters()):  # meta: load_pretrained allocates it
        model.to(ctx.device)
    sync_from_rank0(model, ctx)  # every rank cuts its shard from the same tensor
    ties = tied_parameters(model)
    parallelize_module(model, ctx.mesh["tp"], resolved)
    retie(ties)
    return _finish(model, ctx, sequence_parallel, loss_parallel)


def _parallelize_gpt2(model: nn.Module, ctx: Context, *, sequence_parallel: bool,
                      loss_parallel: bool) -> tuple[nn.Module, Context]:
    check_head_counts(model, ctx.tp_size)
    model.to(ctx.device)
    sync_from_rank0(model, ctx)  # every rank cuts its shard from the same tensor
    parallelize_gpt2(model, ctx.mesh["tp"], sequence_parallel=sequence_parallel,
                     loss_parallel=loss_parallel)
    return _finish(model, ctx, sequence_parallel, loss_parallel)


def _finish(model: nn.Module, ctx: Context, sequence_parallel: bool,
            loss_parallel: bool) -> tuple[nn.Module, Context]:
    if loss_parallel:  # a loss computed inside forward (labels=...) sees sharded logits
        model.forward = LossParallelForward(model.forward)
    options = "".join([", sequence_parallel" if sequence_parallel else "",
                       ", loss_parallel" if loss_parallel else ""])
    return model, ctx.record(f"tensor_parallel(tp={ctx.tp_size}{options})",
                             loss_parallel=loss_parallel)


class LossParallelForward:
    """A forward that runs inside torch's `loss_parallel` (set as the module's `forward`)."""

    def __init__(self, forward: Any):
        functools.update_wrapper(self, forward)
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.tensor.parallel import loss_parallel as torch_loss_parallel

        with torch_loss_parallel():
            return self.forward(*args, **kwargs)


def loss_parallel(ctx: Context) -> contextlib.AbstractContextManager[None]:
    """A block where cross entropy works on vocabulary-sharded logits; a no-op without them.

    With `tensor_parallel(..., loss_parallel=True)` the logits are DTensors sharded over
    the vocabulary: compute your loss (and call backward) inside this block. A loss
    computed by the model's own forward and `accel.backward` need no block.

    >>> with accel.loss_parallel(ctx):
    ...     loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    """
    check_context("loss_parallel", ctx)
    if not ctx.loss_parallel:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel as torch_loss_parallel

    return torch_loss_parallel()


def _check_order(model: nn.Module, ctx: Context) -> None:
    check_mesh_transform("tensor_parallel", "tp", "layers it shards", model, ctx)


def check_mesh_transform(function: str, dimension: str, holds: str, model: nn.Module,
                         ctx: Context) -> None:
    """`function` cuts the model over mesh `dimension`: it is there, and the transform comes
    once, before the engine and the optimizer, to a plain model (`holds`: what it cuts)."""
    if ctx.layout.size(dimension) < 2:
        raise IncompatibleOptionsError(
            f"{function} needs a '{dimension}' dimension of 2 or more in the mesh, but the "
            f"Context's mesh is {ctx.layout}; start with "
            f"accel.init(mesh={{'{dimension}': 2, ...}})")
    for later in (function, "shard_model", "wrap_optimizer"):
        if ctx.was_applied(later):
            raise TransformOrderError(
                f"{function} must come before {later} (once, after with_amp): the "
                f"{holds} are what the engine and the optimizer hold")
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise TransformOrderError(
            "this model's parameters are already DTensors: it was parallelised before; "
            f"apply {function} once, to a plain model")


def expand_plan(model: nn.Module, plan: Mapping[str, ParallelStyle]) -> dict[str, Any]:
    """{module name: style} for every module a pattern matches; every pattern must match."""
    names = [name for name, _ in model.named_modules() if name]
    resolved: dict[str, ParallelStyle] = {}
    unmatched = []
    for pattern, style in plan.items():
        if not isinstance(style, ParallelStyle):
            raise InvalidArgumentError(
                f"tensor_parallel: plan[{pattern!r}] must be a torch ParallelStyle "
                f"(ColwiseParallel(), RowwiseParallel(), ...), got {style!r}")
        matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        unmatched += [] if matched else [pattern]
        for name in matched:
            if name in resolved:
                raise IncompatibleOptionsError(
                    f"tensor_parallel: module {name!r} matches two patterns of the plan; "
                    "give each module one style")
            resolved[name] = style
    if unmatched:
        raise IncompatibleOptionsError(
            f"tensor_parallel: the plan's patterns {unmatched} match no module of this "
            f"{type(model).__name__} (modules are named like {names[:3]}); fix the names")
    return resolved


def tied_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str, str]]]:
    """[(module, attribute, full name), ...] for each parameter that several modules hold."""
    holders: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for prefix, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append(
                (module, name, f"{prefix}.{name}" if prefix else name))
    return [group for group in holders.values() if len(group) > 1]


def retie(ties: list[list[tuple[nn.Module, str, str]]]) -> None:
    """Tie again what `parallelize_module` untied (it distributes each module's parameters
    apart: a tied embedding and LM head would become two tensors, each with half the
    gradient). Tied parameters must come out with one layout."""
    for (first, attribute, first_name), *others in ties:
        kept = getattr(first, attribute)
        for module, name, full_name in others:
            other = getattr(module, name)
            if other is kept:
                continue
            if _layout(other) != _layout(kept):
                raise IncompatibleOptionsError(
                    f"tensor_parallel: {first_name} and {full_name} are one tied parameter, "
                    f"but the plan lays them out differently ({_layout(kept)} and "
                    f"{_layout(other)}), and the model is now partly "
                    "parallelised; give both modules styles that shard the weight alike "
                    "(RowwiseParallel on an embedding and ColwiseParallel on a linear head "
                    "both shard dim 0), or untie them (transformers: "
                    "config.tie_word_embeddings=False)")
            module.register_parameter(name, kept)


def _layout(tensor: Any) -> str:
    placements = tuple(tensor.placements) if isinstance(tensor, DTensor) else "not sharded"
    return f"{placements} of {tuple(tensor.shape)}"


def check_head_counts(model: nn.Module, degree: int) -> None:
    """Attention heads (and key/value heads) must divide among the tp ranks."""
    config = getattr(model, "config", None)
    for field in ("num_attention_heads", "num_key_value_heads"):
        count = getattr(config, field, None)
        if isinstance(count, int) and count % degree:
            raise IncompatibleOptionsError(
                f"tensor_parallel: {type(model).__name__} has {field}={count}, which the tp "
                f"degree {degree} does not divide; choose a tp size that divides {count}")
