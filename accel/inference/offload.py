"""Weights kept off the execution device: safetensors files mapped into memory, page advice,
and the background thread that brings the next blocks' weights in while one computes.

Disk-offloaded weights are zero-copy views of a memory-mapped safetensors file: reading
them costs no copy, only the kernel's paging. `populate` asks the kernel to read a
block's pages in (on the prefetch thread, ahead of use); `release` drops them from this
process after use, so disk-offloaded weights never accumulate in its memory.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import functools
import json
import os
import queue
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from accel.errors import InvalidArgumentError

_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
# Linux madvise(2) advice values (not all are exposed by Python's mmap module).
_MADV_WILLNEED = 3
_MADV_DONTNEED = 4
_MADV_POPULATE_READ = 22  # Linux >= 5.14: fault the pages in, as reading them would
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# mincore(2) reports a page in RAM in the lowest bit of its byte; the others are reserved.
_RESIDENT_BIT = bytes(value & 1 for value in range(256))


# --------------------------------------------------------------------------- files


def write_safetensors(path: str | os.PathLike[str],
                      specs: Sequence[tuple[str, torch.Size, torch.dtype]],
                      fetch: Callable[[str], torch.Tensor]) -> Path:
    """Write a safetensors file one tensor at a time: `fetch(name)` is called in file order.

    Peak memory is one tensor, not the file. Tensors are laid out largest element size
    first, so every tensor's data is aligned to its element size (safetensors allows no
    padding between tensors). The file is written under a temporary name and renamed, so
    a process still mapping an older file of the same name keeps reading valid data.
    """
    target = Path(path)
    ordered = sorted(specs, key=lambda spec: -spec[2].itemsize)
    header: dict[str, Any] = {}
    offset = 0
    for name, shape, dtype in ordered:
        if dtype not in _SAFETENSORS_DTYPES:
            raise InvalidArgumentError(f"cannot write {name} of dtype {dtype} to safetensors")
        size = int(torch.Size(shape).numel()) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(len(encoded) + 8) % 64)  # data starts 64-byte aligned
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    with open(partial, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little"))
        file.write(encoded)
        for name, shape, dtype in ordered:
            tensor = fetch(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise InvalidArgumentError(
                    f"{name}: expected {tuple(shape)} {dtype}, got {tuple(tensor.shape)} "
                    f"{tensor.dtype}"
                )
            file.write(tensor_to_bytes(tensor))
    os.replace(partial, target)
    return target


def tensor_to_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without a copy when it is a contiguous CPU one."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if sys.byteorder != "little":  # pragma: no cover - no big-endian machine to test on
        raise InvalidArgumentError("writing safetensors needs a little-endian machine")
    return memoryview(flat.view(torch.uint8).numpy())


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The tensors a safetensors file holds: name -> {"dtype", "shape", "data_offsets"}."""
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        if length <= 0 or length > 100_000_000:
            raise InvalidArgumentError(f"{path} is not a safetensors file (bad header size)")
        header = json.loads(file.read(length))
    header.pop("__metadata__", None)
    return header


def map_safetensors(path: str | os.PathLike[str], names: Iterable[str] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Zero-copy views of the tensors of a safetensors file, backed by a private mapping.

    Nothing is read until a view is used; the mapping lives as long as a view does.
    """
    with safe_open(os.fspath(path), framework="pt") as file:
        wanted = list(file.keys()) if names is None else list(names)
        return {name: file.get_tensor(name) for name in wanted}


# --------------------------------------------------------------------------- pages


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.madvise.restype = ctypes.c_int
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    libc.mincore.restype = ctypes.c_int
    return libc


def _page_ranges(tensors: Iterable[torch.Tensor], inward: bool) -> list[tuple[int, int]]:
    """Merged page-aligned [start, end) address ranges covering (or inside) the tensors."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                   for t in tensors if t.numel())
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    ranges = []
    for start, end in merged:
        if inward:  # only whole pages of these tensors: neighbours' pages stay untouched
            start, end = -(-start // PAGE_SIZE) * PAGE_SIZE, end // PAGE_SIZE * PAGE_SIZE
        else:
            start, end = start // PAGE_SIZE * PAGE_SIZE, -(-end // PAGE_SIZE) * PAGE_SIZE
        if end > start:
            ranges.append((start, end))
    return ranges


def populate(mapped: Iterable[torch.Tensor], map_pages: bool = True) -> None:
    """Bring the pages of memory-mapped tensors in now (the GIL is released meanwhile).

    Starts the kernel's readahead over the whole range (cheap for pages already cached);
    with `map_pages`, also maps every page into this process, so the compute that
    follows takes no page fault (worth it when the pages were dropped after their last
    use). Only for views from `map_safetensors`.
    """
    mapped = list(mapped)
    libc = _libc()
    if libc is None:  # not Linux: touch one byte per page instead
        if map_pages:
            for tensor in mapped:
                if tensor.numel():
                    tensor.reshape(-1).view(torch.uint8)[::PAGE_SIZE].sum()
        return
    for start, end in _page_ranges(mapped, inward=False):
        libc.madvise(start, end - start, _MADV_WILLNEED)
        if map_pages:
            # Kernels before 5.14 refuse POPULATE_READ: the readahead above still helps.
            libc.madvise(start, end - start, _MADV_POPULATE_READ)


def in_memory(mapped: Iterable[torch.Tensor]) -> bool:
    """Whether every page of memory-mapped tensors is in RAM (the kernel's page cache).

    One mincore(2) call per range: cheap enough to ask before every block, so that a
    block already in memory costs no load at all. False where it cannot be known.
    """
    libc = _libc()
    if libc is None:
        return False
    for start, end in _page_ranges(mapped, inward=False):
        pages = ctypes.create_string_buffer((end - start) // PAGE_SIZE)
        if libc.mincore(start, end - start, pages) != 0:
            return False
        if b"\x00" in pages.raw.translate(_RESIDENT_BIT):
            return False
    return True


def release(mapped: Iterable[torch.Tensor]) -> None:
    """Drop the pages of memory-mapped tensors from this process; the views stay valid.

    The next use reads them again (from the page cache if the kernel kept them, else from
    disk). Only for views of a private file mapping (`map_safetensors`): on ordinary
    memory, dropping pages would zero it, so callers must never pass resident tensors.
    """
    libc = _libc()
    if libc is None:
        return  # other systems page the mapping out by themselves under pressure
    for start, end in _page_ranges(mapped, inward=True):
        libc.madvise(start, end - start, _MADV_DONTNEED)


# --------------------------------------------------------------------------- thread


class PrefetchThread:
    """One background thread that runs load jobs in submission order.

    A daemon thread, so a forgotten `close` cannot keep the interpreter alive; `close`
    (called by `remove_dispatch`) stops it and waits for it.

    >>> thread = PrefetchThread()
    >>> future = thread.submit(load_block, 3)
    >>> weights = future.result()
    >>> thread.close()
    """

    def __init__(self, name: str = "accel-prefetch"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(self._jobs,), name=name,
                                        daemon=True)
        self._thread.start()
        # A dispatched model dropped without remove_dispatch still ends its thread.
        weakref.finalize(self, self._jobs.put, None)

    @staticmethod
    def _run(jobs: queue.SimpleQueue) -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the waiting caller, never lost
                future.set_exception(exc)

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        if not self._thread.is_alive():
            raise InvalidArgumentError("the prefetch thread was closed; dispatch the model again")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((future, fn, args))
        return future

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
