"""Sharding of iterable datasets: each rank keeps its slice of every group of items.

Every rank iterates the whole stream and cuts it into groups of G = n * b items (world
size n, per-rank batch size b; with split_batches G is the loader's batch size). Rank r
keeps items [r*b, (r+1)*b) of each group, which the loader batches into one batch: so a
step's batches, concatenated in rank order, are G consecutive items of the stream.

The last, incomplete group (g < G items):
- even_batches=True: completed with the first items of the stream, cycled (the stream's
  first group is kept in memory for this), so every rank gets the same number of full
  batches; the G - g duplicated items are at the end of the group.
- even_batches=False: cut as it is; ranks whose slice is empty get one batch fewer.
- drop_last=True: dropped.

Every batch carries how many duplicated items its group holds (`PaddedBatch`), so the
loader knows exactly what `gather_for_metrics` must drop, also when DataLoader workers
run the shard. With several workers, each worker's stream is grouped and padded on its
own (the dataset decides what each worker sees, as in plain PyTorch).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch.utils.data import IterableDataset
from torch.utils.data._utils.pin_memory import pin_memory


class IterableShard(IterableDataset):
    """One rank's items of `dataset`, each as (item, duplicated items in its group).

    Args:
        batch_size: items per rank per group (b above).
        rank: whose items to keep; None keeps every rank's (padded) items in order.

    >>> shard = IterableShard(stream, batch_size=2, world_size=2, rank=1)
    >>> [item for item, _ in shard]          # stream of 0..7
    [2, 3, 6, 7]
    """

    def __init__(self, dataset: Iterable[Any], *, batch_size: int, world_size: int,
                 rank: int | None, even_batches: bool = True, drop_last: bool = False):
        self.dataset = dataset
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.even_batches = even_batches
        self.drop_last = drop_last
        self._head: list[Any] = []      # the stream's first group (to pad the last one)
        self._resumed_head: list[Any] | None = None


    def set_epoch(self, epoch: int) -> None:
        if callable(getattr(self.dataset, "set_epoch", None)):
            self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        group_size = self.batch_size * self.world_size
        # a resumed stream starts after its first group: that group comes from the state
        head = self._head = [] if self._resumed_head is None else self._resumed_head
        self._resumed_head = None
        group: list[Any] = []
        for item in self.dataset:
            if len(head) < group_size:
                head.append(item)
            group.append(item)
            if len(group) == group_size:
                yield from self._select(group, 0)
                group = []
        if not group or self.drop_last:
            return
        if not self.even_batches or self.world_size == 1:
            yield from self._select(group, 0)
            return
        padding = group_size - len(group)
        group.extend(itertools.islice(itertools.cycle(head), padding))
        yield from self._select(group, padding)

    def _select(self, group: list[Any], padding: int) -> Iterator[tuple[Any, int]]:
        mine = group if self.rank is None else \
            group[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        for item in mine:
            yield item, padding


class StatefulShard(IterableShard):
    """An `IterableShard` of a dataset that keeps its position: it saves and restores it
    (torchdata's Stateful protocol, so a StatefulDataLoader's workers do too)."""

    def state_dict(self) -> dict[str, Any]:
        """Where the dataset is (its own state) and the stream's first group, for padding.

        Taken between groups (after a batch of this rank); see `accel.data.stateful`.
        """
        state: dict[str, Any] = {"source": self.dataset.state_dict()}
        if self.even_batches and not self.drop_last and self.world_size > 1:
            state["head"] = list(self._head)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the stream where `state_dict` was taken (the next iteration)."""
        self.dataset.load_state_dict(state["source"])
        self._resumed_head = list(state.get("head", []))


class PaddedBatch:
    """A collated batch with the number of duplicated items in its step's global batch."""

    __slots__ = ("batch", "padding")

    def __init__(self, batch: Any, padding: int):
        self.batch = batch
        self.padding = padding

    def pin_memory(self) -> PaddedBatch:
        # DataLoader's pin-memory thread calls this; pin the batch, keep the count.
        return PaddedBatch(pin_memory(self.batch), self.padding)


class PaddingAwareCollate:
    """Collate (item, padding) pairs from `IterableShard` with the user's collate_fn."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]):
        self.collate_fn = collate_fn

    def __call__(self, pairs: list[tuple[Any, int]]) -> PaddedBatch:
        batch = self.collate_fn([item for item, _ in pairs])
        return PaddedBatch(batch, max((padding for _, padding in pairs), default=0))


def iterable_batches_per_rank(num_items: int, batch_size: int, world_size: int, *,
                              even_batches: bool, drop_last: bool) -> list[int]:
    """Batches each rank gets from a single stream of `num_items` items (rules above)."""
    group_size = batch_size * world_size
    full, rest = divmod(num_items, group_size)
    if rest == 0 or drop_last:
        return [full] * world_size
    if even_batches or world_size == 1:
        return [full + 1] * world_size
    return [full + (1 if r * batch_size < rest else 0) for r in range(world_size)]
