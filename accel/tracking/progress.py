"""`progress`: a tqdm progress bar on the main process only, the plain iterable elsewhere."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from accel.context import Context
from accel.errors import MissingDependencyError
from accel.validation import check_bool, check_context, fail

T = TypeVar("T")


def progress(iterable: Iterable[T], ctx: Context, *, per_node: bool = False,
             **tqdm_kwargs: Any) -> Iterable[T]:
    """Wrap `iterable` in a tqdm bar (count, rate, ETA) on the main process; return it as is
    on every other rank, so N processes draw one bar, not N.

    Args:
        per_node: one bar per node (on each node's local main process) instead of one in all;
            each bar is labelled with its node.
        tqdm_kwargs: passed to `tqdm.tqdm` (desc, total, unit, leave, file, ...). The rate
            and the ETA need a length: loaders and lists have one, else pass `total=`.

    Raises:
        MissingDependencyError: tqdm is not installed (on every rank alike).

    >>> for batch in accel.progress(loader, ctx, desc=f"epoch {epoch}"):
    ...     train_step(batch)
    """
    if not isinstance(iterable, Iterable):
        fail("progress", "iterable", iterable, "an iterable (a loader, a list, a range)")
    check_context("progress", ctx)
    check_bool("progress", "per_node", per_node)
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise MissingDependencyError("tqdm", "tracking", "accel.tracking.progress") from exc
    shows_bar = ctx.is_local_main_process if per_node else ctx.is_main_process
    if not shows_bar:
        return iterable
    if per_node and ctx.num_nodes > 1:
        label = f"node {ctx.node_rank}"
        desc = tqdm_kwargs.pop("desc", None)
        tqdm_kwargs["desc"] = f"{label} {desc}" if desc else label
    return tqdm(iterable, **tqdm_kwargs)
