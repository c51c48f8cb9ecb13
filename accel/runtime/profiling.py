"""`profile_steps`: torch.profiler over a window of training steps, one trace per rank."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity

from accel.context import Context
from accel.errors import IncompatibleOptionsError
from accel.validation import check_bool, check_context, check_type, fail

FORMATS = ("chrome", "tensorboard")


class StepProfiler:
    """The object `profile_steps` yields: call `step()` once at the end of every step.

    Attributes:
        profiler: the running `torch.profiler.profile` (for `key_averages()` and the like).
        traces: the trace files written so far, in order.
    """

    def __init__(self, profiler: torch.profiler.profile, traces: list[Path]):
        self.profiler = profiler
        self.traces = traces

    def step(self) -> None:
        """Mark the end of a training step (moves the wait/warmup/active schedule on)."""
        with warnings.catch_warnings():
            # Each cycle is written to its own trace, so torch's note that a new cycle
            # drops the previous one's events is expected, not a problem to report.
            warnings.filterwarnings("ignore", message=".*Profiler clears events")
            self.profiler.step()


def default_activities(ctx: Context) -> list[ProfilerActivity]:
    """The CPU, plus the accelerator that `ctx.device` is (CUDA or XPU)."""
    activities = [ProfilerActivity.CPU]
    if ctx.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    elif ctx.device.type == "xpu" and hasattr(ProfilerActivity, "XPU"):
        activities.append(ProfilerActivity.XPU)
    return activities


def _check_schedule(wait: int, warmup: int, active: int, repeat: int, fmt: str) -> None:
    for name, value, minimum in (("wait", wait, 0), ("warmup", warmup, 0),
                                 ("active", active, 1), ("repeat", repeat, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise IncompatibleOptionsError(
                f"{name} must be an integer >= {minimum} (steps of the profiling window), "
                f"got {value!r}")
    if fmt not in FORMATS:
        raise IncompatibleOptionsError(f"trace_format must be one of {FORMATS}, got {fmt!r}")


def _chrome_writer(out_dir: Path, rank: int, traces: list[Path]) -> Any:
    def write_trace(profiler: torch.profiler.profile) -> None:
        path = out_dir / f"trace_rank{rank}_step{profiler.step_num}.json"
        profiler.export_chrome_trace(os.fspath(path))
        traces.append(path)
    return write_trace


def _tensorboard_writer(out_dir: Path, rank: int, traces: list[Path]) -> Any:
    handler = torch.profiler.tensorboard_trace_handler(os.fspath(out_dir),
                                                       worker_name=f"rank{rank}")

    def write_trace(profiler: torch.profiler.profile) -> None:
        before = set(out_dir.iterdir())
        handler(profiler)
        traces.extend(sorted(set(out_dir.iterdir()) - before))
    return write_trace


@contextlib.contextmanager
def profile_steps(
    ctx: Context,
    out_dir: str | os.PathLike[str],
    *,
    wait: int = 1,
    warmup: int = 1,
    active: int = 3,
    repeat: int = 1,
    activities: Iterable[ProfilerActivity] | None = None,
    record_shapes: bool = False,
    profile_memory: bool = False,
    with_stack: bool = False,
    trace_format: str = "chrome",
) -> Iterator[StepProfiler]:
    """Profile a window of steps with torch.profiler; every rank writes its own trace.

    The schedule skips `wait` steps, warms up for `warmup` (recorded, then dropped), records
    `active` steps and writes a trace; that cycle runs `repeat` times (0: until the block
    ends). Steps outside the window cost nothing.

    Args:
        out_dir: folder for the traces (created): `trace_rank{r}_step{n}.json` Chrome
            traces (open in chrome://tracing or Perfetto), or, with
            `trace_format="tensorboard"`, TensorBoard's `rank{r}.*.pt.trace.json` files.
        activities: torch `ProfilerActivity` values; default CPU plus the device's GPU.
        record_shapes, profile_memory, with_stack: as in `torch.profiler.profile`.

    >>> with accel.profile_steps(ctx, "traces", wait=1, warmup=1, active=2) as prof:
    ...     for batch in loader:
    ...         train_step(batch)
    ...         prof.step()
    """
    check_context("profile_steps", ctx)
    check_type("profile_steps", "out_dir", out_dir, (str, os.PathLike),
               "a folder path (str or pathlib.Path)")
    _check_schedule(wait, warmup, active, repeat, trace_format)
    for name, value in (("record_shapes", record_shapes), ("profile_memory", profile_memory),
                        ("with_stack", with_stack)):
        check_bool("profile_steps", name, value)
    if activities is not None and not (
            isinstance(activities, (list, tuple, set, frozenset)) and activities
            and all(isinstance(a, ProfilerActivity) for a in activities)):
        fail("profile_steps", "activities", activities,
             "a non-empty list of torch.profiler.ProfilerActivity values (or None)")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    traces: list[Path] = []
    writer = _chrome_writer if trace_format == "chrome" else _tensorboard_writer
    profiler = torch.profiler.profile(
        activities=list(activities) if activities is not None else default_activities(ctx),
        schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active,
                                         repeat=repeat),
        on_trace_ready=writer(folder, ctx.rank, traces),
        record_shapes=record_shapes,
        profile_memory=profile_memory,
        with_stack=with_stack,
    )
    with profiler:
        yield StepProfiler(profiler, traces)
