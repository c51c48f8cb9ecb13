"""Recovering from out-of-memory: `find_executable_batch_size`, `release_memory`.

`find_executable_batch_size` runs the user's function with a batch size, and on an
out-of-memory error runs it again with a smaller one. In a distributed run every rank
takes part in each decision: after each attempt the ranks exchange one status each (ok,
out of memory, other error) over a gloo side group, so they all retry with the same size,
all stop, or all raise together.

The contract, and what it cannot guarantee:
- Every rank calls the wrapped function at the same point (it is a collective), with
  the same starting batch size.
- After each attempt the ranks agree, whether the attempt returned or raised, so a
  one-rank OOM never leaves the others waiting at the agreement step, and a non-OOM error
  on one rank makes every other rank raise `RankFailedError` naming it.
- The agreement cannot reach into the user's function. If rank 1 runs out of memory
  before a collective that rank 0 has entered (DDP's gradient all-reduce in backward,
  say), rank 0 waits in that collective until the process group's timeout
  (`ctx.timeout`), then raises; the agreement step (whose group waits twice as long) then
  makes every rank raise. The search succeeds across ranks when an OOM ends the attempt on
  every rank, or happens outside collectives; build the model and optimizer inside the
  function, as after an OOM their state may be half-updated.
"""

from __future__ import annotations

import functools
import gc
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from accel.context import Context
from accel.errors import BatchSizeExhaustedError, IncompatibleOptionsError, RankFailedError
from accel.validation import check_bool, check_callable, check_context, check_type

