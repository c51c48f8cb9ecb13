"""Where a rank's batches come from: its shard of a map-style or an iterable dataset.

A plan owns the torch DataLoader one rank iterates and knows how its batches are laid
out; `DistributedLoader` adds the epoch bookkeeping, look-ahead and device placement on
top. Every plan has the same small surface:

- `dataloader`: the torch DataLoader this rank iterates (rank 0's, when dispatching);
- `iterate(epoch, skip)`: this rank's (batch, padding) pairs of one epoch, after its first
  `skip` batches; padding is the number of duplicated samples in the step's global batch,
  or None where only the end of the epoch tells (`final_padding()` then);
- `counts()`: batches per rank per epoch, or None when unknown.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from accel.data.iterable import IterableShard, PaddingAwareCollate, StatefulShard
from accel.data.iterable import iterable_batches_per_rank as _iterable_counts
from accel.data.samplers import RESEEDABLE_SAMPLERS, SeededSampler, ShardedBatchSampler, mix_seed
from accel.data.stateful import SourceState, is_stateful, loader_options, stateful_loader


def rebuild_loader(loader: DataLoader, loader_class: type[DataLoader] = DataLoader,
                   **overrides: Any) -> DataLoader:
    """A `loader_class` with `loader`'s settings (workers, collate, pinning...) and `overrides`."""
    settings: dict[str, Any] = dict(
        dataset=loader.dataset,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
    )
    if hasattr(loader, "in_order"):
        settings["in_order"] = loader.in_order
    settings.update(overrides)
    return loader_class(**settings)


def seeded_batch_sampler(batch_sampler: Any, seed: int) -> Any:
    """`batch_sampler`, drawing from a SeededSampler if its sampler is one of torch's random ones.

    The user's batch sampler is shallow-copied, never modified.
    """
    inner = getattr(batch_sampler, "sampler", None)
    if not isinstance(inner, RESEEDABLE_SAMPLERS):
        return batch_sampler
    twin = copy.copy(batch_sampler)
    twin.sampler = SeededSampler(inner, seed)
    return twin


class EpochSetup:
    """What every plan does before an epoch: tell the epoch to whoever takes one.

    Also seeds the DataLoader's `generator` from (seed, epoch, rank) when the user gave
    none: the workers' base seed (and so their torch/random seeds) then depends on the
    position in training, not on the global RNG, and differs between ranks.
    """

    def __init__(self, dataloader: DataLoader, dataset: Any, seed: int, rank: int,
                 user_generator: torch.Generator | None):
        self.dataloader = dataloader
        self.dataset = dataset
        self.seed = seed
        self.rank = rank
        self.user_generator = user_generator

    def __call__(self, epoch: int, *samplers: Any) -> None:
        for part in (*samplers, self.dataset):
            if callable(getattr(part, "set_epoch", None)):
                part.set_epoch(epoch)
        if self.user_generator is None:
            worker_seed = mix_seed(self.seed, epoch, self.rank, 1)
            self.dataloader.generator = torch.Generator().manual_seed(worker_seed)


class MapShardPlan:
    """Rank `rank`'s batches of a map-style loader: a ShardedBatchSampler underneath."""

    def __init__(self, loader: DataLoader, world_size: int, rank: int | None, *, seed: int,
                 split_batches: bool, even_batches: bool):
        self.sampler = ShardedBatchSampler(
            seeded_batch_sampler(loader.batch_sampler, seed), world_size, rank,
            split_batches=split_batches, even_batches=even_batches)
        self.dataloader = rebuild_loader(loader, batch_sampler=self.sampler)
        self._setup = EpochSetup(self.dataloader, loader.dataset, seed, rank or 0,
                                 loader.generator)

    def iterate(self, epoch: int, skip: int) -> Iterator[tuple[Any, int | None]]:
        self._setup(epoch, self.sampler)
        self.sampler.skip = skip
        batches = iter(self.dataloader)  # draws the sampler's iterator(s) now
        self.sampler.skip = 0
        return ((batch, None) for batch in batches)

    def counts(self) -> list[int] | None:
        return self.sampler.counts()

    def final_padding(self) -> int:
        return self.sampler.remainder or 0


class IterableShardPlan:
    """Rank `rank`'s batches of an iterable-dataset loader: an IterableShard underneath.

    A resumed epoch continues from the source's own saved state where it keeps one (see
    `accel.data.stateful`); otherwise it re-reads the stream and drops the batches
    already seen, exact when the stream is a pure function of the epoch (`set_epoch`)
    and the worker count.
    """

    def __init__(self, loader: DataLoader, world_size: int, rank: int | None, *, seed: int,
                 split_batches: bool, even_batches: bool):
        batch_size = loader.batch_size // world_size if split_batches else loader.batch_size
        self.world_size = world_size
        self.rank = rank
        self.per_rank_batch_size = batch_size
        self.even_batches = even_batches
        self.drop_last = loader.drop_last
        self.dataset = loader.dataset
        shard = StatefulShard if is_stateful(loader.dataset) else IterableShard
        self.shard = shard(loader.dataset, batch_size=batch_size, world_size=world_size,
                           rank=rank, even_batches=even_batches, drop_last=loader.drop_last)
        step_batch = loader.batch_size if rank is None and split_batches else batch_size
        keeps_state = stateful_loader(loader)
        self.dataloader = rebuild_loader(
            loader, type(loader) if keeps_state else DataLoader, dataset=self.shard,
            batch_size=step_batch, drop_last=False,
            collate_fn=PaddingAwareCollate(loader.collate_fn),
            **(loader_options(loader) if keeps_state else {}))
        holder = self.dataloader if keeps_state else (
            self.shard if is_stateful(loader.dataset) and loader.num_workers == 0 else None)
        #: the source's own position, when it keeps one (a resume then reads no batch twice)
        self.stream_state = SourceState(holder)
        self._single_stream = loader.num_workers <= 1
        self._setup = EpochSetup(self.dataloader, loader.dataset, seed, rank or 0,
                                 loader.generator)

    def iterate(self, epoch: int, skip: int) -> Iterator[tuple[Any, int | None]]:
        self._setup(epoch)
        if self.stream_state.apply():  # continues where the saved state was taken
            skip = 0
        batches = itertools.islice(iter(self.dataloader), skip, None)
        return ((item.batch, item.padding) for item in batches)

    def counts(self) -> list[int] | None:
        """Known for a dataset with len() read by at most one worker (one stream)."""
        try:
            num_items = len(self.dataset)
        except TypeError:
            return None
        if not self._single_stream:
            return None
        return _iterable_counts(num_items, self.per_rank_batch_size, self.world_size,
                                even_batches=self.even_batches, drop_last=self.drop_last)

    def final_padding(self) -> int:
        return 0  # every batch carries its own

