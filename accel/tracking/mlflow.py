"""MLflow tracker: a local SQLite store by default, never a server unless you name one.

Uses an `MlflowClient` bound to an explicit tracking URI (no global `mlflow.set_tracking_uri`,
no "active run"), so two trackers in one process never interfere. Each setting is, in
order: the argument (`options={"mlflow": {...}}`), MLflow's own variable, accel's default:
- store: `tracking_uri`, `$MLFLOW_TRACKING_URI`, `sqlite:///PROJECT_DIR/mlflow.db` (browse
  with `mlflow ui --backend-store-uri ...`); MLflow 3 refuses the old `./mlruns` file
  store unless MLFLOW_ALLOW_FILE_STORE=true.
- experiment: `experiment`, `$MLFLOW_EXPERIMENT_NAME`, the project folder's name.
- artifacts (images, tables) of a new experiment: `artifact_location`, else
  `PROJECT_DIR/mlartifacts` with the default store (a store named by `$MLFLOW_TRACKING_URI`
  decides where its artifacts go).
- run name: the run's name.
The first run in a new SQLite file creates MLflow's tables, which takes a few seconds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from accel.errors import InvalidArgumentError
from accel.tracking.base import require

#: MLflow's own limits per log_batch call.
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_PER_BATCH = 100


class MLflowTracker:
    """Log to an MLflow run through a client bound to `tracking_uri`.

    Args:
        project_dir: where the default SQLite store and artifacts live.
        run_name: the MLflow run's name.
        tracking_uri: any MLflow store URI; default `$MLFLOW_TRACKING_URI`, else
            `sqlite:///project_dir/mlflow.db`.
        experiment: experiment name; default `$MLFLOW_EXPERIMENT_NAME`, else the project
            folder's name.
        artifact_location: for a new experiment; default `project_dir/mlartifacts` with
            accel's default store, the store's own choice with `$MLFLOW_TRACKING_URI`.

    Once started, `tracker.client` is the `MlflowClient` and `tracker.run_id` the run.

    >>> tracker = MLflowTracker("runs", "exp1")
    >>> tracker.start({"lr": 1e-3}); tracker.log({"loss": 0.5}, step=1); tracker.finish()
    """

    name = "mlflow"

    def __init__(self, project_dir: str | Path, run_name: str, *, tracking_uri: str | None = None,
                 experiment: str | None = None, artifact_location: str | None = None):
        require("mlflow", "mlflow", "the mlflow tracker")
        project_dir = Path(project_dir).absolute()
        self.project_dir = project_dir
        self.run_name = run_name
        from_env = os.environ.get("MLFLOW_TRACKING_URI") or None
        self.tracking_uri = (tracking_uri or from_env
                             or f"sqlite:///{project_dir / 'mlflow.db'}")
        self.experiment = (experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
                           or project_dir.name)
        default_location = None if from_env else (project_dir / "mlartifacts").as_uri()
        self.artifact_location = artifact_location or default_location
        self.client: Any = None
        self.run_id: str | None = None

    def start(self, config: Mapping[str, Any] | None) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        if self.tracking_uri.startswith("sqlite:///"):  # SQLite creates the file, not its folder
            Path(self.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=self.tracking_uri)
        found = client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found is not None else client.create_experiment(
            self.experiment, artifact_location=self.artifact_location)
        self.run_id = client.create_run(experiment_id, run_name=self.run_name).info.run_id
        self.client = client
        params = [Param(key, value) for key, value in flatten(config or {}).items()]
        for chunk in _chunks(params, _MAX_PARAMS_PER_BATCH):
            client.log_batch(self.run_id, params=chunk)

    def log(self, metrics: Mapping[str, float | int], step: int) -> None:
        from mlflow.entities import Metric

        client = self._running()
        now = int(time.time() * 1000)
        entries = [Metric(name, float(value), now, step) for name, value in metrics.items()]
        for chunk in _chunks(entries, _MAX_METRICS_PER_BATCH):
            client.log_batch(self.run_id, metrics=chunk)

    def log_images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        client = self._running()
        for name, image in images.items():
            client.log_image(self.run_id, image, key=name, step=step)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                  step: int) -> None:
        data = {column: [row[index] for row in rows] for index, column in enumerate(columns)}
        # One file per step: MLflow would otherwise append to the same artifact.
        self._running().log_table(self.run_id, data, f"tables/{name}/step_{step}.json")

    def finish(self) -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id)
            self.client = None

    def _running(self) -> Any:
        if self.client is None:
            raise InvalidArgumentError(
                f"the mlflow tracker of run {self.run_name!r} is not running: call start() "
                "first (init_trackers does), and do not log after finish()"
            )
        return self.client


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings as dotted keys with string values (MLflow params are strings)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
