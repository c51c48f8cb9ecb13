"""`pipeline_parallel`: the model cut into stages over the `pp` dimension of the mesh.

torch's `torch.distributed.pipelining` runs the schedule (GPipe, 1F1B, interleaved 1F1B);
accel cuts the model by block names (`accel.transforms.pipeline_split`), keeps on each
rank the blocks of its stages (the rest goes to the meta device: names stay, memory
goes), and records a `PipelineStrategy` in the Context so that `shard_model`, clipping,
checkpoints and export compose with the stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from accel.backends import engine_of
from accel.context import Context
from accel.errors import (
    IncompatibleOptionsError,
    InvalidArgumentError,
    TransformOrderError,
    UnsupportedError,
)
from accel.transforms.amp import AutocastForward
from accel.transforms.pipeline_engine import PipelineStrategy
from accel.transforms.pipeline_split import (
    check_no_ties_across,
    drop_blocks,
    family_of,
    plan_stages,
)
from accel.transforms.tensor_parallel import check_mesh_transform
from accel.validation import check_callable, check_context, check_int, check_module, fail

#: schedule name -> (torch class name, runs several stages per rank)
SCHEDULES = {"gpipe": ("ScheduleGPipe", False), "1f1b": ("Schedule1F1B", False),
             "interleaved1f1b": ("ScheduleInterleaved1F1B", True)}
_AUTOCAST = {"bf16": torch.bfloat16}


def pipeline_parallel(
    model: nn.Module, ctx: Context, *, split_points: Sequence[str] | str = "auto",
    schedule: str = "1f1b", microbatches: int, loss_fn: Callable[..., torch.Tensor],
    stages_per_rank: int = 1,
) -> tuple[Pipeline, Context]:
    """Cut the model into pipeline stages over the mesh's `pp` ranks; train with `step`.

    Returns a `Pipeline` holding this rank's stages. (in place) The blocks of the other
    ranks' stages move to the meta device in `model` itself (their memory is freed; the
    names stay), and the Pipeline runs the blocks of `model`: build the optimizer from
    the Pipeline's parameters afterwards. Then `shard_model(strategy=accel.DDP() |
    accel.FSDP())` wraps each stage over the data-parallel ranks (torchtitan's PP x DP),
    `clip_grad_norm` takes the norm over all stages, `save_state` saves each stage's
    tensors under the unsplit model's names (it loads on another pp size, or on no
    pipeline), and `save_model` writes the whole model, as `unwrap_model` shows it.
    Give every rank of a pipeline the same batch: `distribute_loader` shards by the
    data-parallel rank, which pipeline ranks share.

    `accumulate_grads` is refused: the microbatches are the pipeline's gradient
    accumulation (microbatches=N over a batch of N*b equals accumulating N batches of b).

    Args:
        split_points: the names of the blocks that begin stages 1, 2, ... (a transformers
            Llama: "model.layers.2"; GPT-2: "transformer.h.2"; an nn.Sequential: its
            children's names), or "auto": equal groups of layers, embeddings on the
            first stage, final norm and head on the last.
        schedule: "gpipe", "1f1b", or "interleaved1f1b" (several stages per rank).
        microbatches: how many pieces each batch is cut into; it must divide the batch.
        loss_fn: loss_fn(last stage's output, targets) -> the mean loss of a microbatch.
        stages_per_rank: stages on each rank (round-robin: rank r runs stages r, r+pp,
            ...); more than 1 needs schedule="interleaved1f1b".

    Raises:
        IncompatibleOptionsError: no `pp` dimension, more stages than layers, a number
            of split points or microbatches the schedule cannot run.
        InvalidArgumentError: a split point that names no block.
        UnsupportedError: a model accel cannot split, tied weights across stages,
            fp16/fp8 precision, tensor or context parallelism.
        TransformOrderError: after shard_model or wrap_optimizer, or applied twice.

    >>> model, ctx = accel.pipeline_parallel(model, ctx, microbatches=4, loss_fn=loss_fn)
    >>> loss = model.step(input_ids, labels)  # the batch's loss on the last stage, else None
    >>> optimizer.step(); optimizer.zero_grad()
    """
    _check_arguments(model, ctx, split_points, schedule, microbatches, loss_fn,
                     stages_per_rank)
    count = ctx.pp_size * stages_per_rank
    _check_schedule(schedule, microbatches, count, ctx.pp_size)
    family = family_of(model)
    stages = plan_stages(family.blocks(model), split_points, count)
    check_no_ties_across(model, stages)
    owned = list(range(ctx.pp_rank, count, ctx.pp_size))  # torch's loop-style placement
    drop_blocks(model, [block for index, blocks in enumerate(stages) if index not in owned
                        for block in blocks])
    parts = [family.stage_module(model, stages[index]).to(ctx.device) for index in owned]
    if ctx.precision in _AUTOCAST:  # with_amp set the whole model's forward: each stage's too
        for part in parts:  # accel's own stage modules; fp32 between stages, as unsplit
            part.forward = AutocastForward(part.forward, ctx.device.type,
                                           _AUTOCAST[ctx.precision], fp32_outputs=True)
    pipe = Pipeline(model, parts, ctx, stage_indices=owned, num_stages=count,
                    schedule=schedule, microbatches=microbatches, loss_fn=loss_fn)
    description = (f"pipeline_parallel(pp={ctx.pp_size}, stages={count}, {schedule}, "
                   f"microbatches={microbatches})")
    return pipe, ctx.record(description, strategy=PipelineStrategy(inner=engine_of(ctx)))


class Pipeline(nn.Module):
    """This rank's pipeline stages and the schedule that runs them (`pipeline_parallel`).

    `parts` are the stage modules (wrapped by `shard_model`); `module` is the user's
    model, whole in structure, other ranks' blocks on the meta device (what
    `accel.unwrap_model` returns). Parameters are this rank's own.
    """

    def __init__(self, module: nn.Module, parts: list[nn.Module], ctx: Context, *,
                 stage_indices: list[int], num_stages: int, schedule: str,
                 microbatches: int, loss_fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        object.__setattr__(self, "module", module)  # not a child: not this rank's parameters
        self.stage_indices, self.num_stages = tuple(stage_indices), num_stages
        self.schedule, self.microbatches, self.loss_fn = schedule, microbatches, loss_fn
        self.device = ctx.device
        self.rank, self.pp_size = ctx.rank, ctx.pp_size
        self.dp_rank, self.dp_size = ctx.dp_rank, ctx.dp_size
        self.pp_group, self.dp_group = ctx.mesh["pp"].get_group(), ctx.dp_group
        self._runner: Any = None

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_indices

    @property
    def has_last_stage(self) -> bool:
        return self.num_stages - 1 in self.stage_indices

    def replace_parts(self, parts: list[nn.Module]) -> None:
        """Run these stage modules (shard_model's wrappers) from now on."""
        self.parts = nn.ModuleList(parts)
        self._runner = None

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Forward and backward of one batch through every stage; gradients accumulate.

        Call it on every rank of the pipeline with the same batch. Returns the batch's
        loss (mean over the microbatches, detached) on the rank of the last stage, None
        on the others; then step the optimizer as usual.

        Raises:
            InvalidArgumentError: a batch that the microbatches do not divide.
        """
        for name, value in (("inputs", inputs), ("targets", targets)):
            if not isinstance(value, torch.Tensor):
                fail("Pipeline.step", name, value, "a torch.Tensor (batch first)")
        size, labels = (tensor.shape[0] if tensor.dim() else 0 for tensor in (inputs, targets))
        if size == 0 or size % self.microbatches or labels != size:
            raise InvalidArgumentError(
                f"Pipeline.step: a batch of {size} (with {labels} targets) does not split into "
                f"microbatches={self.microbatches} equal pieces; use a batch size that is a "
                "multiple of microbatches (pipeline_parallel(..., microbatches=N)), with as "
                "many targets as inputs")
        runner = self._runner = self._runner or self._build()
        losses: list[torch.Tensor] | None = [] if self.has_last_stage else None
        args = (inputs.to(self.device),) if self.has_first_stage else ()
        target = targets.to(self.device) if self.has_last_stage else None
        runner.step(*args, target=target, losses=losses)
        return torch.stack(losses).mean().detach() if losses else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsupportedError(
            "a pipelined model runs through model.step(inputs, targets) on every rank (each "
            "runs its stages); a single forward call cannot run another rank's stages")

    def _build(self) -> Any:
        from torch.distributed import pipelining

        if "forward" in self.__dict__:  # with_amp set it: no stage would run under autocast
            raise TransformOrderError(
                "with_amp was applied after pipeline_parallel; apply it before (to the "
                "model), so that every stage runs in its precision")
        stages = [pipelining.PipelineStage(part, index, self.num_stages, self.device,
                                           group=self.pp_group)
                  for part, index in zip(self.parts, self.stage_indices, strict=True)]
        cls = getattr(pipelining, SCHEDULES[self.schedule][0])
        first = stages if SCHEDULES[self.schedule][1] else stages[0]
        return cls(first, self.microbatches, loss_fn=self.loss_fn)


def _check_arguments(model: Any, ctx: Any, split_points: Any, schedule: Any,
                     microbatches: Any, loss_fn: Any, stages_per_rank: Any) -> None:
    check_module("pipeline_parallel", "model", model)
    check_context("pipeline_parallel", ctx)
    if not (split_points == "auto" or (isinstance(split_points, (list, tuple)) and all(
            isinstance(point, str) for point in split_points))):
        fail("pipeline_parallel", "split_points", split_points,
             "'auto' or a list of block names such as ['model.layers.2']",
             wrong_type=not isinstance(split_points, (str, list, tuple)))
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        fail("pipeline_parallel", "schedule", schedule, f"one of {list(SCHEDULES)}",
             wrong_type=not isinstance(schedule, str))
    check_int("pipeline_parallel", "microbatches", microbatches, minimum=1)
    check_int("pipeline_parallel", "stages_per_rank", stages_per_rank, minimum=1)
    check_callable("pipeline_parallel", "loss_fn", loss_fn,
                   "a function (last stage's output, targets) -> loss")
    check_mesh_transform("pipeline_parallel", "pp", "stages it cuts", model, ctx)
    if ctx.tp_size > 1 or ctx.cp_size > 1 or ctx.was_applied("tensor_parallel"):
        raise UnsupportedError(
            "pipeline_parallel composes with data parallelism (dp_replicate, dp_shard); "
            "tensor and context parallelism inside stages are not supported yet")
    if ctx.precision not in ("no", *_AUTOCAST):
        raise UnsupportedError(
            f"pipeline_parallel runs in fp32 or bf16, not {ctx.precision}: the loss scale "
            "of fp16 and fp8's own layers do not cross stages; use with_amp(dtype='bf16')")


def _check_schedule(schedule: str, microbatches: int, stages: int, pp_size: int) -> None:
    several = SCHEDULES[schedule][1]
    if stages > pp_size and not several:
        raise IncompatibleOptionsError(
            f"pipeline_parallel: schedule={schedule!r} runs one stage per rank; for "
            f"stages_per_rank={stages // pp_size} use schedule='interleaved1f1b'")
    if schedule == "1f1b" and microbatches < stages:
        raise IncompatibleOptionsError(
            f"pipeline_parallel: 1F1B needs at least one microbatch per stage: "
            f"microbatches={microbatches} < {stages} stages; raise microbatches")
    rounds = max(1, microbatches // pp_size)
    if several and microbatches % rounds:
        raise IncompatibleOptionsError(
            f"pipeline_parallel: interleaved 1F1B runs microbatches in rounds of the pp "
            f"size {pp_size}: microbatches={microbatches} is not a multiple of {rounds}; "
            f"use a multiple of {pp_size}")
