"""ZeRO-3 partitions written in place: each rank fills its own slice of each parameter.

A parameter built under `deepspeed_init` (DeepSpeed's zero.Init) holds only `ds_tensor`,
this rank's piece of the flattened parameter: elements ``[r * size, (r + 1) * size)``
of its `ds_numel`, r being the rank in the parameter's process group and the last
piece padded with zeros (DeepSpeed's `_partition_param`). `accel.load_pretrained` reads
exactly that range from a checkpoint and writes it here: no rank ever holds the whole
tensor, and nothing is sent. A parameter whose data is gathered at the moment (ZeRO-3
keeps small "persistent" ones whole after the first forward) or that also keeps a
secondary partition (hpZ) goes through DeepSpeed's `GatheredParameters` instead, where
rank 0 reads it whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from accel.backends.deepspeed.engine import DeepSpeedModel
from accel.errors import TransformOrderError

#: reads elements [start, stop) of the flattened checkpoint tensor, in the parameter's dtype.
FlatReader = Callable[[int, int], torch.Tensor]


def is_partitioned(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a ZeRO-3 parameter whose data lives in its partition."""
    return getattr(tensor, "ds_tensor", None) is not None and hasattr(tensor, "ds_id")


def partition_dtype(param: nn.Parameter) -> torch.dtype:
    """The dtype DeepSpeed stores the partition in (deepspeed_init's precision)."""
    return param.ds_tensor.dtype


def write_partition(param: nn.Parameter, read: FlatReader) -> None:
    """Fill this rank's partition of `param` from `read` (a collective only in the fallback)."""
    if _in_partition_only(param):
        size = param.ds_tensor.numel()
        start = min(size * dist.get_rank(group=param.ds_process_group), param.ds_numel)
        stop = min(start + size, param.ds_numel)
        with torch.no_grad():
            local = param.ds_tensor
            if stop > start:
                local[:stop - start].copy_(read(start, stop))
            local[stop - start:].zero_()  # DeepSpeed's padding
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
        if dist.get_rank() == 0:  # re-partitioned from rank 0 on exit
            param.data.copy_(read(0, param.ds_numel).reshape(param.ds_shape))


def _in_partition_only(param: nn.Parameter) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return (param.ds_status == ZeroParamStatus.NOT_AVAILABLE
            and getattr(param, "ds_secondary_tensor", None) is None)


def refuse_built_engine(model: Any) -> None:
    """Weights written after the engine exists would miss its fp32 master copies.

    Raises:
        TransformOrderError: `model` is a DeepSpeedModel whose engine is built.
    """
    if isinstance(model, DeepSpeedModel) and model.engine is not None:
        raise TransformOrderError(
            "load_pretrained after the DeepSpeed engine was built (at the model's first "
            "forward): its optimizer keeps master copies of the weights that load_pretrained "
            "does not write; load the weights before the first forward (right after "
            "shard_model), or use accel.load_model, which writes both")
