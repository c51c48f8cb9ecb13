"""distribute_loader and friends, one process: sharding tables, epochs, resume, errors.

Rank-dependent layouts need no collective, so they run under `fake_world(rank, 2)`; the
collectives (gather, dispatch, gather_for_metrics, workers) are in test_data_spawned.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    SequentialSampler,
)

from accel import Context
from accel.data import (
    DistributedLoader,
    IterableShard,
    SeededSampler,
    ShardedBatchSampler,
    distribute_loader,
    gather_for_metrics,
    skip_first_batches,
)
from accel.errors import (
    IncompatibleOptionsError,
    InvalidArgumentError,
    TransformOrderError,
    UnsupportedError,
)
from accel.testing import fake_world

# --------------------------------------------------------------------------- datasets
# Module level, so DataLoader workers and spawned ranks can unpickle them.


class Stream(IterableDataset):
    """0, 1, ..., n-1 without len(): a stream that can only be iterated."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))


class SeededStream(IterableDataset):
    """range(n) in an order that is a pure function of (seed, epoch), as a shuffling
    streaming dataset would draw it."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


class WorkerSplitStream(IterableDataset):
    """range(n), each DataLoader worker reading every num_workers-th item (torch's recipe)."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        start, step = (0, 1) if info is None else (info.id, info.num_workers)
        return iter(range(start, self.n, step))


class Records(Dataset):
    """Samples with a tensor and a string: batches mix tensors and per-sample lists."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return {"x": torch.tensor(index), "id": f"s{index}"}


class EpochAware(Dataset):
    """range(n) that remembers the epochs it was told."""

    def __init__(self, n: int):
        self.n, self.epochs = n, []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


class EpochAwareSampler(SequentialSampler):
    def __init__(self, data):
        super().__init__(data)
        self.epochs = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)


# --------------------------------------------------------------------------- helpers


def as_lists(loader) -> list[list[int]]:
    return [batch.tolist() for batch in loader]


def shard(dataset, rank: int, *, world_size: int = 2, batch_size: int = 3,
          drop_last: bool = False, **options) -> list[list[int]]:
    """Rank `rank`'s batches of one epoch (no collective, so a fake world serves)."""
    with fake_world(rank, world_size) as ctx:
        loader, _ = distribute_loader(
            DataLoader(dataset, batch_size=batch_size, drop_last=drop_last), ctx, **options)
        return as_lists(loader)


def both_ranks(dataset, **kwargs) -> list[list[list[int]]]:
    return [shard(dataset, rank, **kwargs) for rank in range(2)]


# --------------------------------------------------------------------------- sharding tables


def test_map_style_batches_go_round_robin_to_the_ranks():
    assert both_ranks(range(24)) == [
        [[0, 1, 2], [6, 7, 8], [12, 13, 14], [18, 19, 20]],
        [[3, 4, 5], [9, 10, 11], [15, 16, 17], [21, 22, 23]],
    ]


def test_even_batches_completes_the_last_batch_from_the_start():
    rank0, rank1 = both_ranks(range(22))
    assert rank0 == [[0, 1, 2], [6, 7, 8], [12, 13, 14], [18, 19, 20]]
    assert rank1 == [[3, 4, 5], [9, 10, 11], [15, 16, 17], [21, 0, 1]]


def test_a_dataset_smaller_than_one_batch_is_cycled():
    assert both_ranks(range(2)) == [[[0, 1, 0]], [[1, 0, 1]]]


def test_uneven_batches_give_some_ranks_one_batch_fewer():
    assert both_ranks(range(3), batch_size=1, even_batches=False) == [[[0], [2]], [[1]]]
    with fake_world(1, 2) as ctx:
        loader, _ = distribute_loader(DataLoader(range(3), batch_size=1), ctx,
                                      even_batches=False)
        assert (loader.batches_per_rank, len(loader), loader.even_batches) == ([2, 1], 1, False)


def test_drop_last_drops_the_incomplete_round():
    rank0, rank1 = both_ranks(range(22), drop_last=True)
    assert rank0 == [[0, 1, 2], [6, 7, 8], [12, 13, 14]]
    assert rank1 == [[3, 4, 5], [9, 10, 11], [15, 16, 17]]


def test_split_batches_gives_each_rank_its_slice_of_every_batch():
    assert both_ranks(range(10), batch_size=4, split_batches=True) == [
        [[0, 1], [4, 5], [8, 9]],
        [[2, 3], [6, 7], [0, 1]],
    ]
    assert both_ranks(range(10), batch_size=4, split_batches=True, even_batches=False) == [
        [[0, 1], [4, 5], [8, 9]],
        [[2, 3], [6, 7]],
    ]


def test_one_process_gets_the_original_batches():
    assert as_lists(distribute_loader(DataLoader(range(5), batch_size=2), Context())[0]) == [
        [0, 1], [2, 3], [4]]


def test_dispatching_in_one_process_yields_the_original_batches():
    loader, _ = distribute_loader(DataLoader(range(5), batch_size=2), Context(),
                                  dispatch_batches=True)
    assert as_lists(loader) == [[0, 1], [2, 3], [4]]
    assert (loader.batches_per_rank, loader.is_last_batch, loader.epoch) == ([3], False, 1)


def test_a_batch_sampler_of_varying_sizes_is_padded_with_whole_batches():
    batches = [[0, 1, 2], [3], [4, 5]]
    results = []
    for rank in range(2):
        with fake_world(rank, 2) as ctx:
            loader, _ = distribute_loader(DataLoader(range(6), batch_sampler=batches), ctx)
            results.append((as_lists(loader), loader.remainder, loader.batches_per_rank))
    assert results == [([[0, 1, 2], [4, 5]], 3, [2, 2]), ([[3], [0, 1, 2]], 3, [2, 2])]


@pytest.mark.parametrize(("options", "expected"), [
    ({}, [[[0, 1, 2, 3], [8, 9, 10, 11], [16, 17, 18, 19]],
          [[4, 5, 6, 7], [12, 13, 14, 15], [20, 21, 0, 1]]]),
    ({"even_batches": False}, [[[0, 1, 2, 3], [8, 9, 10, 11], [16, 17, 18, 19]],
                               [[4, 5, 6, 7], [12, 13, 14, 15], [20, 21]]]),
    ({"drop_last": True}, [[[0, 1, 2, 3], [8, 9, 10, 11]], [[4, 5, 6, 7], [12, 13, 14, 15]]]),
    ({"split_batches": True, "batch_size": 8},
     [[[0, 1, 2, 3], [8, 9, 10, 11], [16, 17, 18, 19]],
      [[4, 5, 6, 7], [12, 13, 14, 15], [20, 21, 0, 1]]]),
])
def test_iterable_datasets_shard_each_group_of_items(options, expected):
    options = {"batch_size": 4, **options}
    assert both_ranks(Stream(22), **options) == expected


def test_an_iterable_rank_whose_last_slice_is_empty_gets_one_batch_fewer():
    assert both_ranks(Stream(18), batch_size=4, even_batches=False) == [
        [[0, 1, 2, 3], [8, 9, 10, 11], [16, 17]],
        [[4, 5, 6, 7], [12, 13, 14, 15]],
    ]


@pytest.mark.parametrize("dataset", [range(22), Stream(22)], ids=["map", "iterable"])
def test_the_last_step_reports_how_many_samples_are_duplicates(dataset):
    with fake_world(1, 2) as ctx:
        loader, _ = distribute_loader(DataLoader(dataset, batch_size=4), ctx)
        steps = [(loader.is_last_batch, loader.batch_padding) for _ in loader]
        assert steps == [(False, 0), (False, 0), (True, 2)]
        assert loader.remainder == 2


def test_batches_per_rank_is_known_without_iterating():
    with fake_world(0, 2) as ctx:
        assert distribute_loader(DataLoader(range(22), batch_size=3), ctx)[0].batches_per_rank \
            == [4, 4]
        iterable, _ = distribute_loader(DataLoader(Stream(22), batch_size=3), ctx)
        assert iterable.batches_per_rank is None
        with pytest.raises(TypeError, match="length is unknown"):
            len(iterable)


# --------------------------------------------------------------------------- random order


def shuffled_epochs(ctx: Context, epochs: int = 2, **options) -> list[list[list[int]]]:
    loader, _ = distribute_loader(DataLoader(range(32), batch_size=4, shuffle=True), ctx,
                                  **options)
    return [as_lists(loader) for _ in range(epochs)]


def test_shuffled_ranks_share_one_permutation_per_epoch():
    per_rank = []
    for rank in range(2):
        with fake_world(rank, 2) as ctx:
            torch.manual_seed(rank)  # the global RNG must not matter
            per_rank.append(shuffled_epochs(ctx, seed=7))
    for epoch in range(2):
        seen = [i for rank in range(2) for batch in per_rank[rank][epoch] for i in batch]
        assert sorted(seen) == list(range(32))
    assert per_rank[0][0] != per_rank[0][1], "each epoch draws a new order"
    assert per_rank[0][0] != [[0, 1, 2, 3], [8, 9, 10, 11], [16, 17, 18, 19], [24, 25, 26, 27]]


def test_the_order_is_a_function_of_seed_and_epoch():
    explicit = shuffled_epochs(Context(), seed=7)
    assert shuffled_epochs(Context(seed=7)) == explicit, "the seed defaults to ctx.seed"
    assert shuffled_epochs(Context(), seed=8) != explicit
    assert shuffled_epochs(Context()) == shuffled_epochs(Context(), seed=0), "then to 0"
    loader, _ = distribute_loader(DataLoader(range(32), batch_size=4, shuffle=True), Context(),
                                  seed=7)
    loader.set_epoch(1)
    assert as_lists(loader) == explicit[1], "set_epoch(1) equals the second pass"
    assert loader.seed == 7


def test_the_users_samplers_are_not_modified():
    inner = torch.utils.data.RandomSampler(range(10))
    sampler = SeededSampler(inner, seed=3)
    assert list(sampler) == list(sampler) and sorted(sampler) == list(range(10))
    batch_sampler = BatchSampler(inner, 2, False)
    distribute_loader(DataLoader(range(10), batch_sampler=batch_sampler), Context())
    assert batch_sampler.sampler is inner and inner.generator is None


def test_set_epoch_reaches_the_dataset_and_the_sampler():
    dataset = EpochAware(8)
    sampler = EpochAwareSampler(dataset)
    loader, _ = distribute_loader(DataLoader(dataset, batch_size=2, sampler=sampler),
                                  Context())
    loader.set_epoch(5)
    list(loader)
    list(loader)
    assert dataset.epochs == [5, 6] and sampler.epochs == [5, 6]


# --------------------------------------------------------------------------- epochs, resume


def test_is_last_batch_marks_the_final_batch_and_the_epoch_advances():
    loader, _ = distribute_loader(DataLoader(range(6), batch_size=2), Context())
    assert [(loader.is_last_batch, loader.epoch) for _ in loader] == [
        (False, 0), (False, 0), (True, 0)]
    assert (loader.epoch, loader.is_last_batch) == (1, False)


def test_state_taken_on_the_last_batch_points_at_the_next_epoch():
    loader, _ = distribute_loader(DataLoader(range(6), batch_size=2), Context())
    for _ in loader:
        state = loader.state_dict()
    assert (state["epoch"], state["batches_yielded"]) == (1, 0)
    for _ in loader:
        if loader.is_last_batch:
            break  # stopping on the last batch still completes the epoch
    assert loader.state_dict()["epoch"] == 2
    assert loader.is_last_batch, "still holding the last batch"


def resume_run(make_loader, rank: int, stop_at: int = 2):
    """Two epochs straight, and the same two epochs stopped after `stop_at` batches and
    resumed by a new loader from the state_dict."""
    with fake_world(rank, 2) as ctx:
        straight = make_loader(ctx)
        expected = [batch for _ in range(2) for batch in straight]
        first = make_loader(ctx)
        seen = []
        for batch in first:
            seen.append(batch)
            if len(seen) == stop_at:
                state = first.state_dict()
                break
        second = make_loader(ctx)
        second.load_state_dict(state)
        for _ in range(2):  # the rest of epoch 0, then epoch 1
            seen.extend(second)
        assert second.epoch == 2
    return expected, seen, state


@pytest.mark.parametrize("kind", ["map", "iterable"])
def test_a_resumed_loader_yields_the_same_remaining_batches(kind):
    def make_loader(ctx):
        dataset = range(40) if kind == "map" else SeededStream(40, seed=1)
        source = DataLoader(dataset, batch_size=3, shuffle=kind == "map")
        return distribute_loader(source, ctx, seed=11)[0]

    expected, seen, state = resume_run(make_loader, rank=1)
    assert (state["epoch"], state["batches_yielded"]) == (0, 2)
    assert len(seen) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(seen, expected, strict=True))


