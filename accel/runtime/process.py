"""Process control: barriers, who runs what, splitting work between ranks, early-stop votes.

Nothing here keeps state: every decision comes from the Context passed in (or found
among a decorated function's arguments).
"""

from __future__ import annotations

import builtins
import contextlib
import datetime
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from accel.context import Context
from accel.errors import InvalidArgumentError, InvalidArgumentTypeError, StuckRanksError
from accel.runtime.diagnosis import per_rank
from accel.runtime.ops import reduce
from accel.validation import check_bool, check_context, check_timeout, fail, shown

F = TypeVar("F", bound=Callable[..., Any])


def wait_for_everyone(ctx: Context, *, timeout: float | datetime.timedelta | None = None,
                      ) -> None:
    """Block until every rank reaches this call (a barrier); returns at once in one process.

    Args:
        timeout: how long to wait for the last rank (seconds or timedelta); default
            `ctx.barrier_timeout` (30 s). Pass more when ranks do long work of their own
            just before the call (rank 0 saving a large model).

    Raises:
        StuckRanksError: ranks did not arrive in time, or arrived at another barrier.

    >>> accel.wait_for_everyone(ctx)
    """
    check_context("wait_for_everyone", ctx)
    check_timeout("wait_for_everyone", "timeout", timeout, optional=True)
    if ctx.is_distributed and ctx.device.type == "xla":
        from accel.runtime.xla import rendezvous

        rendezvous("accel.wait_for_everyone")  # torch_xla's dist.barrier does nothing
    else:
        bounded_barrier(ctx, "wait_for_everyone", timeout or ctx.barrier_timeout)


def bounded_barrier(ctx: Context, where: str, timeout: float | datetime.timedelta) -> None:
    """Wait until every rank of ctx.group reaches barrier `where`, for at most `timeout`.

    Built on the process group's key-value store rather than a collective: it works the
    same on gloo and NCCL, every rank learns which ranks are missing, and a rank stuck in
    a collective cannot hold it up (gloo's monitored_barrier, tried first, waited the full
    collective timeout when rank 0 sat in an all-reduce).

    Raises:
        StuckRanksError: ranks did not arrive within `timeout`, or arrived at another
            barrier; the message names them and the likely cause.

    >>> bounded_barrier(ctx, "shutdown", datetime.timedelta(seconds=30))
    """
    if not ctx.is_distributed:
        return
    store = _barrier_store(ctx)
    if store is None:
        dist.barrier(group=ctx.group)
        return
    seconds = _seconds(timeout)
    key = None
    try:
        key = _arrive(store, ctx, where)
        store.wait([f"{key}/done"], datetime.timedelta(seconds=seconds))
        mismatch = store.get(f"{key}/done").decode()
        _forget(store, _previous(key), [str(ctx.rank)])
    except RuntimeError as exc:  # the wait timed out, or the store is gone
        raise _stuck(store, ctx, key, where, seconds) from exc
    if mismatch:
        raise StuckRanksError(f"{where} on rank {ctx.rank}: {mismatch}; {_CAUSE}")


#: what usually leaves ranks apart, and what to do about it.
_CAUSE = (
    "a rank that runs out of batches before the others leaves them in a collective: give "
    "every rank as many batches (distribute_loader's even_batches=True, the default) or "
    "wrap the loop in accel.join_uneven_inputs. A rank that crashed says why in its own "
    "log (ranks passing tensors of different shapes to a collective crash or get wrong "
    "data: rerun with ACCEL_DEBUG=1, or accel launch --debug, to check). If the late "
    "ranks were only busy (saving, evaluating), allow them longer: accel.init("
    "barrier_timeout=SECONDS), ACCEL_BARRIER_TIMEOUT, or wait_for_everyone(ctx, timeout=...)"
)


def _barrier_store(ctx: Context) -> Any:
    """The store of the default process group; None where it cannot serve a barrier."""
    if ctx.dist_backend in ("fake", "xla"):  # fake: no peers; xla: its own rendezvous
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def _arrive(store: Any, ctx: Context, where: str) -> str:
    """Record this rank at its next barrier; the last rank to come marks it done."""
    tag = "world" if ctx.group is None else ctx.group.group_name
    number = store.add(f"accel/barrier/{tag}/count/{ctx.rank}", 1)  # barriers passed + 1
    key = f"accel/barrier/{tag}/{number}"
    store.set(f"{key}/{ctx.rank}", where)
    if store.add(f"{key}/arrived", 1) == ctx.world_size:
        names = [name.decode() for name in store.multi_get(
            [f"{key}/{rank}" for rank in range(ctx.world_size)])]
        mismatch = "" if len(set(names)) == 1 else (
            "ranks reached different barriers: " + per_rank(names, "at "))
        store.set(f"{key}/done", mismatch)
        _forget(store, _previous(key), ["arrived", "done"])
    return key


def _previous(key: str) -> str:
    prefix, number = key.rsplit("/", 1)
    return f"{prefix}/{int(number) - 1}"


def _forget(store: Any, key: str, names: list[str]) -> None:
    # Once every rank has reached barrier N, all have left barrier N-1 (passed it, or
    # given up on it): nobody reads its keys again.
    for name in names:
        store.delete_key(f"{key}/{name}")


