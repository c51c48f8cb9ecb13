"""The strategy of a pipelined model: the data-parallel engine per stage, stages together.

`pipeline_parallel` records a `PipelineStrategy` in the Context around the engine in use
(one process's, until `shard_model`); `shard_model` then asks it to run the engine it
picks (`around`): DDP or FSDP2 wrap each stage module over the data-parallel ranks of
that stage, as torchtitan composes them. Everything after goes through this strategy:
clipping takes the norm over every stage, state dicts carry the unsplit model's names
(each stage its own tensors; whole ones gathered on rank 0 for export), and the
transforms a pipeline cannot honour (`accumulate_grads`, `no_sync`, `accel.backward`,
`join_uneven_inputs`) are refused with what to do instead.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from accel.backends import (
    COLLECTIVE_BACKWARD,
    ENGINE_HOLDS_WEIGHTS,
    LOCAL_SGD,
    SHARDED_CHECKPOINT,
    Strategy,
)
from accel.context import Context
from accel.errors import IncompatibleOptionsError, UnsupportedError
from accel.transforms import pipeline_state


@attrs.frozen
class PipelineStrategy(Strategy):
    """Pipeline stages on the `pp` ranks, each run by `inner` over its data-parallel ranks.

    It declares what the pipeline adds: backward passes communicate (stage to stage),
    state is split by stage (sharded checkpoints, each stage saving its own tensors),
    and no rank holds the whole model (export gathers it). Local SGD is not offered.
    """

    name = "pipeline"
    inner: Any = attrs.field()

    @property
    def capabilities(self) -> frozenset[str]:  # type: ignore[override]
        added = {COLLECTIVE_BACKWARD, SHARDED_CHECKPOINT, ENGINE_HOLDS_WEIGHTS}
        return frozenset((set(self.inner.capabilities) | added) - {LOCAL_SGD})

    def around(self, strategy: Any) -> PipelineStrategy:
        """This pipeline with `strategy` (shard_model's) running each stage."""
        from accel.backends.ddp import DDP
        from accel.backends.fsdp import FSDP
        from accel.backends.single import Single

        if not isinstance(strategy, (Single, DDP, FSDP)):
            raise UnsupportedError(
                f"pipeline_parallel composes with shard_model(strategy=accel.DDP()) or "
                f"accel.FSDP() on the data-parallel dimensions, not with {strategy.name!r}")
        return PipelineStrategy(inner=strategy)

    def wrap_model(self, model: nn.Module, ctx: Context) -> nn.Module:
        """(in place) Each stage module wrapped (DDP) or sharded (FSDP2) by the inner engine.

        Each stage's weights come from rank 0 of its data-parallel group: the engine
        broadcasts within that group (ranks of other stages hold other blocks).
        """
        pipe = _require_pipeline(model, "shard_model")
        stage_ctx = attrs.evolve(ctx, group=ctx.dp_group)
        parts = [self.inner.wrap_model(part, stage_ctx) for part in pipe.parts]
        for part in parts:
            # torch's PipelineStage reduces gradients once, after the last microbatch:
            # the engine must not reduce at each microbatch's backward on its own.
            self.inner.set_grad_sync(part, False)
        pipe.replace_parts(parts)
        return pipe

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return model.module if _is_pipeline(model) else self.inner.unwrap_model(model)

    def wrap_optimizer(self, optimizer: Any, ctx: Context) -> Any:
        return self.inner.wrap_optimizer(optimizer, ctx)

    def set_grad_sync(self, model: nn.Module, enabled: bool) -> None:
        raise IncompatibleOptionsError(
            "accumulate_grads and no_sync do not apply to a pipelined model: its "
            "microbatches are its gradient accumulation (one gradient sync per "
            "model.step). Instead of accumulating k batches of b, give model.step a batch "
            "of k*b and pipeline_parallel(..., microbatches=k*N)")

    def backward(self, loss: torch.Tensor, optimizer: Any, **kwargs: Any) -> None:
        raise IncompatibleOptionsError(
            "a pipelined model runs its backward passes inside model.step(inputs, targets), "
            "stage by stage; call that instead of computing a loss and accel.backward")

    def clip_grad_norm(self, model: nn.Module, max_norm: float, norm_type: float
                       ) -> torch.Tensor:
        """Clip by the norm of every stage's gradients together (the unsplit model's norm)."""
        pipe = _require_pipeline(model, "clip_grad_norm")
        # The inner engine's norm of this rank's stages (whole over their data-parallel
        # ranks); an infinite bound measures it and scales the gradients by exactly 1.
        local = self.inner.clip_grad_norm(pipe, math.inf, norm_type).detach().double()
        total = _combine_norms(local, norm_type, pipe.pp_group)
        _clip_with_norm(list(pipe.parameters()), max_norm, total)
        return total.float()

    def clip_grad_value(self, model: nn.Module, clip_value: float) -> None:
        self.inner.clip_grad_value(model, clip_value)

    def join(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        raise UnsupportedError(
            "join_uneven_inputs cannot shadow a pipeline's stage-to-stage sends; keep "
            "distribute_loader's default even_batches=True")

    def get_state_dict(self, model: nn.Module, optimizer: Any, *, full: bool
                       ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The unsplit model's names: this rank's stages (full=False), or every stage whole
        on rank 0 (full=True; the other ranks get empty dicts)."""
        pipe = _require_pipeline(model, "a state dict")
        return pipeline_state.get_state_dict(pipe, optimizer, full=full)

    def set_state_dict(self, model: nn.Module, optimizer: Any, model_state: dict[str, Any],
                       optimizer_state: dict[str, Any] | None, *, full: bool) -> None:
        """Load what get_state_dict returned; with full=True rank 0's dicts are sent to
        the ranks of each stage, which keep their own tensors."""
        pipe = _require_pipeline(model, "loading a state dict")
        pipeline_state.set_state_dict(pipe, optimizer, model_state, optimizer_state, full=full)


def _is_pipeline(model: Any) -> bool:
    from accel.transforms.pipeline import Pipeline

    return isinstance(model, Pipeline)


def _require_pipeline(model: Any, purpose: str) -> Any:
    if not _is_pipeline(model):
        raise IncompatibleOptionsError(
            f"{purpose} of a pipelined run needs the model pipeline_parallel returned (or "
            f"shard_model after it), got a {type(model).__name__}; pass that model, not "
            "accel.unwrap_model(model, ctx)")
    return model


def _combine_norms(local: torch.Tensor, norm_type: float, group: Any) -> torch.Tensor:
    """The norm over every stage from each stage's own norm (sum of p-th powers, or max)."""
    if math.isinf(norm_type):
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
        return local
    power = local ** norm_type
    dist.all_reduce(power, group=group)
    return power ** (1.0 / norm_type)


def _clip_with_norm(params: list[nn.Parameter], max_norm: float, total: torch.Tensor) -> None:
    """Scale every gradient by max_norm / total when that is below 1 (torch's rule)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0).float()
    with torch.no_grad():
        for grad in grads:
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            local.mul_(coefficient.to(local.device, local.dtype))