def test_set_epoch_after_loading_keeps_the_position_only_for_that_epoch():
    def make():
        return distribute_loader(DataLoader(range(8), batch_size=2), Context())[0]

    loader = make()
    loader.load_state_dict({"epoch": 3, "batches_yielded": 2, "seed": 0})
    loader.set_epoch(3)
    assert as_lists(loader) == [[4, 5], [6, 7]]
    loader = make()
    loader.load_state_dict({"epoch": 3, "batches_yielded": 2, "seed": 0})
    loader.set_epoch(4)
    assert len(as_lists(loader)) == 4


def test_a_state_from_another_seed_is_refused():
    loader, _ = distribute_loader(DataLoader(range(8), batch_size=2), Context(), seed=1)
    with pytest.raises(IncompatibleOptionsError, match="seed=2"):
        loader.load_state_dict({"epoch": 0, "batches_yielded": 1, "seed": 2})


@pytest.mark.parametrize("make", [
    lambda: distribute_loader(DataLoader(range(16), batch_size=4), Context())[0],
    lambda: DataLoader(range(16), batch_size=4),
    lambda: DataLoader(Stream(16), batch_size=4),
], ids=["distributed", "plain", "plain-iterable"])
def test_skip_first_batches_skips_in_the_resumed_epoch_only(make):
    loader = skip_first_batches(make(), 2)
    assert as_lists(loader) == [[8, 9, 10, 11], [12, 13, 14, 15]]
    assert len(as_lists(loader)) == 4


