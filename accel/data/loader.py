"""`DistributedLoader`: one rank's batches of a DataLoader, with epochs and exact resume."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from accel.errors import UnsupportedError

_END = object()


class DistributedLoader:
    """One rank's view of a DataLoader; built by `distribute_loader`.

    Iterating gives this rank's batches of the current epoch, on `device`. A completed
    pass advances `epoch` by one, so a loop that calls `set_epoch(epoch)` each epoch and
    one that never does see the same batches. The loader reads one batch ahead: that is
    how `is_last_batch` is known while you hold the last batch (and it lets a pinned batch
    travel to the GPU while you compute).

    Attributes:
        even_batches, split_batches, dispatch_batches: the options it was built with.
        seed: the seed of its random order (see `distribute_loader`).
        batch_size: samples per batch on this rank (the last one may be shorter).

    One iteration at a time: starting a new one abandons the previous one.

    >>> loader, ctx = accel.distribute_loader(loader, ctx)
    >>> for batch in loader:
    ...     train_step(batch)
    """

    def __init__(self, plan: Any, *, rank: int, world_size: int, device: torch.device | None,
                 non_blocking: bool, seed: int, batch_size: int | None, split_batches: bool,
                 even_batches: bool, dispatch_batches: bool, dataset: Any,
                 guard_uneven: bool = False, feed: Any = None, cut: Any = None):
        self._plan = plan
        self.rank = rank
        self.world_size = world_size
        #: where batches are moved; None: left where the DataLoader puts them.
        self.device = device
        self.non_blocking = non_blocking
        self.seed = seed
        self.batch_size = batch_size
        self.split_batches = split_batches
        self.even_batches = even_batches
        self.dispatch_batches = dispatch_batches
        self.dataset = dataset
        #: refuse to start an uneven epoch outside `accel.join_uneven_inputs` (a training
        #: engine would wait forever for the rank that ran out of batches).
        self.guard_uneven = guard_uneven
        #: set by `accel.join_uneven_inputs` while its block runs.
        self.joined = False
        self._epoch = 0
        self._position = 0        # batches of the current epoch handed out (or skipped)
        self._pending_skip = 0    # batches the next iteration leaves out (resume)
        self._epoch_done = False  # the last batch of `_epoch` has been handed out
        self._is_last = False
        self._batch_padding = 0
        self._remainder: int | None = None
        self._generation = 0      # which iteration may still update the state
        #: moves the stream of (batch, padding) pairs to `device` itself (XLA's parallel
        #: loader); None: each batch is sent with `send_to_device`.
        self._feed = feed
        #: cuts each batch to this rank's part of every sequence (accel.context_parallel).
        self._cut = cut
        #: the source's own state after the batch last handed out (accel.data.stateful)
        self._source_state: Any = None

    # ------------------------------------------------------------------ facts

    @property
    def dataloader(self) -> torch.utils.data.DataLoader:
        """The torch DataLoader underneath (rank 0's reader when dispatching)."""
        return self._plan.dataloader

    @property
    def epoch(self) -> int:
        """The epoch being iterated, or the next one once a pass has completed."""
        return self._epoch

    @property
    def is_last_batch(self) -> bool:
        """True while the batch you hold is the last of its epoch on this rank."""
        return self._is_last

    @property
    def batch_padding(self) -> int:
        """Duplicated samples (added by even_batches) in the current step's global batch.

        They are the last samples of the step's batches gathered in rank order; zero except
        on the last step of an epoch.
        """
        return self._batch_padding

    @property
    def remainder(self) -> int | None:
        """Duplicated samples in the last global batch of this epoch; None until it is read."""
        return self._remainder

    @property
    def total_batch_size(self) -> int | None:
        """Samples per step over all ranks."""
        return None if self.batch_size is None else self.batch_size * self.world_size

    @property
    def batches_per_rank(self) -> list[int] | None:
        """Batches each rank gets in a full epoch, without communication; None when unknown.

        Known for map-style datasets, and for iterable ones with len() read by at most one
        worker. With even_batches=True every rank gets the same number in any case.
        """
        return self._plan.counts()

    def __len__(self) -> int:
        """Batches this rank gets in a full epoch (a resumed epoch yields fewer)."""
        counts = self.batches_per_rank
        if counts is None:
            raise TypeError(
                "this loader's length is unknown: its dataset is an IterableDataset without "
                "len() (or is read by several workers)"
            )
        return counts[self.rank]

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Any]:
        self._check_uneven()
        self._roll_over_if_done()
        self._generation += 1
        skip, self._pending_skip = self._pending_skip, 0
        self._position, self._is_last, self._batch_padding = skip, False, 0
        self._remainder = None
        return self._run(self._generation, self._epoch, skip)

    def _check_uneven(self) -> None:
        counts = self.batches_per_rank if self.guard_uneven and not self.joined else None
        if counts and len(set(counts)) > 1:
            raise UnsupportedError(
                f"with even_batches=False the ranks get {counts} batches: a rank that runs "
                "out first would leave the others waiting forever in the gradient all-reduce. "
                "Iterate inside `with accel.join_uneven_inputs(model, ctx, loader=loader):`, "
                "or keep even_batches=True"
            )

    def _run(self, generation: int, epoch: int, skip: int) -> Iterator[Any]:
        stream = self._plan.iterate(epoch, skip)
        if self._feed is not None:
            stream = self._feed(stream)
        source = getattr(self._plan, "stream_state", None)
        upcoming = self._fetch(stream)
        while upcoming is not _END:
            batch, padding = upcoming
            # before the look-ahead reads on: the source's position right after `batch`
            state = source.take() if source is not None and source.available else None
            upcoming = self._fetch(stream)
            if generation != self._generation:
                return  # a newer iteration owns the state now
            last = upcoming is _END
            if padding is None:
                padding = self._plan.final_padding() if last else 0
            self._position += 1
            self._source_state = state
            self._is_last = self._epoch_done = last
            self._batch_padding = padding
            if last:
                self._remainder = padding
            yield batch if self._cut is None else self._cut(batch)
        if generation == self._generation:
            self._epoch_done = True  # also for an epoch with no batch at all
            self._roll_over_if_done()

    def _fetch(self, stream: Iterator[tuple[Any, int | None]]) -> Any:
        pair = next(stream, _END)
        if pair is _END or self.device is None or self._feed is not None:
            return pair
        from accel.runtime.ops import send_to_device

        batch, padding = pair
        return send_to_device(batch, self.device, non_blocking=self.non_blocking), padding

    def _roll_over_if_done(self) -> None:
        if self._epoch_done:
            self._epoch += 1
            self._position = 0
            self._epoch_done = False
            self._is_last = False
            self._batch_padding = 0

    # ------------------------------------------------------------------ position

    def set_epoch(self, epoch: int) -> None:
        """Iterate epoch `epoch` next; its order is a pure function of (seed, epoch).

        Setting the epoch a loaded state resumes keeps the resume position.
        """
        if epoch == self._epoch and not self._epoch_done:
            return
        self._epoch = int(epoch)
        self._epoch_done = False
        self._pending_skip = self._position = 0

    def skip_batches_in_epoch(self, num_batches: int) -> None:
        """Make the next iteration start at batch `num_batches` of the current epoch."""
        self._roll_over_if_done()
        self._pending_skip = self._position = int(num_batches)

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch comes from: epoch, batches already yielded in it, seed.

        Taken while you hold the last batch of an epoch, it points at the next epoch.
        Resuming from it is exact for map-style datasets (the order is a pure function of
        seed and epoch; skipped batches are not read), for iterable ones that keep their
        own position (a `datasets` stream, a torchdata Stateful dataset or
        StatefulDataLoader: their state after the batch last handed out is saved as
        "source", and the stream continues there, reading nothing twice; see
        `accel.data.stateful`) and for iterable ones whose stream is a pure function of
        `set_epoch` and the worker count (skipped batches are read again and dropped).
        Random augmentations are not part of it: restore the RNG states with your
        checkpoint (workers get seeds from seed, epoch and rank, but after a skip a
        map-style batch may land on another worker).
        """
        epoch, position = self._epoch, self._position
        if self._epoch_done:
            epoch, position = epoch + 1, 0
        state = {"epoch": epoch, "batches_yielded": position, "seed": self.seed,
                 "world_size": self.world_size, "layout": self._layout(),
                 "source_layout": self._source_layout()}
        if position and self._source_state is not None:  # mid-epoch: the stream's own
            state["source"] = self._source_state
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the position `state_dict` saved: the next iteration continues it.

        A state saved by another number of ranks reshards (map-style datasets without
        dispatch_batches): the batches the saving world consumed are shared out anew, so
        the resumed run reads the samples an unchanged world would have read next. With
        split_batches the position counts global batches and always carries over;
        otherwise the consumed batches must divide by the new world size.

        Raises:
            IncompatibleOptionsError: the state comes from a loader with another seed or
                batch layout (its positions would mean other samples), or from another
                world size that this loader cannot reshard to exactly.
        """
        from accel.errors import IncompatibleOptionsError

        saved_world = state.get("world_size", self.world_size)
        mine = {"seed": self.seed, "world_size": self.world_size, "layout": self._layout()}
        if saved_world != self.world_size:
            mine = {"seed": self.seed, "source_layout": self._source_layout()}
        for key, value in mine.items():
            if key in state and state[key] != value:
                raise IncompatibleOptionsError(
                    f"the loader state was saved with {key}={state[key]!r} but this loader has "
                    f"{key}={value!r}; rebuild it with distribute_loader using the same "
                    "seed, options and world size to resume exactly"
                )
        position = int(state["batches_yielded"])
        if saved_world != self.world_size:
            position = self._resharded_position(state, saved_world, position)
        self._generation += 1  # an iteration in progress no longer moves the position
        self._epoch = int(state["epoch"])
        self._pending_skip = self._position = position
        self._epoch_done = self._is_last = False
        source = getattr(self._plan, "stream_state", None)
        if "source" in state and source is not None and source.available:
            source.restore(state["source"])  # the stream continues there: nothing re-read
        self._source_state = state.get("source")

    def _resharded_position(self, state: dict[str, Any], saved_world: int,
                            position: int) -> int:
        """This rank's position after `position` batches on each of `saved_world` ranks."""
        from torch.utils.data import IterableDataset

        from accel.errors import IncompatibleOptionsError

        if ("source_layout" not in state or self.dispatch_batches
                or isinstance(self.dataset, IterableDataset)):
            raise IncompatibleOptionsError(
                f"the loader state was saved by {saved_world} ranks and this world has "
                f"{self.world_size}: only a map-style loader without dispatch_batches, saved "
                "by this version of accel, reshards; load with loader=None and position the "
                "loader yourself (skip_first_batches)")
        if self.split_batches:
            return position  # each rank took its slice of every global batch
        consumed = position * saved_world  # round-robin: every rank read `position` batches
        if consumed % self.world_size:
            raise IncompatibleOptionsError(
                f"the loader state was saved after {consumed} batches of epoch "
                f"{state['epoch']}, which {self.world_size} ranks cannot share evenly; "
                "resume on a world size that divides it, or use split_batches=True (a "
                "fixed global batch, which reshards at any step)")
        return consumed // self.world_size

    def _source_layout(self) -> str:
        """The layout independent of the world size: the DataLoader's own batch size."""
        mode = "dispatch" if self.dispatch_batches else "shard"
        size = self.batch_size
        if size is not None and self.split_batches:
            size *= self.world_size
        return (f"{mode},loader_batch_size={size},split_batches={self.split_batches},"
                f"even_batches={self.even_batches}")

    def _layout(self) -> str:
        mode = "dispatch" if self.dispatch_batches else "shard"
        return (f"{mode},batch_size={self.batch_size},split_batches={self.split_batches},"
                f"even_batches={self.even_batches}")

    def __repr__(self) -> str:
        return (f"DistributedLoader(rank {self.rank}/{self.world_size}, {self._layout()}, "
                f"epoch={self._epoch}, position={self._position}, device={self.device})")
