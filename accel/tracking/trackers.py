"""`init_trackers` and `Trackers`: one group of trackers, logging on the main process only.

Every rank calls `init_trackers` and `trackers.log(...)` with the same code; only the main
process (rank 0) starts the trackers and writes anything. On the other ranks the group
is inactive by design: it still checks every value (a bad metric fails on every rank
alike) and then returns, creating no file, no writer, no client.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import attrs

from accel.context import Context
from accel.errors import InvalidArgumentError, UnsupportedError
from accel.tracking import values
from accel.tracking.base import Tracker
from accel.validation import check_context, check_mapping, check_str, check_type, fail, shown

#: Trackers built in, by name; "jsonl" is the default and needs no extra package.
BUILT_IN = ("jsonl", "tensorboard", "mlflow", "wandb")


@attrs.frozen
class Trackers:
    """A fixed group of started trackers; log to all of them at once.

    `active` is True on the main process only; on every other rank the group checks
    values and logs nothing (by design: metrics are logged once, by rank 0). As a context
    manager it finishes the trackers on exit.

    >>> with accel.init_trackers(ctx, ["jsonl"], "runs") as trackers:
    ...     trackers.log({"loss": loss}, step)
    """

    trackers: tuple[Tracker, ...]
    run_dir: Path
    active: bool

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(tracker.name for tracker in self.trackers)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalar metrics (numbers or 0-d tensors) at `step` to every tracker.

        Raises:
            InvalidArgumentError: a value is not a scalar, or step is not an int >= 0.

        >>> trackers.log({"loss": loss.detach(), "lr": scheduler.get_last_lr()[0]}, step)
        """
        converted, step = values.to_metrics(metrics), values.check_step(step)
        if self.active:
            for tracker in self.trackers:
                tracker.log(converted, step)

    def log_images(self, images: Mapping[str, Any], step: int) -> None:
        """Log images (HW or HWC arrays/tensors, uint8 or floats in [0, 1]) at `step`.

        Raises:
            UnsupportedError: a tracker of the group cannot log images (jsonl cannot);
                nothing is logged then. Log to one tracker with `tracker(name).log_images`.
        """
        self._require("log_images", "images")
        converted, step = values.to_images(images), values.check_step(step)
        if self.active:
            for tracker in self.trackers:
                tracker.log_images(converted, step)  # type: ignore[attr-defined]

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                  step: int) -> None:
        """Log a table (column names, rows of str or numbers) at `step` to every tracker.

        Raises:
            UnsupportedError: a tracker of the group cannot log tables; nothing is logged.
        """
        self._require("log_table", "tables")
        columns, rows = values.to_table(name, columns, rows)
        step = values.check_step(step)
        if self.active:
            for tracker in self.trackers:
                tracker.log_table(name, columns, rows, step)  # type: ignore[attr-defined]

    def tracker(self, name: str) -> Tracker:
        """The tracker called `name`, for its native object (`.writer`, `.client`, `.run`).

        Raises:
            UnsupportedError: on a non-main rank, where no tracker runs.
            InvalidArgumentError: no tracker of that name in the group.

        >>> trackers.tracker("tensorboard").writer.add_histogram("w", weights, step)
        """
        if not self.active:
            raise UnsupportedError(
                f"tracker {name!r} runs on the main process only; guard native calls with "
                "`if trackers.active:` (or ctx.is_main_process)"
            )
        for tracker in self.trackers:
            if tracker.name == name:
                return tracker
        raise InvalidArgumentError(f"no tracker named {name!r}; this group has {self.names}")

    def finish(self) -> None:
        """Flush and close every tracker; finishing twice is harmless."""
        if self.active:
            for tracker in self.trackers:
                tracker.finish()

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.finish()

    def _require(self, method: str, what: str) -> None:
        unable = [tracker.name for tracker in self.trackers if not hasattr(tracker, method)]
        if unable:
            able = [name for name in self.names if name not in unable]
            raise UnsupportedError(
                f"tracker(s) {unable} cannot log {what}; nothing was logged. Log to the "
                f"ones that can with trackers.tracker(name).{method}(...) (here: {able}), "
                "or leave the others out of init_trackers"
            )


