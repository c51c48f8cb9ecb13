"""Weights & Biases tracker, offline by default: the run is written under RUN_DIR/wandb.

Upload it later with `wandb sync RUN_DIR/wandb/offline-run-*`, or pass mode="online"
(options={"wandb": {"mode": "online"}}) to stream it. W&B's own variables win over these
defaults (an argument wins over both): `WANDB_MODE` (online, offline, disabled) over
offline, `WANDB_DIR` over RUN_DIR, `WANDB_PROJECT` over the project folder's name; W&B
reads them itself. W&B also keeps logs and artifact staging under its own folders
(WANDB_CACHE_DIR, WANDB_DATA_DIR; ~/.cache/wandb and ~/.local/share/wandb by default).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from accel.errors import InvalidArgumentError
from accel.tracking.base import require

#: wandb.init's arguments that W&B also reads from its own variables.
_OWN_VARIABLES = {"mode": "WANDB_MODE", "dir": "WANDB_DIR", "project": "WANDB_PROJECT"}


class WandbTracker:
    """Log to a W&B run started with `wandb.init(mode="offline", dir=run_dir, ...)`.

    Args:
        run_dir: the run's folder; W&B writes `run_dir/wandb/offline-run-*` (default:
            `$WANDB_DIR` when set).
        run_name: the W&B run's display name.
        project: the W&B project; default `$WANDB_PROJECT`, else the project folder's name.
        init_kwargs: passed to `wandb.init` (mode, entity, tags, settings, ...); mode
            defaults to `$WANDB_MODE`, else "offline".

    Once started, `tracker.run` is the `wandb.Run` (for wandb.Histogram, alerts, ...).
    W&B drops values logged at a step below the last one, so this tracker refuses them.

    >>> tracker = WandbTracker("runs/exp1", "exp1", project="demo")
    >>> tracker.start({"lr": 1e-3}); tracker.log({"loss": 0.5}, step=1); tracker.finish()
    """

    name = "wandb"

    def __init__(self, run_dir: str | Path, run_name: str, *, project: str | None = None,
                 **init_kwargs: Any):
        require("wandb", "wandb", "the wandb tracker")
        self.run_dir = Path(run_dir).absolute()
        self.run_name = run_name
        # accel's defaults, for what W&B's own variables leave unset: wandb.init reads those.
        defaults = {"mode": "offline", "dir": str(self.run_dir),
                    "project": self.run_dir.parent.name}
        unset = {name: value for name, value in defaults.items()
                 if not os.environ.get(_OWN_VARIABLES[name])}
        self.init_kwargs = {**unset, **({"project": project} if project else {}),
                            **init_kwargs}
        self.run: Any = None
        self._last_step = -1

    def start(self, config: Mapping[str, Any] | None) -> None:
        import wandb

        if "dir" in self.init_kwargs:
            Path(self.init_kwargs["dir"]).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(name=self.run_name,
                              config=dict(config) if config is not None else None,
                              **self.init_kwargs)

    def log(self, metrics: Mapping[str, float | int], step: int) -> None:
        self._log(dict(metrics), step)

    def log_images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        import wandb

        self._log({name: wandb.Image(image) for name, image in images.items()}, step)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                  step: int) -> None:
        import wandb

        table = wandb.Table(columns=list(columns), data=[list(row) for row in rows])
        self._log({name: table}, step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    def _log(self, values: dict[str, Any], step: int) -> None:
        if self.run is None:
            raise InvalidArgumentError(
                f"the wandb tracker of run {self.run_name!r} is not running: call start() "
                "first (init_trackers does), and do not log after finish()"
            )
        if step < self._last_step:
            raise InvalidArgumentError(
                f"step {step} is below the last logged step {self._last_step}; W&B would "
                "drop these values: log steps in non-decreasing order"
            )
        self._last_step = step
        self.run.log(values, step=step)
