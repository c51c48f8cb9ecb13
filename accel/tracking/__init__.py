"""Experiment tracking: metrics, images and tables to JSONL, TensorBoard, MLflow or W&B.

`init_trackers(ctx, names_or_objects, project_dir, config)` starts the trackers on the
main process and returns a `Trackers` group; `trackers.log(metrics, step)` logs to all.
The backends' libraries are imported only when their tracker is built (`accel[tracking]`).

>>> with accel.init_trackers(ctx, ["jsonl", "tensorboard"], "runs", {"lr": 1e-3}) as t:
...     t.log({"loss": loss}, step=1)
"""

from __future__ import annotations

# These modules import their libraries (tensorboard, mlflow, wandb) only when a tracker
# starts, so importing them here keeps `import accel` light.
from accel.tracking.base import Tracker
from accel.tracking.jsonl import JsonlTracker, read_metrics
from accel.tracking.mlflow import MLflowTracker
from accel.tracking.tensorboard import TensorBoardTracker
from accel.tracking.trackers import BUILT_IN, Trackers, init_trackers
from accel.tracking.wandb import WandbTracker

__all__ = [
    "BUILT_IN", "JsonlTracker", "MLflowTracker", "TensorBoardTracker", "Tracker", "Trackers",
    "WandbTracker", "init_trackers", "read_metrics",
]
