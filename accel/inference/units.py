"""Offloaded blocks ("units"), how their weights reach the execution device, and the
schedule that loads the next ones on the prefetch thread while one computes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Any

import torch
from torch import nn

from accel.inference.offload import PrefetchThread, in_memory, populate, release


@dataclasses.dataclass(eq=False)
class Unit:
    """A block whose weights live off the execution device between its forwards."""

    index: int
    name: str
    module: nn.Module
    params: list[nn.Parameter]
    #: where each parameter's weights live between forwards: resident CPU tensors, or
    #: views of a memory-mapped file, whose pages may be dropped after use.
    sources: list[torch.Tensor]
    #: the sources that are memory-mapped views (a disk block's; none for a "cpu" block).
    mapped: list[torch.Tensor]


@dataclasses.dataclass(frozen=True)
class DispatchStats:
    """What the offloaded blocks cost so far (see `dispatch_stats`).

    prefetched: loads the prefetch thread had started before the block was needed.
    inline: loads done on the calling thread, when the block was needed.
    in_memory: loads skipped because the block's weights were in memory already
        (disk blocks kept mapped, whose pages the kernel still caches).
    wait_s: time the calling thread waited for prefetched loads still in flight.
    inline_s: time the calling thread spent on inline loads.
    """

    prefetched: int = 0
    inline: int = 0
    in_memory: int = 0
    wait_s: float = 0.0
    inline_s: float = 0.0
    #: whether disk blocks' pages are dropped after each use (else they stay mapped).
    release_after_use: bool = False


class MappedLoader:
    """CPU execution: weights already are (mapped or resident) CPU tensors.

    Loading a mapped block starts the kernel's readahead of its pages (and maps them, if
    they are dropped after each use); unloading drops them when `release` is set.
    """

    def __init__(self, release: bool):
        self.release = release

    def ready(self, unit: Unit) -> bool:
        """Nothing to load: kept mapped and all in RAM (asked before every use)."""
        return not self.release and in_memory(unit.mapped)

    def load(self, unit: Unit, background: bool) -> None:
        if unit.mapped:
            populate(unit.mapped, map_pages=self.release)

    def install(self, unit: Unit, loaded: Any) -> None:
        pass  # the parameters are the sources themselves

    def unload(self, unit: Unit) -> None:
        if unit.mapped and self.release:
            release(unit.mapped)


class CopyLoader:
    """Accelerator execution: weights are copied from their CPU sources for each forward.

    Background loads run on a side CUDA stream and record an event that the compute
    stream waits on, so copies of the next blocks overlap the current block's kernels.
    With `release`, the pages of mapped sources are dropped once copied.
    """

    def __init__(self, device: torch.device, release: bool = True):
        self.device = device
        self.release = release
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def ready(self, unit: Unit) -> bool:
        return False  # weights are copied for every forward

    def load(self, unit: Unit, background: bool) -> tuple[list[torch.Tensor], Any]:
        if background and self.stream is not None:
            with torch.cuda.stream(self.stream):
                tensors = [s.to(self.device, non_blocking=True, copy=True)
                           for s in unit.sources]
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            tensors, event = [s.to(self.device, copy=True) for s in unit.sources], None
        if unit.mapped and self.release:
            # Copies from pageable memory have read their source once `.to` returns.
            release(unit.mapped)
        return tensors, event

    def install(self, unit: Unit, loaded: tuple[list[torch.Tensor], Any]) -> None:
        tensors, event = loaded
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for tensor in tensors:
                # Made on the side stream, used on the compute stream: the allocator must
                # not reuse the memory before the compute stream is done with it.
                tensor.record_stream(compute)
        for param, tensor in zip(unit.params, tensors, strict=True):
            param.data = tensor

    def unload(self, unit: Unit) -> None:
        for param, source in zip(unit.params, unit.sources, strict=True):
            param.data = source


class Schedule:
    """Loads units just in time, and the next `depth` ones ahead on the prefetch thread.

    The order of the next pass is the order units ran in during the last one (at first,
    the device map's order); it wraps around, so the first blocks of the next forward
    (the next generated token) load while the last ones compute.
    """

    def __init__(self, units: list[Unit], loader: MappedLoader | CopyLoader, depth: int):
        self.units = units
        self.loader = loader
        self.depth = depth
        self.thread = PrefetchThread() if depth > 0 and units else None
        self.order = [unit.index for unit in units]
        self.recording: list[int] = []
        self.pending: dict[int, concurrent.futures.Future] = {}
        self.stats = DispatchStats(release_after_use=loader.release)

    def start_pass(self) -> None:
        self.recording = []

    def end_pass(self) -> None:
        # Units this pass did not run keep their place after the ones it ran.
        seen = dict.fromkeys(self.recording)
        self.order = [*seen, *(index for index in self.order if index not in seen)]

    def enter(self, unit: Unit) -> None:
        """Called before the unit's forward: its weights are in place when this returns."""
        if len(self.recording) < 4 * len(self.units):
            self.recording.append(unit.index)
        future = self.pending.pop(unit.index, None)
        started = time.perf_counter()
        if future is not None:
            loaded = future.result()
            self._count(prefetched=1, wait_s=time.perf_counter() - started)
        elif self.loader.ready(unit):
            loaded = None
            self._count(in_memory=1)
        else:
            loaded = self.loader.load(unit, background=False)
            self._count(inline=1, inline_s=time.perf_counter() - started)
        self._prefetch_after(unit)
        self.loader.install(unit, loaded)

    def leave(self, unit: Unit) -> None:
        self.loader.unload(unit)

    def _prefetch_after(self, unit: Unit) -> None:
        if self.thread is None:
            return
        position = self.order.index(unit.index) if unit.index in self.order else -1
        upcoming: list[int] = []
        for step in range(1, len(self.order)):
            index = self.order[(position + step) % len(self.order)]
            if len(upcoming) == self.depth:
                break
            if index != unit.index and index not in upcoming:
                upcoming.append(index)
        for stale in [i for i in self.pending if i not in upcoming]:
            # Off the predicted path: drop it (a load in flight finishes and is freed).
            self.pending.pop(stale).cancel()
        for index in upcoming:
            if index not in self.pending and not self.loader.ready(self.units[index]):
                self.pending[index] = self.thread.submit(self.loader.load, self.units[index],
                                                         True)

    def _count(self, **increments: float) -> None:
        self.stats = dataclasses.replace(self.stats, **{
            key: getattr(self.stats, key) + value for key, value in increments.items()})

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()
        if self.thread is not None:
            self.thread.close()
