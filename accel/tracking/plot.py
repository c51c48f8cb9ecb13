"""`plot_metrics`: PNG charts of a run's metrics, read from the JSONL tracker's file.

One chart per group of metrics, the step on the x axis. By default metrics that end in
the same name after a "/" share a chart ("train/loss" and "eval/loss" -> "loss"); every
other metric gets its own. Matplotlib's object API draws off screen (no pyplot state).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import attrs

from accel.errors import InvalidArgumentError, MissingDependencyError
from accel.tracking.jsonl import read_metrics
from accel.validation import check_type, fail

#: Every chart is WIDTH x HEIGHT pixels.
WIDTH, HEIGHT, DPI = 900, 500, 100


@attrs.frozen
class Chart:
    """One PNG written by `plot_metrics`: where, which metrics, how many points each."""

    path: Path
    title: str
    lines: tuple[str, ...]
    points: tuple[int, ...]


def plot_metrics(run_dir: str | Path, out: str | Path | None = None,
                 metrics: Sequence[str | Sequence[str]] | None = None) -> list[Chart]:
    """Draw the metrics of `run_dir/metrics.jsonl` as PNG charts (WIDTH x HEIGHT pixels).

    Args:
        run_dir: a run directory written by the jsonl tracker (project_dir/run_name).
        out: folder for the PNGs; default `run_dir/plots`.
        metrics: which charts: each entry a metric name or a list of names drawn together;
            default every metric, grouped by the name after the last "/".

    Returns:
        The charts written, each with its path, title, metric names and points per line.

    Raises:
        InvalidArgumentError: no metrics file, an empty run, or an unknown metric name.
        MissingDependencyError: matplotlib is not installed.

    >>> charts = accel.plot_metrics("runs/exp1")
    >>> [(c.path.name, c.lines) for c in charts]
    [('loss.png', ('train/loss', 'eval/loss')), ('lr.png', ('lr',))]
    """
    check_type("plot_metrics", "run_dir", run_dir, (str, os.PathLike), "a run folder path")
    check_type("plot_metrics", "out", out, (str, os.PathLike), "a folder path (or None)",
               optional=True)
    if metrics is not None and not (isinstance(metrics, (list, tuple)) and metrics and all(
            isinstance(entry, str) or (isinstance(entry, (list, tuple))
                                       and all(isinstance(name, str) for name in entry))
            for entry in metrics)):
        fail("plot_metrics", "metrics", metrics,
             "a non-empty list of metric names, or of lists of names drawn together "
             "(or None: every metric)")
    series = _read_series(run_dir)
    groups = _default_groups(series) if metrics is None else _chosen_groups(metrics, series)
    out_dir = Path(out) if out is not None else Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_draw(group, series, out_dir) for group in groups]


def _read_series(run_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in read_metrics(run_dir):
        for name, value in record["metrics"].items():
            steps, values = series.setdefault(name, ([], []))
            steps.append(record["step"])
            values.append(value)
    if not series:
        raise InvalidArgumentError(f"{run_dir} has no metrics logged yet; nothing to plot")
    return series


def _default_groups(series: dict[str, tuple[list[int], list[float]]]) -> list[tuple[str, ...]]:
    groups: dict[str, list[str]] = {}
    for name in series:  # insertion order: the order metrics were first logged
        groups.setdefault(name.rsplit("/", 1)[-1], []).append(name)
    return [tuple(names) for names in groups.values()]


def _chosen_groups(metrics: Sequence[str | Sequence[str]],
                   series: dict[str, tuple[list[int], list[float]]]) -> list[tuple[str, ...]]:
    groups = [(entry,) if isinstance(entry, str) else tuple(entry) for entry in metrics]
    unknown = [name for group in groups for name in group if name not in series]
    if unknown or not all(groups):
        raise InvalidArgumentError(
            f"cannot plot {unknown or 'an empty group'}; the run logged {sorted(series)}"
        )
    return groups


def _title(group: tuple[str, ...]) -> str:
    suffixes = {name.rsplit("/", 1)[-1] for name in group}
    return suffixes.pop() if len(group) > 1 and len(suffixes) == 1 else ", ".join(group)


def _draw(group: tuple[str, ...], series: dict[str, tuple[list[int], list[float]]],
          out_dir: Path) -> Chart:
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise MissingDependencyError("matplotlib", "tracking", "accel plot") from exc
    title = _title(group)
    figure = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI)
    axes = figure.add_subplot()
    for name in group:
        steps, values = series[name]
        # Markers keep a metric logged once (or only at a few steps) visible.
        axes.plot(steps, values, label=name, marker="o" if len(steps) < 30 else None,
                  markersize=3)
    axes.set(title=title, xlabel="step", ylabel=title)
    axes.grid(alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    if len(group) > 1:
        axes.legend()
    if all(v > 0 and math.isfinite(v) for name in group for v in series[name][1]) \
            and _spans_decades(group, series):
        axes.set_yscale("log")  # learning rates and early losses span orders of magnitude
    figure.tight_layout()
    path = out_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", title) + ".png")
    figure.savefig(path)
    points = tuple(len(series[name][0]) for name in group)
    return Chart(path=path, title=title, lines=group, points=points)


def _spans_decades(group: tuple[str, ...],
                   series: dict[str, tuple[list[int], list[float]]]) -> bool:
    values = [v for name in group for v in series[name][1]]
    return max(values) / min(values) >= 1000
