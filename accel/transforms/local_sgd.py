"""Local SGD: ranks train on their own and average parameters every few steps."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from accel.backends import LOCAL_SGD, has_capability
from accel.context import Context
from accel.errors import IncompatibleOptionsError, UnsupportedError
from accel.transforms.accumulation import no_sync
from accel.validation import check_context, check_module


class LocalSGD:
    """Counts optimizer steps and averages the parameters across ranks every `sync_every`."""

    def __init__(self, model: nn.Module, ctx: Context, sync_every: int):
        self.model = model
        self.ctx = ctx
        self.sync_every = sync_every
        self.steps = 0

    def step(self) -> None:
        """Call after each optimizer step; every `sync_every`-th call averages parameters."""
        self.steps += 1
        if self.steps % self.sync_every == 0:
            self.average()

    def average(self) -> None:
        """Replace every rank's parameters by their mean across the data-parallel ranks."""
        if self.ctx.dp_size == 1:
            return
        params = [p for p in self.model.parameters()]
        with torch.no_grad():
            flat = parameters_to_vector(params)
            dist.all_reduce(flat, group=self.ctx.dp_group)
            vector_to_parameters(flat / self.ctx.dp_size, params)


@contextlib.contextmanager
def local_sgd(model: nn.Module, ctx: Context, *, sync_every: int) -> Iterator[LocalSGD]:
    """Inside the block gradients are not synchronised; parameters are averaged every
    `sync_every` calls of `.step()` and once more on exit, so ranks leave identical.

    Trades some convergence per step for far less communication (Lin et al., 2018).

    >>> with accel.local_sgd(model, ctx, sync_every=8) as sgd:
    ...     for batch in loader:
    ...         accel.backward(loss_fn(model, batch), optimizer, ctx)
    ...         optimizer.step(); optimizer.zero_grad(); sgd.step()
    """
    check_module("local_sgd", "model", model)
    check_context("local_sgd", ctx)
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise IncompatibleOptionsError(
            f"accel.local_sgd: sync_every must be an int >= 1, got {sync_every!r}")
    if not has_capability(ctx, LOCAL_SGD):
        raise UnsupportedError(
            f"local_sgd needs every rank to hold and update whole parameters; the {ctx.backend} "
            "backend shards them. Use strategy='ddp' (or a single process)"
        )
    sgd = LocalSGD(model, ctx, sync_every)
    with no_sync(model, ctx):
        yield sgd
    sgd.average()