def test_skip_first_batches_repositions_a_distributed_loader_in_place():
    loader, _ = distribute_loader(DataLoader(range(16), batch_size=4), Context())
    assert skip_first_batches(loader, 3) is loader
    assert loader.state_dict()["batches_yielded"] == 3
    with pytest.raises(InvalidArgumentError, match="num_batches"):
        skip_first_batches(loader, -1)


# --------------------------------------------------------------------------- placement, record


def test_batches_move_to_the_context_device():
    loader, ctx = distribute_loader(DataLoader(range(4), batch_size=2), Context(device="meta"))
    assert {batch.device.type for batch in loader} == {"meta"}
    assert loader.non_blocking is False, "follows pin_memory by default"
    kept, _ = distribute_loader(DataLoader(range(4), batch_size=2), Context(device="meta"),
                                device_placement=False)
    assert {batch.device.type for batch in kept} == {"cpu"}
    assert ctx.applied == ("distribute_loader(seed=0)",)
    assert ctx.was_applied("distribute_loader")


def test_mixed_batches_keep_their_structure():
    loader, _ = distribute_loader(DataLoader(Records(4), batch_size=2), Context())
    batch = next(iter(loader))
    assert batch["x"].tolist() == [0, 1] and batch["id"] == ["s0", "s1"]


