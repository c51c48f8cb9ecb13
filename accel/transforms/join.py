"""Training on inputs that are uneven across ranks, without hanging."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from accel.backends import backend_for
from accel.context import Context
from accel.data.loader import DistributedLoader
from accel.validation import check_context, check_module, check_type


@contextlib.contextmanager
def join_uneven_inputs(model: nn.Module, ctx: Context, *, loader: Any = None) -> Iterator[None]:
    """Let ranks with fewer batches finish early: they shadow the others' collectives.

    Needed with `distribute_loader(..., even_batches=False)` under DDP, where some ranks
    get one batch fewer; pass that loader so it knows it may start an uneven epoch.

    >>> with accel.join_uneven_inputs(model, ctx, loader=loader):
    ...     for batch in loader:
    ...         train_step(batch)
    """
    check_module("join_uneven_inputs", "model", model)
    check_context("join_uneven_inputs", ctx)
    # It marks the loader (`joined`): a plain DataLoader would only get a stray attribute.
    check_type("join_uneven_inputs", "loader", loader, DistributedLoader,
               "the DistributedLoader from accel.distribute_loader (or None)", optional=True)
    with backend_for(ctx).join(model):
        if loader is None:
            yield
            return
        loader.joined = True
        try:
            yield
        finally:
            loader.joined = False
