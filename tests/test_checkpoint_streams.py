"""Streams that resume from their own state: no batch is read twice.

`distribute_loader` over an iterable dataset that keeps its position (torchdata's
Stateful protocol, a Hugging Face `datasets` streaming dataset) or over torchdata's
`StatefulDataLoader` saves the source's state with the loader's position; a loader
restored from it continues the stream there. Each rank of a (fake) two-rank world is
checked: the remaining batches equal an uninterrupted run's, and the source is read only
from the resume point on (its reads are counted). A stream without a state still
resumes, by reading again and dropping the batches already seen.
"""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

import accel
from accel.checkpoint import load_state, save_state
from accel.testing import fake_world


class Counting(IterableDataset):
    """0.0, 1.0, ..., n-1 as one-element tensors, counting every item it reads."""

    def __init__(self, n: int, stateful: bool = True):
        self.n, self.stateful = n, stateful
        self.start = self.position = self.reads = 0

    def __iter__(self):
        self.position, self.start = self.start, 0
        while self.position < self.n:
            self.position += 1
            self.reads += 1
            yield torch.tensor([self.position - 1.0])


class StatefulCounting(Counting):
    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.start = state["position"]


def taken(batches, count: int | None = None) -> list[list[float]]:
    """The next `count` batches (all that are left: None) of an iterator, as lists."""
    return [batch.flatten().tolist() for batch in itertools.islice(batches, count)]


def resume(make_source, make_loader, rank: int, first: int):
    """(an uninterrupted run's rest, the resumed run's rest, the resumed source's reads)."""
    with fake_world(rank, 2) as ctx:
        source = make_source()
        loader, _ = accel.distribute_loader(make_loader(source), ctx, seed=0)
        batches = iter(loader)
        taken(batches, first)
        state = loader.state_dict()
        rest = taken(batches)
        again = make_source()
        resumed, _ = accel.distribute_loader(make_loader(again), ctx, seed=0)
        resumed.load_state_dict(state)
        return rest, taken(iter(resumed)), again, state


@pytest.mark.parametrize("rank", [0, 1])
def test_a_stateful_dataset_resumes_without_reading_the_start_again(rank):
    # 30 items, 2 ranks x 4: groups of 8; 3 batches taken = 24 items read
    rest, resumed, source, state = resume(
        lambda: StatefulCounting(30), lambda data: DataLoader(data, batch_size=4), rank, 3)
    assert resumed == rest and len(rest) == 1  # the last group: 6 items and 2 of padding
    assert state["source"]["source"] == {"position": 24}
    assert source.reads == 6  # the rest of the stream only
    assert resumed[0][:2 if rank else 4] == [24.0 + 4 * rank + i for i in range(2 if rank else 4)]


def test_a_stream_without_a_state_still_resumes_by_reading_again():
    rest, resumed, source, state = resume(
        lambda: Counting(30), lambda data: DataLoader(data, batch_size=4), 0, 3)
    assert resumed == rest and "source" not in state
    assert source.reads == 30  # read from the start, the first 3 batches dropped


@pytest.mark.skipif(importlib.util.find_spec("torchdata") is None,
                    reason="torchdata is not installed (pip install 'accel[streaming]')")
def test_a_stateful_dataloader_resumes_from_its_own_state():
    from torchdata.stateful_dataloader import StatefulDataLoader

    rest, resumed, source, state = resume(
        lambda: StatefulCounting(40), lambda data: StatefulDataLoader(data, batch_size=4), 1, 2)
    assert resumed == rest and len(rest) == 3
    assert source.reads == 40 - 16  # two groups of 8 were read before the save
    # over a stream without a state, the StatefulDataLoader reads it again and drops
    rest, resumed, source, _ = resume(
        lambda: Counting(40), lambda data: StatefulDataLoader(data, batch_size=4), 1, 2)
    assert resumed == rest and source.reads == 40


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None,
                    reason="datasets is not installed (pip install 'accel[streaming]')")
def test_a_datasets_stream_resumes_mid_epoch_through_a_checkpoint(tmp_path):
    import datasets

    reads = []
    stream = datasets.Dataset.from_dict({"x": list(range(36))}).to_iterable_dataset(
        num_shards=3).map(lambda row: reads.append(row["x"]) or row)

    def batches(iterator, count=None):
        return [batch["x"].tolist() for batch in itertools.islice(iterator, count)]

    ctx = accel.Context()
    loader, ctx = accel.distribute_loader(DataLoader(stream, batch_size=5), ctx, seed=0)
    model = torch.nn.Linear(1, 1)
    iterator = iter(loader)
    first = batches(iterator, 3)
    path = save_state(tmp_path / "ckpt", ctx, model=model, loader=loader)
    rest = batches(iterator)
    reads.clear()
    resumed, ctx = accel.distribute_loader(DataLoader(stream, batch_size=5), accel.Context(),
                                           seed=0)
    load_state(path, ctx, model=model, loader=resumed)
    again = batches(iter(resumed))
    assert first[0] == [0, 1, 2, 3, 4] and again == rest
    assert reads == [x for batch in rest for x in batch]  # nothing before the resume point

