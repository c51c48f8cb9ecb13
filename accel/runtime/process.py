"""Process control: barriers, who runs what, splitting work between ranks, early-stop votes.

Nothing here keeps state: every decision comes from the Context passed in (or found
among a decorated function's arguments).
"""

from __future__ import annotations

import builtins
import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from accel.context import Context
from accel.errors import InvalidArgumentError
from accel.runtime.ops import reduce

F = TypeVar("F", bound=Callable[..., Any])


def wait_for_everyone(ctx: Context) -> None:
    """Block until every rank reaches this call (a barrier); returns at once in one process.

    >>> accel.wait_for_everyone(ctx)
    """
    if ctx.is_distributed and ctx.device.type == "xla":
        from accel.runtime.xla import rendezvous

        rendezvous("accel.wait_for_everyone")  # torch_xla's dist.barrier does nothing
    elif ctx.is_distributed:
        dist.barrier(group=ctx.group)


@contextlib.contextmanager
def main_process_first(ctx: Context) -> Iterator[None]:
    """Run the body on the main process first; the others run it once it has finished.

    For work whose result the others reuse: downloading, preprocessing into a cache.

    >>> with accel.main_process_first(ctx):
    ...     dataset = load_and_cache(path)
    """
    with _first(ctx, ctx.is_main_process):
        yield


@contextlib.contextmanager
def local_main_process_first(ctx: Context) -> Iterator[None]:
    """Like `main_process_first`, per node: each node's local main process goes first.

    >>> with accel.local_main_process_first(ctx):
    ...     tokenizer = download_to_local_disk(name)
    """
    with _first(ctx, ctx.is_local_main_process):
        yield


@contextlib.contextmanager
def _first(ctx: Context, goes_first: bool) -> Iterator[None]:
    if not goes_first:
        wait_for_everyone(ctx)
        yield
        return
    try:
        yield
    finally:
        # Even when the body raised: the waiting ranks are released (and fail on their
        # own) instead of blocking until the collective timeout.
        wait_for_everyone(ctx)


# --------------------------------------------------------------------------- decorators


def _find_context(fn: Callable[..., Any], args: tuple, kwargs: dict, bind_hint: str) -> Context:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Context):
            return value
    raise InvalidArgumentError(
        f"{fn.__qualname__} is decorated to run on chosen ranks but none of its arguments is "
        "an accel.Context; pass the Context when calling it, or bind one when decorating: "
        f"@accel.{bind_hint}"
    )


def _only_where(should_run: Callable[[Context], bool], fn: F, bound: Context | None,
                bind_hint: str) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = bound if bound is not None else _find_context(fn, args, kwargs, bind_hint)
        return fn(*args, **kwargs) if should_run(ctx) else None

    return wrapper  # type: ignore[return-value]


def _decorator(should_run: Callable[[Context], bool], name: str) -> Callable[..., Any]:
    def decorate(fn_or_ctx: Any = None) -> Any:
        if isinstance(fn_or_ctx, Context):
            return lambda fn: _only_where(should_run, fn, fn_or_ctx, f"{name}(ctx)")
        if callable(fn_or_ctx):
            return _only_where(should_run, fn_or_ctx, None, f"{name}(ctx)")
        raise InvalidArgumentError(
            f"{name} decorates a function (@accel.{name}) or takes a Context "
            f"(@accel.{name}(ctx)); got {type(fn_or_ctx).__name__}"
        )

    decorate.__name__ = decorate.__qualname__ = name
    return decorate


on_main_process = _decorator(lambda ctx: ctx.is_main_process, "on_main_process")
on_main_process.__doc__ = """Run the decorated function only on rank 0; elsewhere it returns None.

The Context comes from the call's arguments, or is bound by `on_main_process(ctx)`.

>>> @accel.on_main_process
... def save_report(results, ctx): ...
"""

on_local_main_process = _decorator(lambda ctx: ctx.is_local_main_process,
                                   "on_local_main_process")
on_local_main_process.__doc__ = """Run the decorated function only on each node's local rank 0.

>>> @accel.on_local_main_process
... def unpack_to_local_disk(archive, ctx): ...
"""

on_last_process = _decorator(lambda ctx: ctx.is_last_process, "on_last_process")
on_last_process.__doc__ = """Run the decorated function only on the last rank.

>>> @accel.on_last_process
... def report(ctx): ...
"""


