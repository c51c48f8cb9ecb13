"""Big-model inference: build on meta, map blocks to devices, stream checkpoints in, run
with CPU and disk offload (prefetched on a background thread), estimate memory."""

from accel.inference.device_map import (
    check_device_map,
    explain_device_map,
    infer_device_map,
    plan_device_map,
)
from accel.inference.dispatch import (
    dispatch_model,
    dispatch_stats,
    dispatched_device_map,
    remove_dispatch,
)
from accel.inference.empty import compute_module_sizes, init_empty_weights, init_on_device
from accel.inference.estimate import MemoryEstimate, estimate_memory
from accel.inference.loading import checkpoint_files, load_checkpoint_and_dispatch
from accel.inference.units import DispatchStats

__all__ = [
    "DispatchStats",
    "MemoryEstimate",
    "check_device_map",
    "checkpoint_files",
    "compute_module_sizes",
    "dispatch_model",
    "dispatch_stats",
    "dispatched_device_map",
    "estimate_memory",
    "explain_device_map",
    "infer_device_map",
    "init_empty_weights",
    "init_on_device",
    "load_checkpoint_and_dispatch",
    "plan_device_map",
    "remove_dispatch",
]
