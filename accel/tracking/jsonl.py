"""The default tracker: one JSON line per `log` call in RUN_DIR/metrics.jsonl, no server.

Files in the run directory:
- `metrics.jsonl`: `{"step": 3, "time": 1718000000.5, "metrics": {"loss": 0.25}}` per line,
  flushed at once, so `accel plot` and `tail -f` see a running job.
- `tables.jsonl`: `{"step": 3, "time": ..., "table": "samples", "columns": [...],
  "rows": [[...]]}` per `log_table` call.
- `config.json`: the run's configuration, when one is given.

Images are not supported (use tensorboard, mlflow or wandb for them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from accel.errors import InvalidArgumentError

METRICS_FILE = "metrics.jsonl"
TABLES_FILE = "tables.jsonl"
CONFIG_FILE = "config.json"


class JsonlTracker:
    """Append metrics as JSON lines to `run_dir/metrics.jsonl`.

    Args:
        run_dir: the run's folder (created by `start`).
        resume: append to an existing metrics file (a resumed run) instead of refusing it.

    >>> tracker = JsonlTracker(Path("runs/exp1"))
    >>> tracker.start({"lr": 1e-3}); tracker.log({"loss": 0.5}, step=1); tracker.finish()
    """

    name = "jsonl"

    def __init__(self, run_dir: str | Path, *, resume: bool = False):
        self.run_dir = Path(run_dir)
        self.resume = resume
        self._files: dict[str, IO[str]] = {}

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE

    def start(self, config: Mapping[str, Any] | None) -> None:
        if self.metrics_path.exists() and not self.resume:
            raise InvalidArgumentError(
                f"{self.metrics_path} already exists: choose another run_name, delete the "
                "file, or pass options={'jsonl': {'resume': True}} to append to it"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            text = json.dumps(dict(config), indent=2, sort_keys=True, default=repr)
            (self.run_dir / CONFIG_FILE).write_text(text + "\n")
        self._open(METRICS_FILE)

    def log(self, metrics: Mapping[str, float | int], step: int) -> None:
        self._write(METRICS_FILE, {"step": step, "time": time.time(), "metrics": dict(metrics)})

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                  step: int) -> None:
        record = {"step": step, "time": time.time(), "table": name,
                  "columns": list(columns), "rows": [list(row) for row in rows]}
        self._write(TABLES_FILE, record)

    def finish(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def _open(self, filename: str) -> IO[str]:
        if filename not in self._files:
            # Line buffered: every record reaches the file when written, crash or not.
            self._files[filename] = open(self.run_dir / filename, "a", buffering=1)
        return self._files[filename]

    def _write(self, filename: str, record: dict[str, Any]) -> None:
        if METRICS_FILE not in self._files:
            raise InvalidArgumentError(
                f"the jsonl tracker of {self.run_dir} is not running: call start() first "
                "(init_trackers does), and do not log after finish()"
            )
        self._open(filename).write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of `run_dir/metrics.jsonl`, in order: dicts with step, time, metrics.

    >>> [r["metrics"]["loss"] for r in read_metrics("runs/exp1")]
    [0.5]
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise InvalidArgumentError(
            f"{path} does not exist: pass the run directory that the jsonl tracker wrote "
            "(project_dir/run_name)"
        )
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
