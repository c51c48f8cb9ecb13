"""Samplers that make every rank agree: a seeded random order and batch-level sharding.

Sharding rules (world size n, per-rank batch size b; shown for `BatchSampler(range(22), 3)`
on 2 ranks):

- Batches go round-robin: rank r gets batches r, r+n, r+2n, ... of the original batch
  sampler (rank 0 [0,1,2] [6,7,8] ..., rank 1 [3,4,5] [9,10,11] ...).
- even_batches=True (default): the last round is completed with indices taken from the
  start of the epoch, cycled, so every rank gets the same number of full batches (rank 1's
  last batch is [21, 0, 1]). The duplicated indices are at the end of the last round;
  their count is `remainder`.
- even_batches=False: the last round is kept as it is: some ranks get one batch fewer
  and one batch may be short.
- drop_last=True (on the original loader): an incomplete last round is dropped.
- split_batches=True: every original batch is the global batch; rank r takes its r-th
  slice of b = batch_size / n indices. A short last batch is padded as above (even) or
  split as far as it goes (uneven).
- A batch sampler without a fixed `batch_size` (batches of varying sizes): the last round
  is completed with whole batches from the start of the epoch.
- One process (n = 1) gets the original batches unchanged: nothing to even out.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import RandomSampler, Sampler, SubsetRandomSampler, WeightedRandomSampler

#: torch's random samplers whose only source of randomness is their `generator` attribute.
RESEEDABLE_SAMPLERS = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)


def mix_seed(seed: int, *keys: int) -> int:
    """A 64-bit seed that is a pure function of `seed` and `keys` (epoch, rank, ...).

    Uses numpy's SeedSequence, so (1, 0) and (0, 1) give unrelated streams.
    """
    entropy = [int(seed) % 2**64, *(int(k) % 2**64 for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


class SeededSampler(Sampler[int]):
    """A torch random sampler whose order is a pure function of (seed, epoch).

    Every rank draws the same order without communicating, and a resumed run draws the
    order it drew before. Each epoch iterates a shallow copy of `sampler` whose
    `generator` is seeded with `mix_seed(seed, epoch)`; the wrapped sampler is untouched.

    >>> sampler = SeededSampler(RandomSampler(range(8)), seed=0)
    >>> sampler.set_epoch(1)
    >>> list(sampler) == list(sampler)
    True
    """

    def __init__(self, sampler: RandomSampler | SubsetRandomSampler | WeightedRandomSampler,
                 seed: int):
        self.sampler = sampler
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[int]:
        twin = copy.copy(self.sampler)
        twin.generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return iter(twin)


def batches_per_rank(num_batches: int, world_size: int, *, split_batches: bool,
                     even_batches: bool, drop_last: bool,
                     last_batch_size: int | None = None,
                     batch_size: int | None = None) -> list[int] | None:
    """How many batches each rank gets from `num_batches` original batches (rules above).

    Args:
        last_batch_size, batch_size: the size of the final original batch and the full
            size; only needed for split_batches with even_batches=False, where ranks
            whose slice of a short last batch is empty get one batch fewer (None: unknown).
    """
    m, n = num_batches, world_size
    if n == 1:
        return [m]
    if split_batches:
        if even_batches or drop_last or m == 0:
            return [m] * n
        if last_batch_size is None or batch_size is None:
            return None
        per_rank = batch_size // n
        return [m if r * per_rank < last_batch_size else m - 1 for r in range(n)]
    if drop_last:
        return [m // n] * n
    if even_batches:
        return [-(-m // n)] * n
    return [m // n + (1 if r < m % n else 0) for r in range(n)]


class ShardedBatchSampler(Sampler[list[int]]):
    """One rank's batches of `batch_sampler`, sharded at batch level (see the module doc).

    Args:
        rank: the rank whose batches to yield; None yields every rank's batches in order,
            padded the same way (what rank 0 iterates when it dispatches batches).
        even_batches: complete the last round with indices from the start of the epoch.

    Attributes:
        skip: batches to leave out at the start of each pass (the loader sets it per epoch).
        remainder: duplicated indices in the last round of the latest complete pass
            (None before one).

    >>> list(ShardedBatchSampler(BatchSampler(range(8), 2, False), 2, 1))
    [[2, 3], [6, 7]]
    """

    def __init__(self, batch_sampler: Iterable[list[int]], world_size: int, rank: int | None,
                 *, split_batches: bool = False, even_batches: bool = True):
        self.batch_sampler = batch_sampler
        self.world_size = world_size
        self.rank = rank
        self.split_batches = split_batches
        self.even_batches = even_batches
        #: size of the original batches; None for a batch sampler of varying batch sizes.
        self.batch_size: int | None = getattr(batch_sampler, "batch_size", None)
        self.drop_last = bool(getattr(batch_sampler, "drop_last", False))
        self.skip = 0
        self.remainder: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to the batch sampler and its sampler, where they take one."""
        for part in (self.batch_sampler, getattr(self.batch_sampler, "sampler", None)):
            if callable(getattr(part, "set_epoch", None)):
                part.set_epoch(epoch)

    def counts(self) -> list[int] | None:
        """Batches each rank gets per pass; None when the batch sampler has no length."""
        if not isinstance(self.batch_sampler, Sized):
            return None
        num_batches = len(self.batch_sampler)
        inner = getattr(self.batch_sampler, "sampler", None)
        last = None
        if self.batch_size and isinstance(inner, Sized) and num_batches:
            last = len(inner) - (num_batches - 1) * self.batch_size
        return batches_per_rank(num_batches, self.world_size, split_batches=self.split_batches,
                                even_batches=self.even_batches, drop_last=self.drop_last,
                                last_batch_size=last, batch_size=self.batch_size)

    def __len__(self) -> int:
        counts = self.counts()
        if counts is None:
            raise TypeError("the wrapped batch sampler has no len()")
        if self.rank is None:
            return sum(counts) if not self.split_batches else max(counts)
        return counts[self.rank]

    def __iter__(self) -> Iterator[list[int]]:
        # `skip` is not reset here: DataLoader may call iter() twice for one pass (its
        # multi-process iterator does), so whoever sets it also resets it.
        self.remainder = None
        selected = (batch for round_ in self._rounds() for batch in self._select(round_))
        return itertools.islice(selected, self.skip, None)

    # ------------------------------------------------------------------ rounds

    def _select(self, round_: list[list[int]]) -> list[list[int]]:
        """This rank's batch of a round (or none), or every batch of it for rank None."""
        if self.rank is None:
            whole = [index for batch in round_ for index in batch]
            return [whole] if self.split_batches else round_
        if self.rank < len(round_) and round_[self.rank]:
            return [round_[self.rank]]
        return []

    def _rounds(self) -> Iterator[list[list[int]]]:
        """Lists of per-rank batches; the last one padded or cut as the options say."""
        rounds = self._split_rounds() if self.split_batches else self._whole_rounds()
        last_padding = 0
        for round_, padding in rounds:
            last_padding = padding
            yield round_
        self.remainder = last_padding

    def _whole_rounds(self) -> Iterator[tuple[list[list[int]], int]]:
        n = self.world_size
        head: list[list[int]] = []  # the first n batches, to pad the last round from
        pending: list[list[int]] = []
        for batch, is_final in _flag_final(self.batch_sampler):
            if len(head) < n:
                head.append(batch)
            pending.append(batch)
            if len(pending) == n and not (is_final and self._is_short(batch)):
                yield pending, 0
                pending = []
        if pending and n == 1:
            yield pending, 0
        elif pending and not self.drop_last:
            yield (self._pad_round(pending, head) if self.even_batches else (pending, 0))

    def _pad_round(self, pending: list[list[int]], head: list[list[int]]
                   ) -> tuple[list[list[int]], int]:
        n, size = self.world_size, self.batch_size
        if size is None:  # varying batch sizes: add whole batches from the start
            extra = list(itertools.islice(itertools.cycle(head), n - len(pending)))
            return pending + extra, sum(len(batch) for batch in extra)
        indices = _cycle_indices(head)
        last = pending[-1] + [next(indices) for _ in range(size - len(pending[-1]))]
        extra = [[next(indices) for _ in range(size)] for _ in range(n - len(pending))]
        padded = pending[:-1] + [last] + extra
        return padded, n * size - sum(len(batch) for batch in pending)

    def _split_rounds(self) -> Iterator[tuple[list[list[int]], int]]:
        n, size = self.world_size, self.batch_size
        assert size is not None and size % n == 0, "checked by distribute_loader"
        per_rank = size // n
        head: list[int] = []  # the first global batch, to pad a short last one from
        for batch, is_final in _flag_final(self.batch_sampler):
            if not head:
                head = list(batch)
            padding = 0
            if is_final and len(batch) < size and self.even_batches and n > 1:
                padding = size - len(batch)
                indices = _cycle_indices([head])
                batch = list(batch) + [next(indices) for _ in range(padding)]
            yield [batch[r * per_rank:(r + 1) * per_rank] for r in range(n)], padding

    def _is_short(self, batch: list[int]) -> bool:
        return self.batch_size is not None and len(batch) < self.batch_size


def _flag_final(batches: Iterable[Any]) -> Iterator[tuple[list[int], bool]]:
    """Each batch as a list, with whether it is the last one (one batch of look-ahead)."""
    iterator = iter(batches)
    current = next(iterator, None)
    while current is not None:
        upcoming = next(iterator, None)
        yield list(current), upcoming is None
        current = upcoming


def _cycle_indices(batches: list[list[int]]) -> Iterator[int]:
    """The indices of `batches` in order, over and over (the degenerate case of a dataset
    smaller than one round needs several passes)."""
    return itertools.cycle([index for batch in batches for index in batch])


class SkipFirstBatches(Sampler[list[int]]):
    """`batch_sampler` without its first `skip` batches (0 until someone sets it).

    >>> sampler = SkipFirstBatches(BatchSampler(range(8), 2, False), 3)
    >>> list(sampler)
    [[6, 7]]
    """

    def __init__(self, batch_sampler: Iterable[list[int]], skip: int = 0):
        self.batch_sampler = batch_sampler
        self.skip = skip
        self.batch_size = getattr(batch_sampler, "batch_size", None)
        self.drop_last = getattr(batch_sampler, "drop_last", False)

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batch_sampler), self.skip, None)
