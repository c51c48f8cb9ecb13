"""`progress`: a tqdm progress bar on the main process only, the plain iterable elsewhere.

In a terminal the bar redraws itself in place. Written to a file or a pipe (a CI log,
`accel launch ... > log`), where every redraw would be a line of its own, it prints one
line every `log_interval` seconds (30 by default) instead, plus the first and the last.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any, TypeVar

from accel.context import Context
from accel.errors import MissingDependencyError
from accel.validation import check_bool, check_context, check_number, fail

T = TypeVar("T")


def progress(iterable: Iterable[T], ctx: Context, *, per_node: bool = False,
             log_interval: float = 30.0, **tqdm_kwargs: Any) -> Iterable[T]:
    """Wrap `iterable` in a tqdm bar (count, rate, ETA) on the main process; return it as is
    on every other rank, so N processes draw one bar, not N.

    Args:
        per_node: one bar per node (on each node's local main process) instead of one in all;
            each bar is labelled with its node.
        log_interval: seconds between two lines when the bar's stream (`file`, stderr by
            default) is not a terminal, as in a CI log: the bar is then printed as whole
            lines (ASCII), the first, one per `log_interval` and the last, instead of
            being redrawn at every update. A `mininterval=` of yours wins.
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
    check_number("progress", "log_interval", log_interval, minimum=0)
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
    stream = tqdm_kwargs.get("file") or sys.stderr
    if not _is_notebook_bar(tqdm) and not _is_terminal(stream):
        tqdm_kwargs = _as_log_lines(tqdm_kwargs, stream, log_interval)
    return tqdm(iterable, **tqdm_kwargs)


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _is_notebook_bar(bar_class: type) -> bool:
    """tqdm.auto picked the widget bar (a Jupyter kernel): it redraws in place anyway."""
    return any(cls.__module__ == "tqdm.notebook" for cls in bar_class.__mro__)


def _as_log_lines(kwargs: dict[str, Any], stream: IO[str], interval: float) -> dict[str, Any]:
    merged = {"mininterval": interval, "ascii": True, **kwargs, "file": _Lines(stream)}
    # tqdm's monitor thread redraws a bar idle for maxinterval (10 s): not more often.
    merged["maxinterval"] = max(merged.get("maxinterval", 10.0), merged["mininterval"])
    return merged


class _Lines:
    """A stream that turns tqdm's in-place redraws ("\r" + text + padding) into lines."""

    def __init__(self, stream: IO[str]):
        self._stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:  # the redraw itself; the bare "\n" of close() would be an empty line
            self._stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, ... of the real stream
        return getattr(self._stream, name)
