"""One training step, written three ways: raw PyTorch DDP, accel, Hugging Face Accelerate.

Each `build_*` function prepares a fresh model and optimizer for its implementation and
returns a `step(index, x, y) -> loss` function: one micro-batch's forward, backward,
optimizer step and zero_grad, exactly as a user of that library would write it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from ddp_workload import Workload, loss_fn, make_model, make_optimizer
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import accel

Step = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


class Session:
    """What one worker process shares between implementations: the accel Context and,
    created on first use, the one Accelerator that Accelerate allows per process."""

    def __init__(self, ctx: accel.Context, accumulation: int, precision: str):
        self.ctx = ctx
        self.accumulation = accumulation
        self.precision = precision
        self._accelerator: Any = None

    @property
    def accelerator(self) -> Any:
        if self._accelerator is None:
            self._accelerator = _connected_accelerator(self)
        return self._accelerator


def _connected_accelerator(session: Session) -> Any:
    """Accelerator(cpu=True), after checking that its ranks really form one world.

    Under torchrun without ACCELERATE_USE_CPU=1 Accelerate can run every rank as an
    independent world of 1; the benchmark would then time no communication at all.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(
        cpu=True,
        mixed_precision="bf16" if session.precision == "bf16" else "no",
        gradient_accumulation_steps=session.accumulation,
    )
    world = session.ctx.world_size
    total = accelerator.reduce(torch.ones(1, device=accelerator.device), reduction="sum")
    if accelerator.num_processes != world or int(total.item()) != world:
        raise RuntimeError(
            f"Accelerate sees {accelerator.num_processes} processes and its all-reduce summed "
            f"to {total.item()}, expected {world}: launch under torchrun with ACCELERATE_USE_CPU=1"
        )
    if session.precision == "bf16" and not accelerator.native_amp:
        raise RuntimeError("Accelerate did not enable bf16 autocast on this CPU")
    if torch.get_num_threads() != 1:
        raise RuntimeError(f"Accelerate changed torch threads to {torch.get_num_threads()}")
    return accelerator


def build_raw(session: Session, work: Workload) -> tuple[Step, nn.Module]:
    """Hand-written DDP: no_sync on non-boundary micro-steps, autocast around the forward."""
    k, bf16 = session.accumulation, session.precision == "bf16"
    model = DistributedDataParallel(make_model(work))
    optimizer = make_optimizer(model, work)

    def step(index: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        boundary = (index + 1) % k == 0
        with contextlib.nullcontext() if boundary else model.no_sync():
            if bf16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    output = model(x)
                output = output.float()
            else:
                output = model(x)
            loss = loss_fn(output, y)
            (loss / k if k > 1 else loss).backward()
        if boundary:
            optimizer.step()
            optimizer.zero_grad()
        return loss

    return step, model


def build_accel(session: Session, work: Workload) -> tuple[Step, nn.Module]:
    """The accel transforms; the loop calls backward/step/zero_grad on every micro-batch."""
    ctx = session.ctx
    model = make_model(work)
    if session.precision != "no":
        model, ctx = accel.with_amp(model, ctx, dtype=session.precision)
    model, ctx = accel.shard_model(model, ctx, strategy="ddp")
    optimizer, ctx = accel.wrap_optimizer(make_optimizer(model, work), ctx)
    if session.accumulation > 1:
        model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx,
                                                       steps=session.accumulation)

    def step(index: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(model(x), y)
        accel.backward(loss, optimizer, ctx)
        optimizer.step()
        optimizer.zero_grad()
        return loss

    return step, model


def build_accelerate(session: Session, work: Workload) -> tuple[Step, nn.Module]:
    """Hugging Face Accelerate's documented loop (accumulate() only when accumulating)."""
    accelerator = session.accelerator
    accelerator.free_memory()  # drop the previous run's model; resets accelerator.step
    model = make_model(work)
    model, optimizer = accelerator.prepare(model, make_optimizer(model, work))
    accumulate = (lambda: accelerator.accumulate(model)) if session.accumulation > 1 else (
        contextlib.nullcontext)

    def step(index: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with accumulate():
            loss = loss_fn(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        return loss

    return step, model


BUILDERS: dict[str, Callable[[Session, Workload], tuple[Step, nn.Module]]] = {
    "raw": build_raw,
    "accel": build_accel,
    "accelerate": build_accelerate,
    "raw_b": build_raw,  # the control: a second raw run
}


def check_world(ctx: accel.Context) -> None:
    """accel.init verified its group; check torch's default group is that same world."""
    if not dist.is_initialized() or ctx.world_size < 2 or dist.get_world_size() != ctx.world_size:
        raise RuntimeError("the benchmark needs a process group of 2+ ranks: run it under "
                           "torchrun (python -m torch.distributed.run --nproc_per_node 2)")