def test_gather_for_metrics_in_one_process_returns_the_batch():
    loader, ctx = distribute_loader(DataLoader(Records(5), batch_size=2), Context())
    ids = [i for batch in loader for i in gather_for_metrics(batch["id"], ctx, loader)]
    assert ids == [f"s{i}" for i in range(5)]
    with pytest.raises(UnsupportedError, match="DistributedLoader"):
        gather_for_metrics(torch.ones(2), ctx, DataLoader(range(2)))


# --------------------------------------------------------------------------- errors


def test_distributing_twice_is_refused():
    source = DataLoader(range(8), batch_size=2)
    loader, ctx = distribute_loader(source, Context())
    with pytest.raises(TransformOrderError, match="already applied"):
        distribute_loader(loader, ctx)
    with pytest.raises(TransformOrderError, match="already applied"):
        distribute_loader(source, ctx)
    with pytest.raises(TransformOrderError, match="already applied"):
        distribute_loader(loader.dataloader, ctx)
    assert isinstance(loader, DistributedLoader)


@pytest.mark.parametrize(("source", "options", "error", "message"), [
    (lambda: DataLoader(range(9), batch_size=3), {"split_batches": True},
     IncompatibleOptionsError, "multiple of 2"),
    (lambda: DataLoader(range(9), batch_sampler=[[0, 1], [2]]), {"split_batches": True},
     IncompatibleOptionsError, "fixed batch size"),
    (lambda: DataLoader(range(9), batch_size=None), {}, UnsupportedError, "batch_size=None"),
    (lambda: DataLoader(range(9), batch_size=2, in_order=False), {},
     IncompatibleOptionsError, "in_order"),
    (lambda: DataLoader(range(9), batch_size=2), {"device_placement": False, "non_blocking": True},
     IncompatibleOptionsError, "non_blocking"),
    (lambda: [1, 2], {}, UnsupportedError, "DataLoader"),
    (lambda: DataLoader(SeededStream(8), batch_size=2, num_workers=1, persistent_workers=True),
     {}, IncompatibleOptionsError, "persistent_workers=False"),
])
def test_options_that_cannot_be_honoured_are_refused(source, options, error, message):
    with fake_world(0, 2) as ctx, pytest.raises(error, match=message):
        distribute_loader(source(), ctx, **options)