def _stuck(store: Any, ctx: Context, key: str | None, where: str,
           seconds: float) -> StuckRanksError:
    """The error naming the ranks that never reached barrier `key` (None: never entered)."""
    try:
        if key is None:
            raise RuntimeError("the store did not take this rank's arrival")
        missing = tuple(rank for rank in range(ctx.world_size)
                        if not store.check([f"{key}/{rank}"]))
    except RuntimeError:  # the store itself is gone: its host process ended
        return StuckRanksError(
            f"{where} on rank {ctx.rank}: the process group's store stopped answering "
            f"(the process serving it, rank 0 or the launcher, has ended); {_CAUSE}")
    ranks = ", ".join(map(str, missing))
    return StuckRanksError(
        f"{where} on rank {ctx.rank}: rank(s) {ranks} of {ctx.world_size} did not arrive "
        f"within {seconds:g} s; {_CAUSE}", missing)


def _seconds(timeout: float | datetime.timedelta) -> float:
    return timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else timeout


@contextlib.contextmanager
def main_process_first(ctx: Context) -> Iterator[None]:
    """Run the body on the main process first; the others run it once it has finished.

    For work whose result the others reuse: downloading, preprocessing into a cache. The
    others wait for it up to `ctx.timeout` (init's collective timeout, 30 min by default),
    not the barrier timeout, and StuckRanksError names the rank that did not come.

    >>> with accel.main_process_first(ctx):
    ...     dataset = load_and_cache(path)
    """
    check_context("main_process_first", ctx)
    with _first(ctx, ctx.is_main_process):
        yield


@contextlib.contextmanager
def local_main_process_first(ctx: Context) -> Iterator[None]:
    """Like `main_process_first`, per node: each node's local main process goes first.

    >>> with accel.local_main_process_first(ctx):
    ...     tokenizer = download_to_local_disk(name)
    """
    check_context("local_main_process_first", ctx)
    with _first(ctx, ctx.is_local_main_process):
        yield


@contextlib.contextmanager
def _first(ctx: Context, goes_first: bool) -> Iterator[None]:
    # The others wait while the first run the body: as long as work may take.
    if not goes_first:
        wait_for_everyone(ctx, timeout=ctx.timeout)
        yield
        return
    try:
        yield
    finally:
        # Even when the body raised: the waiting ranks are released (and fail on their
        # own) instead of blocking until the collective timeout.
        wait_for_everyone(ctx, timeout=ctx.timeout)


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
        fail(name, "fn_or_ctx", fn_or_ctx, f"a function to decorate (@accel.{name}) or an "
             f"accel.Context (@accel.{name}(ctx))")

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
    if isinstance(index, bool) or not isinstance(index, int):
        fail("on_process", "index", index, "a rank (an int >= 0)")
    if index < 0:
        fail("on_process", "index", index, "a rank (an int >= 0)", wrong_type=False)
    check_context("on_process", ctx, optional=True)

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
    check_context("split_between_processes", ctx)
    check_bool("split_between_processes", "apply_padding", apply_padding)
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
        raise InvalidArgumentTypeError(
            f"accel.split_between_processes: cannot split a {type(data).__name__}: data "
            "must be a list, tuple, tensor, numpy array, or a dict of those"
        )
    lengths = {k: _length(v) if isinstance(v, _SPLITTABLE) else None for k, v in data.items()}
    if None in lengths.values() or len(set(lengths.values())) > 1:
        described = ", ".join(f"{k!r}: {n if n is not None else type(data[k]).__name__}"
                              for k, n in lengths.items())
        raise InvalidArgumentError(
            "accel.split_between_processes: data, a dict, must hold lists, tuples, tensors "
            "or arrays of one length, to be split with the same indices; got "
            f"{{{described}}}"
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
    check_context("print", ctx)
    check_bool("print", "per_node", per_node)
    if ctx.is_local_main_process if per_node else ctx.is_main_process:
        builtins.print(*values, **print_kwargs)


def any_rank(flag: bool, ctx: Context) -> bool:
    """True on every rank when at least one rank passed True (early stopping, found a NaN).

    Every rank must call it.

    >>> if accel.any_rank(val_loss > best + patience_margin, ctx): break
    """
    return _vote(flag, ctx, "max", "any_rank")


def all_ranks(flag: bool, ctx: Context) -> bool:
    """True on every rank when every rank passed True.

    >>> if accel.all_ranks(shard_done, ctx): break
    """
    return _vote(flag, ctx, "min", "all_ranks")


def _vote(flag: bool, ctx: Context, op: str, function: str) -> bool:
    check_context(function, ctx)
    try:
        vote = bool(flag)
    except (RuntimeError, ValueError) as exc:  # a tensor of several elements
        raise InvalidArgumentError(
            f"accel.{function}: flag must be one truth value per rank, got {shown(flag)}: "
            f"{exc}") from exc
    if not ctx.is_distributed:
        return vote
    return bool(reduce(torch.tensor(int(vote)), ctx, op=op, ranks="all").item())
