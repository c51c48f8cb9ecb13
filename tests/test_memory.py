"""find_executable_batch_size (one process, then 2 real gloo ranks) and release_memory."""

from __future__ import annotations

import datetime
import gc
import time
import weakref

import attrs
import pytest
import torch
import torch.distributed as dist

from accel.errors import BatchSizeExhaustedError, IncompatibleOptionsError
from accel.runtime.memory import (
    find_executable_batch_size,
    is_out_of_memory,
    release_memory,
)
from accel.testing import run_world


def allocate_bytes(count: int) -> torch.Tensor:
    """A real CPU allocation: beyond the machine's memory, torch's allocator raises."""
    return torch.empty(count, dtype=torch.uint8)


@pytest.mark.parametrize(("error", "expected"), [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("XPU out of memory. Tried to allocate 1 GiB"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate "
                  "memory: you tried to allocate 1 bytes."), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you "
                  "passed in a non-contiguous input."), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("out of memory"), False),  # not an allocator's error type
])
def test_is_out_of_memory(error, expected):
    assert is_out_of_memory(error) is expected


def test_a_real_cpu_allocation_failure_counts_as_out_of_memory():
    with pytest.raises(RuntimeError) as raised:
        allocate_bytes(2**60)
    assert is_out_of_memory(raised.value)


def test_halves_until_it_fits_and_passes_the_other_arguments():
    tried = []

    @find_executable_batch_size(starting_batch_size=128)
    def train(batch_size, scale, *, offset):
        tried.append(batch_size)
        if batch_size > 40:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return batch_size * scale + offset

    assert train(10, offset=1) == 321
    assert tried == [128, 64, 32]


def test_call_style_and_accelerate_factor():
    tried = []

    def train(batch_size):
        tried.append(batch_size)
        if batch_size > 100:
            allocate_bytes(2**60)  # a real allocator failure
        return batch_size

    assert find_executable_batch_size(train, 128, None, factor=0.9)() == 92
    assert tried == [128, 115, 103, 92]


def test_out_of_memory_at_batch_size_one_is_a_clear_error():
    tried = []

    def never_fits(batch_size):
        tried.append(batch_size)
        raise torch.OutOfMemoryError("CUDA out of memory.")

    with pytest.raises(BatchSizeExhaustedError, match="out of memory at batch size 1"):
        find_executable_batch_size(never_fits, 5)()
    assert tried == [5, 2, 1]


def test_other_errors_propagate_unchanged_and_bad_calls_are_refused():
    boom = KeyError("no such column")

    def broken(batch_size):
        raise boom

    with pytest.raises(KeyError) as raised:
        find_executable_batch_size(broken, 8)()
    assert raised.value is boom
    wrapped = find_executable_batch_size(lambda batch_size, model: batch_size, 8)
    with pytest.raises(IncompatibleOptionsError, match="leave the batch size out"):
        wrapped(32, "model")
    with pytest.raises(IncompatibleOptionsError, match="'batch_size' was passed"):
        wrapped("model", batch_size=32)
    with pytest.raises(IncompatibleOptionsError, match="starting_batch_size must be"):
        find_executable_batch_size(starting_batch_size=0)
    with pytest.raises(IncompatibleOptionsError, match="factor must be between 0 and 1"):
        find_executable_batch_size(starting_batch_size=8, factor=1.0)


def test_release_memory_drops_the_references():
    model = torch.nn.Linear(4, 4)
    alive = weakref.ref(model)
    model, other = release_memory(model, [1, 2])
    assert (model, other) == (None, None)
    gc.collect()
    assert alive() is None


# ---- 2 real gloo ranks ----

def _search(ctx, fails_on_rank_1, start=128):
    tried = []

    @find_executable_batch_size(starting_batch_size=start, ctx=ctx)
    def train(batch_size):
        tried.append(batch_size)
        if ctx.rank == 1:
            fails_on_rank_1(batch_size)
        return batch_size

    try:
        return train(), tried
    except Exception as error:  # noqa: BLE001 - the error is the result under test
        return f"{type(error).__name__}: {error}", tried


def _oom_above_64(batch_size):
    if batch_size > 64:
        allocate_bytes(2**60)  # a real CPU allocator failure on rank 1 only


def _value_error_at_128(batch_size):
    if batch_size == 128:
        raise ValueError("bad label 7")


def _oom_before_a_collective(ctx):
    """Rank 1 runs out of memory before an all-reduce that rank 0 has already entered."""
    # A group with a 3 s timeout bounds the documented wait (a Context's group and timeout).
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=3))
    ctx = attrs.evolve(ctx, group=group, timeout=datetime.timedelta(seconds=3))

    def train(batch_size):
        if ctx.rank == 1:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        dist.all_reduce(torch.ones(1), group=group)  # rank 0 waits here until the timeout
        return batch_size

    started = time.monotonic()
    try:
        outcome = find_executable_batch_size(train, 8, ctx)()
    except Exception as error:  # noqa: BLE001
        outcome = f"{type(error).__name__}: {error}"
    return outcome, time.monotonic() - started


def searches_on_two_ranks(ctx):
    agreed = _search(ctx, _oom_above_64)
    failed = _search(ctx, _value_error_at_128)
    # Both ranks can still run collectives: the search left no half-finished exchange.
    total = torch.tensor([ctx.rank + 1.0])
    dist.all_reduce(total)
    hung = _oom_before_a_collective(ctx)  # last: a timed-out group is not reusable
    return agreed, failed, total.item(), hung


@pytest.mark.spawned
def test_two_ranks_agree_on_the_batch_size_and_share_failures():
    (agreed0, failed0, total0, hung0), (agreed1, failed1, total1, hung1) = run_world(
        searches_on_two_ranks, 2, timeout=90)
    # Only rank 1 ran out of memory at 128: both ranks retried at 64 and stopped there.
    assert agreed0 == agreed1 == (64, [128, 64])
    # A non-OOM error on rank 1: rank 1 raises its own, rank 0 a RankFailedError naming it.
    assert failed1 == ("ValueError: bad label 7", [128])
    assert failed0[1] == [128]
    assert failed0[0].startswith("RankFailedError: rank 1 raised ValueError('bad label 7') "
                                 "while trying batch size 128")
    assert total0 == total1 == 3.0
    # The contract's limit: an OOM that skips a collective costs the group's timeout,
    # then every rank raises (rank 0 the timeout, rank 1 a RankFailedError naming rank 0).
    assert hung0[0].startswith("RuntimeError") and "Timed out" in hung0[0]
    assert hung1[0].startswith("RankFailedError: rank 0 raised RuntimeError(")
    assert 2.5 < hung0[1] < 30 and 2.5 < hung1[1] < 30