def test_a_loader_sharded_by_a_distributed_sampler_is_refused():
    with fake_world(0, 2) as ctx:
        sampler = DistributedSampler(range(8), num_replicas=2, rank=0)
        with pytest.raises(IncompatibleOptionsError, match="DistributedSampler"):
            distribute_loader(DataLoader(range(8), batch_size=2, sampler=sampler), ctx)


def test_batch_level_sharding_reads_no_other_ranks_samples():
    class Counting(Dataset):
        def __init__(self):
            self.read = []

        def __len__(self):
            return 12

        def __getitem__(self, index):
            self.read.append(index)
            return index

    dataset = Counting()
    with fake_world(1, 2) as ctx:
        loader, _ = distribute_loader(DataLoader(dataset, batch_size=3), ctx)
        skip_first_batches(loader, 1)
        assert as_lists(loader) == [[9, 10, 11]]
    assert dataset.read == [9, 10, 11], "the skipped batch and rank 0's were never read"


# --------------------------------------------------------------------------- properties


def steps_in_rank_order(per_rank: list[list[list[int]]]) -> list[int]:
    """What per-step gathers concatenate to: step by step, rank by rank."""
    steps = max(len(batches) for batches in per_rank)
    return [i for step in range(steps) for batches in per_rank if step < len(batches)
            for i in batches[step]]


@settings(max_examples=150, deadline=None)
@given(num_items=st.integers(0, 40), per_rank=st.integers(1, 5), world_size=st.integers(1, 4),
       split=st.booleans(), even=st.booleans(), drop_last=st.booleans(),
       iterable=st.booleans())
def test_steps_hold_every_sample_once_plus_the_reported_padding(
        num_items, per_rank, world_size, split, even, drop_last, iterable):
    batch_size = per_rank * world_size if split else per_rank
    group = per_rank * world_size
    layouts = []
    for rank in range(world_size):
        if iterable:
            shard_ = IterableShard(range(num_items), batch_size=per_rank, world_size=world_size,
                                   rank=rank, even_batches=even, drop_last=drop_last)
            items = [(item, padding) for item, padding in shard_]
            batches = [[i for i, _ in items[k:k + per_rank]]
                       for k in range(0, len(items), per_rank)]
            paddings = {padding for _, padding in items[-per_rank:]} or {0}
            layouts.append((batches, None, paddings.pop()))
        else:
            sampler = ShardedBatchSampler(BatchSampler(range(num_items), batch_size, drop_last),
                                          world_size, rank, split_batches=split,
                                          even_batches=even)
            batches = list(sampler)
            layouts.append((batches, sampler.counts(), sampler.remainder))
    per_rank_batches = [batches for batches, _, _ in layouts]
    flat = steps_in_rank_order(per_rank_batches)
    padding = layouts[0][2]
    usable = num_items // group * group if drop_last else num_items
    assert flat[:len(flat) - padding] == list(range(usable))
    if even or drop_last:
        assert len({len(batches) for batches in per_rank_batches}) == 1
    for _, counts, _ in layouts:
        assert counts is None or counts == [len(b) for b in per_rank_batches]
