"""Dispatching: rank 0 iterates the loader and sends every rank its part of each step.

For streams that cannot be sharded by index (an IterableDataset without len, a reader
that must run once), or data that only rank 0 can read. Rank 0 iterates a loader laid
out exactly like the sharded ones (same batches, same padding, see `samplers` and
`iterable`), but holding every rank's batches: without split_batches it takes n
consecutive batches per step, with split_batches one global batch per step. It
broadcasts a small header (structure, tensor shapes, each rank's sample count, padding,
whether this is the last step) and then the tensors; every rank keeps its slice.

Every rank must take part in every step: stop all ranks at the same step, or none.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset

from accel.context import Context
from accel.data.batches import allocate, batch_length, concat_batches, skeleton, slice_batch
from accel.data.sources import IterableShardPlan, MapShardPlan


class _Step(NamedTuple):
    batch: Any            # every rank's samples, concatenated in rank order
    lengths: list[int]    # samples of each rank
    padding: int | None   # duplicated samples; None: ask the source at the end


class DispatchPlan:
    """Rank 0 reads, every rank receives its slice of each step (see the module doc)."""

    def __init__(self, loader: DataLoader, ctx: Context, *, seed: int, split_batches: bool,
                 even_batches: bool, device: torch.device):
        kind = IterableShardPlan if isinstance(loader.dataset, IterableDataset) else MapShardPlan
        self.source = kind(loader, ctx.dp_size, None, seed=seed,
                           split_batches=split_batches, even_batches=even_batches)
        self.dataloader = self.source.dataloader
        self.ctx = ctx
        self.split_batches = split_batches
        self.per_rank_batch_size = (loader.batch_size // ctx.dp_size if split_batches
                                    else loader.batch_size)
        #: where received tensors live (rank 0 moves its batches there before sending).
        self.device = device

    def iterate(self, epoch: int, skip: int) -> Iterator[tuple[Any, int | None]]:
        if self.ctx.rank == 0:
            return self._read_and_send(epoch, skip)
        return self._receive()

    def counts(self) -> list[int] | None:
        return self.source.counts()

    def final_padding(self) -> int:
        return 0  # each step's header carries its own

    # ------------------------------------------------------------------ rank 0

    def _read_and_send(self, epoch: int, skip: int) -> Iterator[tuple[Any, int]]:
        steps = self._steps(epoch, skip)
        current = next(steps, None)
        if current is None:  # an empty epoch still needs one message, or the others wait
            self._exchange(None, [0] * self.ctx.dp_size, 0, last=True)
            return
        while current is not None:
            upcoming = next(steps, None)  # look ahead: the header says which step is last
            last = upcoming is None
            padding = current.padding
            if padding is None:
                padding = self.source.final_padding() if last else 0
            piece, _, _ = self._exchange(current.batch, current.lengths, padding, last=last)
            if piece is not None:
                yield piece, padding
            current = upcoming

    def _steps(self, epoch: int, skip: int) -> Iterator[_Step]:
        n = self.ctx.dp_size
        pairs = self.source.iterate(epoch, skip if self.split_batches else skip * n)
        if self.split_batches:
            size = self.per_rank_batch_size
            for batch, padding in pairs:
                total = batch_length(batch)
                lengths = [min(size, max(0, total - r * size)) for r in range(n)]
                yield _Step(batch, lengths, padding)
            return
        while group := list(itertools.islice(pairs, n)):
            batches = [batch for batch, _ in group]
            paddings = [padding for _, padding in group if padding is not None]
            lengths = [batch_length(batch) for batch in batches] + [0] * (n - len(group))
            yield _Step(concat_batches(batches), lengths, max(paddings) if paddings else None)

    # ------------------------------------------------------------------ every rank

    def _receive(self) -> Iterator[tuple[Any, int]]:
        while True:
            piece, padding, last = self._exchange(None, None, None, last=False)
            if piece is not None:
                yield piece, padding
            if last:
                return

    def _exchange(self, batch: Any, lengths: list[int] | None, padding: int | None, *,
                  last: bool) -> tuple[Any, int, bool]:
        """One step's broadcast; rank 0 passes the step, the others None. Returns this
        rank's slice (None when it has no samples), the padding and whether it was last."""
        from accel.runtime.ops import broadcast, broadcast_object, send_to_device

        ctx = self.ctx
        header = None
        if ctx.rank == 0:
            if batch is not None:
                batch = send_to_device(batch, self.device)
            header = (None if batch is None else skeleton(batch), lengths, padding, last)
        spec, lengths, padding, last = broadcast_object(header, ctx, src=0)
        if spec is None:
            return None, padding, last
        received = broadcast(batch if ctx.rank == 0 else allocate(spec, self.device), ctx, src=0)
        if ctx.rank == 0:
            received = batch  # broadcast returned a copy; rank 0 keeps its own tensors
        # Ranks of one data-parallel group (tp, cp peers) take the same slice.
        rank = ctx.dp_rank
        if not lengths[rank]:
            return None, padding, last
        start = sum(lengths[:rank])
        return slice_batch(received, start, start + lengths[rank]), padding, last
