"""`distribute_loader` and `skip_first_batches`: the transforms of the data package."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset
from torch.utils.weak import WeakIdKeyDictionary

from accel.backends import COLLECTIVE_BACKWARD, has_capability
from accel.context import Context
from accel.data.dispatch import DispatchPlan
from accel.data.iterable import IterableShard
from accel.data.loader import DistributedLoader
from accel.data.samplers import ShardedBatchSampler, SkipFirstBatches
from accel.data.sources import IterableShardPlan, MapShardPlan, rebuild_loader
from accel.errors import IncompatibleOptionsError, TransformOrderError, UnsupportedError
from accel.validation import check_bool, check_context, check_int, check_type

# The user's DataLoaders already distributed, so that a second call is refused without
# marking them; weak, so an entry goes with its loader.
_DISTRIBUTED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def distribute_loader(
    loader: DataLoader,
    ctx: Context,
    *,
    split_batches: bool = False,
    even_batches: bool = True,
    dispatch_batches: bool = False,
    device_placement: bool = True,
    seed: int | None = None,
    non_blocking: bool | None = None,
) -> tuple[DistributedLoader, Context]:
    """Give each rank its share of `loader`'s batches, moved to `ctx.device`.

    The DataLoader passed is left as it is; passing it again is refused. On a mesh
    (`accel.init(mesh=...)`) the batches are shared out by data-parallel rank: the ranks
    of one data-parallel group (tp, cp, pp peers) get the same batches.

    The loader is rebuilt over a sharded batch sampler (map-style datasets: batches go
    round-robin to the ranks) or a sharded stream (iterable datasets: each rank keeps its
    slice of every n * batch_size items); the dataset, collate_fn, workers, pinning,
    worker_init_fn, generator and drop_last are kept. A RandomSampler (shuffle=True),
    SubsetRandomSampler or WeightedRandomSampler draws its order from (seed, epoch), the
    same on every rank (not from the loader's `generator`); a custom random sampler must
    give every rank the same order itself (it is told `set_epoch(epoch)`). Without a
    `generator` on the loader, DataLoader workers are seeded from (seed, epoch, rank).
    See `accel.data.samplers` and `accel.data.iterable` for the exact rules of padding the
    last batches. For an IterableDataset, `get_worker_info().dataset` in a worker is the
    `IterableShard` around yours (its `.dataset`).

    Args:
        split_batches: the loader's batch size is the global one; each rank takes its
            slice of every batch (the batch size must divide by the world size).
        even_batches: complete the last step with samples from the start of the epoch so
            every rank gets as many batches (`gather_for_metrics` drops the duplicates);
            False: some ranks get one batch fewer; under a training engine (shard_model
            applied first) iterate inside `accel.join_uneven_inputs`, or the loader refuses.
        dispatch_batches: rank 0 alone iterates the loader and broadcasts each rank its
            part (streams that must be read once); every rank must iterate in step.
        device_placement: move batches to `ctx.device`.
        seed: the seed of the random order; default `ctx.seed`, else 0.
        non_blocking: copy batches to the device asynchronously; default: the loader's
            pin_memory.

    Returns:
        The DistributedLoader and the Context with this transform recorded.

    Raises:
        TransformOrderError: the loader was already distributed.
        IncompatibleOptionsError: options that cannot be honoured together (batch size
            not divisible by the world size with split_batches, a DistributedSampler,
            in_order=False, non_blocking without device placement, persistent workers
            over an iterable dataset with set_epoch).
        UnsupportedError: a loader without automatic batching (batch_size=None).

    >>> loader, ctx = accel.distribute_loader(DataLoader(data, batch_size=8, shuffle=True), ctx)
    >>> for epoch in range(3):
    ...     loader.set_epoch(epoch)
    ...     for batch in loader: ...
    """
    _check_options(ctx, split_batches, even_batches, dispatch_batches, device_placement,
                   seed, non_blocking)
    _check_loader(loader, ctx, split_batches=split_batches)
    if non_blocking and not device_placement:
        raise IncompatibleOptionsError(
            "non_blocking=True copies batches to the device, but device_placement=False "
            "leaves them where they are; drop one of the two options"
        )
    seed = seed if seed is not None else ctx.seed if ctx.seed is not None else 0
    options = dict(seed=seed, split_batches=split_batches, even_batches=even_batches)
    distributed = DistributedLoader(
        _plan(loader, ctx, dispatch_batches, device_placement, options),
        rank=ctx.dp_rank, world_size=ctx.dp_size,
        device=ctx.device if device_placement else None,
        non_blocking=loader.pin_memory if non_blocking is None else non_blocking,
        batch_size=_per_rank_batch_size(loader, ctx, split_batches),
        dispatch_batches=dispatch_batches, dataset=loader.dataset,
        guard_uneven=has_capability(ctx, COLLECTIVE_BACKWARD),
        feed=_device_feed(ctx, device_placement, dispatch_batches),
        cut=_sequence_cut(ctx), **options)
    _DISTRIBUTED[loader] = True
    non_defaults = [f"{name}={value}" for name, value, default in (
        ("split_batches", split_batches, False), ("even_batches", even_batches, True),
        ("dispatch_batches", dispatch_batches, False),
        ("device_placement", device_placement, True)) if value != default]
    described = ", ".join([f"seed={seed}", *non_defaults])
    return distributed, ctx.record(f"distribute_loader({described})")


def _plan(loader: DataLoader, ctx: Context, dispatch_batches: bool, device_placement: bool,
          options: dict[str, Any]) -> Any:
    """The plan that lays out this rank's batches (see accel.data.sources)."""
    if dispatch_batches:
        device = ctx.device if device_placement else torch.device("cpu")
        return DispatchPlan(loader, ctx, device=device, **options)
    if isinstance(loader.dataset, IterableDataset):
        return IterableShardPlan(loader, ctx.dp_size, ctx.dp_rank, **options)
    return MapShardPlan(loader, ctx.dp_size, ctx.dp_rank, **options)


def _sequence_cut(ctx: Context) -> Any:
    """Under accel.context_parallel: each batch cut to this cp rank's part of the sequences."""
    if not ctx.context_parallel:
        return None
    from accel.data.sequence import cut_sequences

    return functools.partial(cut_sequences, cp_rank=ctx.cp_rank, cp_size=ctx.cp_size)


def _device_feed(ctx: Context, device_placement: bool, dispatch_batches: bool) -> Any:
    """On an XLA device, torch_xla's parallel loader uploads the batches (see backends.xla)."""
    if ctx.device.type != "xla" or not device_placement or dispatch_batches:
        return None
    from accel.backends.xla import device_feed

    return device_feed(ctx)


def _per_rank_batch_size(loader: DataLoader, ctx: Context, split_batches: bool) -> int | None:
    size = _batch_size(loader)
    if size is None or not split_batches:
        return size
    return size // ctx.dp_size


def _batch_size(loader: DataLoader) -> int | None:
    if loader.batch_size is not None:
        return loader.batch_size
    return getattr(loader.batch_sampler, "batch_size", None)


def _check_options(ctx: Any, split_batches: Any, even_batches: Any, dispatch_batches: Any,
                   device_placement: Any, seed: Any, non_blocking: Any) -> None:
    check_context("distribute_loader", ctx)
    for name, value in (("split_batches", split_batches), ("even_batches", even_batches),
                        ("dispatch_batches", dispatch_batches),
                        ("device_placement", device_placement)):
        check_bool("distribute_loader", name, value)
    check_int("distribute_loader", "seed", seed, minimum=0, optional=True)
    check_bool("distribute_loader", "non_blocking", non_blocking, optional=True)


def _check_loader(loader: Any, ctx: Context, *, split_batches: bool) -> None:
    if isinstance(loader, DistributedLoader) or loader in _DISTRIBUTED or isinstance(
            getattr(loader, "dataset", None), IterableShard) or isinstance(
            getattr(loader, "batch_sampler", None), ShardedBatchSampler):
        raise TransformOrderError(
            "distribute_loader was already applied to this loader; apply it once, to the "
            "original DataLoader, and iterate the DistributedLoader it returns"
        )
    check_type("distribute_loader", "loader", loader, DataLoader,
               "a torch.utils.data.DataLoader", error=UnsupportedError)
    if loader.batch_sampler is None:
        raise UnsupportedError(
            "distribute_loader needs a loader with automatic batching; this one has "
            "batch_size=None. Pass batch_size=... (or a batch_sampler) to the DataLoader"
        )
    if isinstance(getattr(loader.batch_sampler, "sampler", None), DistributedSampler):
        raise IncompatibleOptionsError(
            "the loader already uses a DistributedSampler, so its batches would be sharded "
            "twice; build the DataLoader with a plain sampler (shuffle=True or False) and "
            "let distribute_loader shard it"
        )
    if not getattr(loader, "in_order", True):
        raise IncompatibleOptionsError(
            "the loader has in_order=False: batches may come out of order, so the last batch "
            "and the resume position would be wrong; build it with in_order=True"
        )
    if (loader.persistent_workers and isinstance(loader.dataset, IterableDataset)
            and callable(getattr(loader.dataset, "set_epoch", None))):
        raise IncompatibleOptionsError(
            "the loader keeps persistent workers, which hold the copy of the dataset they "
            "started with, so the dataset's set_epoch(epoch) would never reach them and every "
            "epoch would repeat the first one's stream; build it with persistent_workers=False"
        )
    if split_batches:
        _check_split(_batch_size(loader), ctx.dp_size)


def _check_split(batch_size: int | None, world_size: int) -> None:
    if batch_size is None:
        raise IncompatibleOptionsError(
            "split_batches needs a fixed batch size to split, but the loader's batch sampler "
            "has none; pass a batch sampler with a batch_size, or split_batches=False"
        )
    if batch_size % world_size:
        raise IncompatibleOptionsError(
            f"split_batches splits each batch of {batch_size} samples among {world_size} "
            f"ranks, which does not divide; use a batch size that is a multiple of "
            f"{world_size}, or split_batches=False (then {batch_size} is the per-rank size)"
        )


def skip_first_batches(loader: Any, num_batches: int) -> Any:
    """Leave out the first `num_batches` batches of the next epoch only (mid-epoch resume).

    (in place) A DistributedLoader is repositioned and returned, the same object (objects
    linked to it, such as gradient accumulation, keep working); its batch-level skip
    reads no data for map-style datasets. A plain DataLoader is left as it is and a
    rebuilt one returned: over a skipping batch sampler when it has one (no data read),
    else a loader that reads and drops those batches.

    >>> loader = accel.skip_first_batches(loader, 2)
    """
    check_type("skip_first_batches", "loader", loader, (DistributedLoader, DataLoader),
               "a DistributedLoader or a torch DataLoader", error=UnsupportedError)
    check_int("skip_first_batches", "num_batches", num_batches, minimum=0)
    if isinstance(loader, DistributedLoader):
        loader.skip_batches_in_epoch(num_batches)
        return loader
    return _SkippingDataLoader.like(loader, num_batches)


class _SkippingDataLoader(DataLoader):
    """A DataLoader that leaves out its first batches on its first pass only: by index
    where it has a batch sampler (nothing is read), else by reading and dropping them."""

    skip_batches = 0

    @classmethod
    def like(cls, loader: DataLoader, num_batches: int) -> _SkippingDataLoader:
        if loader.batch_sampler is not None and not isinstance(loader.dataset, IterableDataset):
            rebuilt = rebuild_loader(loader, cls,
                                     batch_sampler=SkipFirstBatches(loader.batch_sampler))
        else:
            # An iterable dataset's DataLoader holds a placeholder sampler it refuses back.
            sampler = None if isinstance(loader.dataset, IterableDataset) else loader.sampler
            rebuilt = rebuild_loader(loader, cls, batch_size=loader.batch_size,
                                     drop_last=loader.drop_last, sampler=sampler)
        rebuilt.skip_batches = num_batches
        return rebuilt

    def __iter__(self) -> Any:
        skip, self.skip_batches = self.skip_batches, 0
        if isinstance(self.batch_sampler, SkipFirstBatches):
            # The iterator draws its sampler iterator(s) while it is built.
            self.batch_sampler.skip = skip
            try:
                return super().__iter__()
            finally:
                self.batch_sampler.skip = 0
        iterator = super().__iter__()
        for _ in range(skip):
            if next(iterator, _DONE) is _DONE:
                break
        return iterator


_DONE = object()
