"""Distributed data loading: each rank its share of the batches, exact mid-epoch resume.

- `distribute_loader(loader, ctx)`: the transform; returns a `DistributedLoader`.
- `skip_first_batches(loader, n)`: resume inside an epoch.
- `gather_for_metrics(data, ctx, loader)`: gather predictions without the padding samples.
- `SeededSampler`, `ShardedBatchSampler`, `IterableShard`: the building blocks.
"""

from accel.data.distribute import distribute_loader, skip_first_batches
from accel.data.iterable import IterableShard
from accel.data.loader import DistributedLoader
from accel.data.metrics import gather_for_metrics
from accel.data.samplers import SeededSampler, ShardedBatchSampler, SkipFirstBatches

__all__ = [
    "DistributedLoader",
    "IterableShard",
    "SeededSampler",
    "ShardedBatchSampler",
    "SkipFirstBatches",
    "distribute_loader",
    "gather_for_metrics",
    "skip_first_batches",
]