def on_process(index: int, ctx: Context | None = None) -> Callable[[F], F]:
    """Run the decorated function only on rank `index`; elsewhere it returns None.

    Raises (at call time) when `index` is not a rank of the world, since the function
    would then silently run nowhere.

    >>> @accel.on_process(1)          # Context from the call's arguments
    ... def log_second(ctx): ...
    >>> @accel.on_process(1, ctx)     # Context bound now
    ... def log_second_bound(): ...
    """
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise InvalidArgumentError(f"on_process: index must be a rank (an int >= 0), got {index!r}")

    def should_run(context: Context) -> bool:
        if index >= context.world_size:
            raise InvalidArgumentError(
                f"on_process({index}): the world has {context.world_size} ranks, so the "
                f"function would run nowhere; choose a rank below {context.world_size}"
            )
        return context.rank == index

    return lambda fn: _only_where(should_run, fn, ctx, f"on_process({index}, ctx)")


# --------------------------------------------------------------------------- splitting


def split_between_processes(data: Any, ctx: Context, *, apply_padding: bool = False) -> Any:
    """This rank's contiguous share of a list, tuple, tensor (dim 0), array, or dict of those.

    Earlier ranks get the extra items: 17 items on 2 ranks give 9 and 8; [A, B, C] gives
    [A, B] and [C]. With `apply_padding`, shorter shares repeat their last item up to the
    longest share ([A, B] and [C, C]), so every rank does the same number of steps; a rank
    with no item at all repeats the data's last item. Dict values are split with the
    same indices and must have equal lengths. Needs no communication.

    Raises:
        InvalidArgumentError: an unsupported type, or dict values of different lengths.

    >>> prompts = accel.split_between_processes(all_prompts, ctx)
    """
    length = _length(data)
    base, extra = divmod(length, ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    stop = start + base + (1 if ctx.rank < extra else 0)
    pad_to = base + (1 if extra else 0) if apply_padding else 0
    if not isinstance(data, Mapping):
        return _take(data, start, stop, pad_to)
    shares = {k: _take(v, start, stop, pad_to) for k, v in data.items()}
    try:
        return type(data)(shares)
    except TypeError:  # a Mapping type not constructible from a dict (e.g. defaultdict)
        return shares


_SPLITTABLE = (list, tuple, torch.Tensor, np.ndarray)


def _length(data: Any) -> int:
    if isinstance(data, _SPLITTABLE):
        return len(data)
    if not isinstance(data, Mapping):
        raise InvalidArgumentError(
            f"split_between_processes: cannot split a {type(data).__name__}; pass a list, "
            "tuple, tensor, numpy array, or a dict of those"
        )
    lengths = {k: _length(v) if isinstance(v, _SPLITTABLE) else None for k, v in data.items()}
    if None in lengths.values() or len(set(lengths.values())) > 1:
        described = ", ".join(f"{k!r}: {n if n is not None else type(data[k]).__name__}"
                              for k, n in lengths.items())
        raise InvalidArgumentError(
            "split_between_processes: a dict's values must all be lists, tuples, tensors or "
            f"arrays of one length, to be split with the same indices; got {{{described}}}"
        )
    return next(iter(lengths.values()), 0)


def _take(value: Any, start: int, stop: int, pad_to: int) -> Any:
    share = value[start:stop]
    missing = pad_to - len(share)
    if missing <= 0 or len(value) == 0:
        return share
    filler = value[stop - 1:stop] if len(share) else value[-1:]
    if isinstance(value, torch.Tensor):
        return torch.cat([share, filler.expand(missing, *filler.shape[1:])])
    if isinstance(value, np.ndarray):
        return np.concatenate([share, np.repeat(filler, missing, axis=0)])
    return share + filler * missing


# --------------------------------------------------------------------------- misc


# Shadows the builtin on purpose: `accel.print` reads as the drop-in it is.
def print(*values: Any, ctx: Context, per_node: bool = True, **print_kwargs: Any) -> None:
    """`print` once per node (on each local main process), or once in all (`per_node=False`).

    >>> accel.print("epoch", epoch, "loss", loss, ctx=ctx)
    """
    if ctx.is_local_main_process if per_node else ctx.is_main_process:
        builtins.print(*values, **print_kwargs)


def any_rank(flag: bool, ctx: Context) -> bool:
    """True on every rank when at least one rank passed True (early stopping, found a NaN).

    Every rank must call it.

    >>> if accel.any_rank(val_loss > best + patience_margin, ctx): break
    """
    return _vote(flag, ctx, "max")


def all_ranks(flag: bool, ctx: Context) -> bool:
    """True on every rank when every rank passed True.

    >>> if accel.all_ranks(shard_done, ctx): break
    """
    return _vote(flag, ctx, "min")


def _vote(flag: bool, ctx: Context, op: str) -> bool:
    try:
        vote = bool(flag)
    except (RuntimeError, ValueError) as exc:  # a tensor of several elements
        raise InvalidArgumentError(
            f"any_rank/all_ranks take one truth value per rank, not {flag!r}: {exc}"
        ) from exc
    if not ctx.is_distributed:
        return vote
    return bool(reduce(torch.tensor(int(vote)), ctx, op=op).item())
