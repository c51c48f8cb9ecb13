"""What a failing collective tells: shape checks in debug mode, and the likely cause.

`debug_check` (ACCEL_DEBUG=1) compares every rank's tensors before a collective and
raises on every rank instead of hanging; `explained` re-raises torch's errors with what
usually causes them and how to find out.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from accel.errors import AccelError, CollectiveFailedError, CollectiveMismatchError

if TYPE_CHECKING:
    from accel.context import Context


def debug_check(name: str, leaves: list[tuple[str, torch.Tensor]], ctx: Context, *,
                compare_shapes: bool = True) -> None:
    """In debug mode: raise on every rank if the ranks' tensors would not fit one collective.

    `leaves`: (path, tensor) of every tensor the collective is given on this rank.
    """
    if not ctx.debug:
        return
    mine = (name, [(path, tuple(t.shape), str(t.dtype)) for path, t in leaves])
    signatures: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(signatures, mine, group=ctx.group)
    problem = _first_mismatch(signatures, compare_shapes)
    if problem:
        raise CollectiveMismatchError(f"{name}: {problem}")


def _first_mismatch(signatures: list[Any], compare_shapes: bool) -> str | None:
    names = [name for name, _ in signatures]
    if len(set(names)) > 1:
        return "ranks called different collectives: " + per_rank(names, "called ")
    paths = [[path for path, _, _ in leaves] for _, leaves in signatures]
    if any(p != paths[0] for p in paths):
        return "the data has a different structure across ranks: " + per_rank(
            paths, "has tensors at ")
    for i, path in enumerate(paths[0]):
        where = "" if path == "data" else f" at {path}"
        shapes = [leaves[i][1] for _, leaves in signatures]
        if not compare_shapes and len({len(shape) for shape in shapes}) > 1:
            return (f"numbers of dimensions differ across ranks{where}: {per_rank(shapes)}; "
                    "give every rank tensors with the same dimensions")
        if compare_shapes and len(set(shapes)) > 1:
            return (f"tensor shapes differ across ranks{where}: {per_rank(shapes)}; "
                    "pad them first with accel.pad_across_processes")
        dtypes = [leaves[i][2] for _, leaves in signatures]
        if len(set(dtypes)) > 1:
            return (f"dtypes differ across ranks{where}: {per_rank(dtypes)}; "
                    "cast them to one dtype first")
    return None


def per_rank(values: list[Any], verb: str = "") -> str:
    return ", ".join(f"rank {rank} {verb}{value}" for rank, value in enumerate(values))


def explained(collective: Callable[..., Any]) -> Callable[..., Any]:
    """`collective`, re-raising torch's errors with what usually causes them."""

    @functools.wraps(collective)
    def explained(*args: Any, **kwargs: Any) -> Any:
        try:
            return collective(*args, **kwargs)
        except RuntimeError as exc:
            if isinstance(exc, AccelError):
                raise
            ctx = kwargs["ctx"] if "ctx" in kwargs else args[1]  # (data, ctx, ...) everywhere
            raise CollectiveFailedError(_failure(collective.__name__, ctx, exc)) from exc

    return explained


def _failure(name: str, ctx: Context, exc: RuntimeError) -> str:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return (
        f"{name} failed on rank {ctx.rank} of {ctx.world_size}: {lines[0]}\nEither another "
        "rank stopped (it crashed, or left the loop early, e.g. with fewer batches: see its "
        "log; distribute_loader's even_batches=True gives every rank as many), or the "
        "ranks passed tensors of different shapes or dtypes. "
        + ("Debug mode is on and checks the shapes of tensor collectives first: look for "
           "a rank that stopped." if ctx.debug
           else "Outside debug mode nothing compares shapes, and a mismatch can give a rank "
           "wrong data before a collective fails: rerun with ACCEL_DEBUG=1 (or accel launch "
           "--debug) to check shapes across ranks before every collective.")
    )
