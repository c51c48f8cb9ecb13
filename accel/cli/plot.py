"""`accel plot RUN_DIR`: PNG charts of the metrics a run logged with the jsonl tracker."""

from __future__ import annotations

import argparse
from typing import Any

from accel.tracking.plot import HEIGHT, WIDTH, plot_metrics


def add_parser(subparsers: Any) -> None:
    """Register `accel plot` on the `accel` command line."""
    parser = subparsers.add_parser(
        "plot",
        help="PNG charts of a run's logged metrics (loss, learning rate, throughput, ...)",
        description=f"Draw the metrics in RUN_DIR/metrics.jsonl as {WIDTH}x{HEIGHT} PNG "
                    "charts, step on the x axis. By default metrics ending in the same name "
                    "after a '/' share a chart (train/loss and eval/loss).",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="the run's folder (project_dir/run_name) holding metrics.jsonl")
    parser.add_argument("--out", default=None,
                        help="folder for the PNG files (default: RUN_DIR/plots)")
    parser.add_argument("--metrics", nargs="+", default=None, metavar="NAME[,NAME...]",
                        help="the charts to draw: one per argument; names joined by commas "
                             "share a chart (e.g. --metrics train/loss,eval/loss lr)")
    parser.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    """`accel plot RUN_DIR [--out DIR] [--metrics ...]`: prints one line per chart written."""
    groups = None if args.metrics is None else [entry.split(",") for entry in args.metrics]
    for chart in plot_metrics(args.run_dir, out=args.out, metrics=groups):
        lines = ", ".join(f"{name} ({count} points)"
                          for name, count in zip(chart.lines, chart.points, strict=True))
        print(f"{chart.path}: {lines}")
    return 0