T = TypeVar("T")
_OK, _OOM, _ERROR = 0, 1, 2
# Substrings of the RuntimeError messages allocators raise (CUDA/ROCm/XPU/NPU/MPS say
# "out of memory"; torch's CPU allocator and Habana's say the rest). cuDNN reports a
# failed workspace allocation as NOT_SUPPORTED.
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cudnn_status_not_supported",
                 "pt_devmem allocation failed")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocator's out-of-memory error (any device, or the CPU).

    >>> is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory."))
    True
    """
    check_type("is_out_of_memory", "error", error, BaseException, "an exception")
    if isinstance(error, torch.OutOfMemoryError):
        return True
    if isinstance(error, RuntimeError) and error.args and isinstance(error.args[0], str):
        message = error.args[0].lower()
        return any(part in message for part in _OOM_MESSAGES)
    return False


def clear_device_cache(garbage_collection: bool = True) -> None:
    """Collect garbage, then return the cached blocks of CUDA, XPU, NPU and MPS allocators.

    Only devices already in use are touched (no CUDA context is created by this call).
    """
    check_bool("clear_device_cache", "garbage_collection", garbage_collection)
    if garbage_collection:
        gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    for name in ("xpu", "npu"):
        backend = getattr(torch, name, None)
        if backend is not None and backend.is_available():
            backend.empty_cache()
    if torch.backends.mps.is_available():
        torch.mps.empty_cache()


def release_memory(*objects: Any) -> list[None]:
    """Drop references to `objects`, collect garbage, empty device caches; returns Nones.

    Rebind your names to the result, so the objects can be freed:

    >>> model, optimizer = release_memory(model, optimizer)
    >>> model is None
    True
    """
    released: list[Any] = list(objects)
    del objects
    for index in range(len(released)):
        released[index] = None
    clear_device_cache()
    return released


def _smaller(batch_size: int, factor: float) -> int:
    return min(batch_size - 1, int(batch_size * factor))


def find_executable_batch_size(
    fn: Callable[..., T] | None = None,
    starting_batch_size: int = 128,
    ctx: Context | None = None,
    *,
    factor: float = 0.5,
) -> Any:
    """Call `fn(batch_size, ...)`, shrinking batch_size on out-of-memory until it fits.

    Args:
        fn: a function whose first argument is the batch size. Given: returns `fn`
            wrapped (call it with the other arguments); omitted: returns a decorator.
        starting_batch_size: the first size tried.
        ctx: the Context of a distributed run; all its ranks agree on each size (see the
            module doc for the contract). None: this process alone, which is an error
            while a process group of several ranks exists.
        factor: each retry uses `int(size * factor)` (at least one less); 0.5 halves,
            Accelerate's 0.9 tries more sizes, each closer to the limit.

    Returns the wrapped function's result.

    Raises:
        BatchSizeExhaustedError: out of memory at batch size 1.
        RankFailedError: another rank raised an error that is not out-of-memory (the rank
            that raised it re-raises its own error).

    >>> @find_executable_batch_size(starting_batch_size=128, ctx=ctx)
    ... def train(batch_size, model_name):
    ...     ...                                   # build the loader with batch_size
    >>> train("mlp")                             # no batch_size: it is passed for you
    """
    check_callable("find_executable_batch_size", "fn", fn,
                   "a function whose first argument is the batch size", optional=True)
    if (isinstance(starting_batch_size, bool) or not isinstance(starting_batch_size, int)
            or starting_batch_size < 1):
        raise IncompatibleOptionsError(
            f"starting_batch_size must be a positive integer, got {starting_batch_size!r}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1:
        raise IncompatibleOptionsError(f"factor must be between 0 and 1, got {factor!r}")
    check_context("find_executable_batch_size", ctx, optional=True)
    if fn is None:
        return functools.partial(find_executable_batch_size,
                                 starting_batch_size=starting_batch_size, ctx=ctx,
                                 factor=factor)

    @functools.wraps(fn)
    def with_batch_size_search(*args: Any, **kwargs: Any) -> T:
        _check_arguments(fn, args, kwargs)
        with _AgreementGroup(ctx) as agreement:
            batch_size = starting_batch_size
            while True:
                status, outcome = _attempt(fn, batch_size, args, kwargs)
                statuses = agreement.exchange(status)
                if _ERROR in statuses:
                    agreement.raise_failure(statuses, outcome, batch_size)
                if _OOM not in statuses:
                    return outcome
                outcome = None  # the failed attempt's tensors must be freed before a retry
                clear_device_cache()
                if batch_size == 1:
                    ranks = [rank for rank, s in enumerate(statuses) if s == _OOM]
                    raise BatchSizeExhaustedError(
                        f"out of memory at batch size 1 (rank(s) {ranks}); reduce the model "
                        "or sequence size, shard the model (FSDP, DeepSpeed), or use a "
                        "device with more memory")
                batch_size = max(1, _smaller(batch_size, factor))

    return with_batch_size_search


def _check_arguments(fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return
    if params and params[0].name in kwargs:
        raise IncompatibleOptionsError(
            f"{params[0].name!r} was passed to the function, but find_executable_batch_size "
            "passes the batch size itself: leave it out of the call")
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
    if not varargs and len(args) + 1 > len(positional):
        raise IncompatibleOptionsError(
            f"{fn.__name__} takes {len(positional)} positional argument(s) and the batch size "
            f"is the first; it was called with {len(args)} more: leave the batch size out")


def _attempt(fn: Callable[..., T], batch_size: int, args: tuple, kwargs: dict
             ) -> tuple[int, Any]:
    """(status, result or exception) of one call; the exception's frames are dropped on OOM
    so the tensors they reference can be freed."""
    try:
        return _OK, fn(batch_size, *args, **kwargs)
    except Exception as error:
        if is_out_of_memory(error):
            error.__traceback__ = None
            return _OOM, None
        return _ERROR, error


class _AgreementGroup:
    """A gloo group beside the user's, for one status per rank after each attempt.

    gloo on CPU tensors: a status exchange must not need device memory (the device may
    be out of it) and must not be matched against a collective of the user's function on
    the default group.
    """

    def __init__(self, ctx: Context | None):
        if ctx is None and dist.is_initialized() and dist.get_world_size() > 1:
            raise IncompatibleOptionsError(
                "find_executable_batch_size in a run of several processes needs ctx=... so "
                "all ranks agree on the batch size; pass the Context from accel.init()")
        self.distributed = ctx is not None and ctx.is_distributed
        self.ctx = ctx
        self.group: Any = None
        self.rank = ctx.rank if ctx is not None else 0
        self.global_ranks = [self.rank]

    def __enter__(self) -> _AgreementGroup:
        if self.distributed:
            assert self.ctx is not None
            ranks = None if self.ctx.group is None else dist.get_process_group_ranks(
                self.ctx.group)
            # Twice the timeout: a rank here must outlive a peer that is timing out in a
            # collective of the user's function, so that peer's error still reaches it.
            self.group = dist.new_group(ranks=ranks, backend="gloo",
                                        timeout=self.ctx.timeout * 2)
            self.rank = dist.get_rank(self.group)
            self.global_ranks = dist.get_process_group_ranks(self.group)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.group is not None:
            dist.destroy_process_group(self.group)

    def exchange(self, status: int) -> list[int]:
        """Every rank's status, in group rank order (each rank fills its own slot)."""
        if not self.distributed:
            return [status]
        statuses = torch.zeros(dist.get_world_size(self.group), dtype=torch.int64)
        statuses[self.rank] = status
        dist.all_reduce(statuses, group=self.group)
        return statuses.tolist()

    def raise_failure(self, statuses: list[int], outcome: Any, batch_size: int) -> None:
        """Re-raise this rank's own error, or RankFailedError naming the rank that failed.

        Every rank calls this when any status is an error: the error texts are gathered
        so the message says what went wrong where.
        """
        own = repr(outcome) if isinstance(outcome, BaseException) else None
        texts = [own]
        if self.distributed:
            texts = [None] * len(statuses)
            dist.all_gather_object(texts, own, group=self.group)
        if isinstance(outcome, BaseException):
            raise outcome
        failed = statuses.index(_ERROR)
        raise RankFailedError(
            f"rank {self.global_ranks[failed]} raised {texts[failed]} while trying batch size "
            f"{batch_size} in find_executable_batch_size; rank {self.global_ranks[self.rank]} "
            "stops too (see that rank's traceback for the cause)")