def init_trackers(
    ctx: Context,
    trackers: Sequence[str | Tracker] = ("jsonl",),
    project_dir: str | Path = "runs",
    config: Mapping[str, Any] | None = None,
    *,
    run_name: str | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> Trackers:
    """Build the named trackers (or your own objects) and start them on the main process.

    Args:
        trackers: built-in names ("jsonl", "tensorboard", "mlflow", "wandb") and/or objects
            with `name`, `start(config)`, `log(metrics, step)`, `finish()`.
        project_dir: the folder of all runs; this run writes to `project_dir/run_name`.
        config: hyperparameters recorded by every tracker at start.
        run_name: default: the start time, e.g. "20250101-120000" (name runs explicitly
            in multi-rank jobs if other ranks need `run_dir`: their clocks may differ).
        options: keyword arguments per built-in tracker, e.g.
            {"mlflow": {"tracking_uri": "sqlite:///m.db"}, "wandb": {"project": "demo"}}.

    Returns:
        Trackers, active on the main process only (inactive elsewhere, by design).

    Raises:
        MissingDependencyError: a tracker's library is missing (on every rank alike).
        InvalidArgumentError: unknown name, duplicate names, an object that is no tracker.

    >>> with accel.init_trackers(ctx, ["jsonl", "tensorboard"], "runs", {"lr": 1e-3}) as t:
    ...     t.log({"loss": loss}, step=1)
    """
    _check_arguments(ctx, trackers, project_dir, config, run_name, options)
    run_name = run_name or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    project_dir = Path(project_dir)
    options = dict(options or {})
    unknown = sorted(set(options) - set(BUILT_IN))
    if unknown:
        raise InvalidArgumentError(
            f"options for unknown tracker(s) {unknown}; options apply to {BUILT_IN}"
        )
    built = tuple(_build(item, project_dir, run_name, options) for item in trackers)
    _check_unique(built)
    group = Trackers(built, project_dir / run_name, active=ctx.is_main_process)
    if group.active:
        _start_all(built, config)
    return group


def _check_arguments(ctx: Any, trackers: Any, project_dir: Any, config: Any, run_name: Any,
                     options: Any) -> None:
    check_context("init_trackers", ctx)
    # A str is a Sequence too: "jsonl" would be read as the trackers "j", "s", "o", ...
    check_type("init_trackers", "trackers", trackers, (list, tuple),
               "a list of tracker names and/or tracker objects, e.g. ['jsonl']")
    check_type("init_trackers", "project_dir", project_dir, (str, os.PathLike),
               "a folder path (str or pathlib.Path)")
    check_mapping("init_trackers", "config", config, "a dict of hyperparameters (or None)",
                  optional=True)
    check_str("init_trackers", "run_name", run_name, optional=True)
    if options is not None and not (isinstance(options, Mapping) and all(
            isinstance(value, Mapping) for value in options.values())):
        fail("init_trackers", "options", options,
             "a dict from tracker name to a dict of its keyword arguments (or None)")


def _build(item: str | Tracker, project_dir: Path, run_name: str,
           options: Mapping[str, Mapping[str, Any]]) -> Tracker:
    if not isinstance(item, str):
        missing = [attr for attr in ("name", "start", "log", "finish") if not hasattr(item, attr)]
        if missing:
            raise InvalidArgumentError(
                f"accel.init_trackers: trackers holds {shown(item)}, which is not a tracker: "
                f"it lacks {missing}; give it a `name` and "
                "`start(config)`, `log(metrics, step)`, `finish()` methods"
            )
        return item
    if item not in BUILT_IN:
        raise InvalidArgumentError(
            f"accel.init_trackers: trackers holds an unknown tracker {item!r}; built-in "
            f"trackers are {BUILT_IN}, or pass an object "
            "with name, start, log and finish"
        )
    return _FACTORIES[item](project_dir, run_name, dict(options.get(item, {})))


def _check_unique(built: tuple[Tracker, ...]) -> None:
    names = [tracker.name for tracker in built]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InvalidArgumentError(
            f"tracker names must be unique, {duplicates} appear more than once"
        )


def _start_all(built: tuple[Tracker, ...], config: Mapping[str, Any] | None) -> None:
    started: list[Tracker] = []
    try:
        for tracker in built:
            tracker.start(config)
            started.append(tracker)
    except BaseException:
        # Close what already runs (writers, W&B service) before the error propagates.
        for tracker in started:
            tracker.finish()
        raise


def _jsonl(project_dir: Path, run_name: str, opts: dict[str, Any]) -> Tracker:
    from accel.tracking.jsonl import JsonlTracker

    return JsonlTracker(project_dir / run_name, **opts)


def _tensorboard(project_dir: Path, run_name: str, opts: dict[str, Any]) -> Tracker:
    from accel.tracking.tensorboard import TensorBoardTracker

    return TensorBoardTracker(project_dir / run_name, **opts)


def _mlflow(project_dir: Path, run_name: str, opts: dict[str, Any]) -> Tracker:
    from accel.tracking.mlflow import MLflowTracker

    return MLflowTracker(project_dir, run_name, **opts)


def _wandb(project_dir: Path, run_name: str, opts: dict[str, Any]) -> Tracker:
    from accel.tracking.wandb import WandbTracker

    return WandbTracker(project_dir / run_name, run_name, **opts)


_FACTORIES: Mapping[str, Callable[[Path, str, dict[str, Any]], Tracker]] = MappingProxyType({
    "jsonl": _jsonl, "tensorboard": _tensorboard, "mlflow": _mlflow, "wandb": _wandb,
})
