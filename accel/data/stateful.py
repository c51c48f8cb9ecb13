"""Resuming a stream from its own saved state instead of reading it again.

An iterable dataset that keeps its position (a Hugging Face ``datasets.IterableDataset``,
any dataset with ``state_dict()`` / ``load_state_dict()`` in torchdata's `Stateful`
sense), or a loader that does (torchdata's ``StatefulDataLoader``), resumes where it was:
`DistributedLoader.state_dict` records the source's state after each batch it hands
out (``"source"``), and a loader given that state continues the stream from there. The
batches before it are not read again, where a stream without a state is read from its
start and the batches already seen are dropped.

The source's state is taken where a rank's batch ends: in accel's sharding of an
iterable dataset (`IterableShard`) each rank's batch is its slice of one group of
world size x batch size items, so the dataset's position is at a group boundary. With a
plain DataLoader that holds only while the dataset is read in the main process
(num_workers=0); with several workers, pass a ``StatefulDataLoader``, which collects its
workers' states batch by batch.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader


def is_stateful(thing: Any) -> bool:
    """Whether `thing` saves and restores its own position (torchdata's Stateful protocol)."""
    return callable(getattr(thing, "state_dict", None)) and callable(
        getattr(thing, "load_state_dict", None))


def stateful_loader(loader: DataLoader) -> bool:
    """Whether `loader` is a loader that keeps its state (torchdata's StatefulDataLoader)."""
    return is_stateful(loader)


def loader_options(loader: DataLoader) -> dict[str, Any]:
    """The settings a rebuilt StatefulDataLoader keeps besides DataLoader's own."""
    every = getattr(loader, "snapshot_every_n_steps", None)
    return {} if every is None else {"snapshot_every_n_steps": every}


class SourceState:
    """The state of one plan's source: taken after each batch, restored before a stream.

    `take` is None when the source cannot save its position (then a resume replays).
    """

    def __init__(self, holder: Any):
        #: what saves and restores the position: the StatefulDataLoader, or the shard
        #: (which asks its dataset); None: nothing does.
        self.holder = holder
        self._restored: Any = None

    @property
    def available(self) -> bool:
        return self.holder is not None

    def take(self) -> Any:
        return None if self.holder is None else self.holder.state_dict()

    def restore(self, state: Any) -> None:
        """Resume the next stream at `state` (applied when it starts)."""
        self._restored = state

    def apply(self) -> bool:
        """Before a stream starts: restore the saved state, if any; whether one was."""
        state, self._restored = self._restored, None
        if state is None:
            return False
        self.holder.load_state_dict(state)
        return True
