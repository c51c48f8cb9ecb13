"""`gather_for_metrics`: every rank's predictions, without the samples even_batches repeated."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from accel.context import Context
from accel.data.loader import DistributedLoader
from accel.errors import UnsupportedError
from accel.validation import check_context, check_type


def gather_for_metrics(data: Any, ctx: Context, loader: DistributedLoader) -> Any:
    """Gather `data` (per-sample values of the current batch) from every rank, in rank order,
    and drop the samples that even_batches duplicated to fill the epoch's last step.

    Tensors are gathered along dim 0; lists (and other values) that hold no tensor are
    gathered as objects, lists concatenated. On the last step of a loader built with
    even_batches=False, tensors of different lengths are padded for the gather and cut back.
    Over a whole epoch, the results hold each sample of the dataset exactly once.

    Raises:
        UnsupportedError: `loader` is not a DistributedLoader, or it gives ranks different
            numbers of batches (the gather of the extra steps would never complete).

    >>> for batch in loader:
    ...     preds = gather_for_metrics(model(batch["x"]).argmax(-1), ctx, loader)
    ...     metric.update(preds, gather_for_metrics(batch["y"], ctx, loader))
    """
    check_context("gather_for_metrics", ctx)
    check_type("gather_for_metrics", "loader", loader, DistributedLoader,
               "the DistributedLoader the batch came from (it knows which samples are "
               "duplicates)", error=UnsupportedError)
    counts = loader.batches_per_rank
    if counts is not None and len(set(counts)) > 1:
        raise UnsupportedError(
            f"gather_for_metrics: the ranks get {counts} batches per epoch (even_batches=False), "
            "so the ranks with more would wait forever in the last gathers; distribute the "
            "loader with even_batches=True"
        )
    uneven = not loader.even_batches and loader.is_last_batch
    return _gather(data, ctx, loader.batch_padding, uneven)


def _gather(data: Any, ctx: Context, padding: int, uneven: bool) -> Any:
    from accel.runtime.ops import gather_object

    if _holds_no_tensor(data):
        gathered = gather_object(data, ctx)
        per_sample = isinstance(data, (list, tuple))
        return gathered[:len(gathered) - padding] if per_sample and padding else gathered
    if isinstance(data, torch.Tensor):
        return _gather_tensor(data, ctx, padding, uneven)
    if isinstance(data, Mapping):
        items = {key: _gather(value, ctx, padding, uneven) for key, value in data.items()}
        try:
            return type(data)(items)
        except TypeError:
            return items
    items_list = [_gather(value, ctx, padding, uneven) for value in data]
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*items_list)
    return type(data)(items_list)


def _gather_tensor(tensor: torch.Tensor, ctx: Context, padding: int,
                   uneven: bool) -> torch.Tensor:
    from accel.runtime.ops import gather, pad_across_processes

    if tensor.dim() == 0:
        return gather(tensor, ctx)  # one value per rank, not per sample: nothing to drop
    if uneven and ctx.dp_size > 1:
        lengths = gather(torch.tensor([tensor.shape[0]], device=tensor.device), ctx).tolist()
        padded = gather(pad_across_processes(tensor, ctx), ctx)
        width = max(lengths)
        gathered = torch.cat([padded[r * width:r * width + length]
                              for r, length in enumerate(lengths)])
    else:
        gathered = gather(tensor, ctx)
    return gathered[:gathered.shape[0] - padding] if padding else gathered


def _holds_no_tensor(data: Any) -> bool:
    if isinstance(data, torch.Tensor):
        return False
    if isinstance(data, Mapping):
        return all(_holds_no_tensor(value) for value in data.values())
    if isinstance(data, (list, tuple)):
        return all(_holds_no_tensor(value) for value in data)
    return True
