"""TensorBoard tracker: real event files in RUN_DIR/tensorboard, written by torch's SummaryWriter.

View them with `tensorboard --logdir PROJECT_DIR`. Scalars and images are native; a
table becomes a markdown table in the Text tab; the configuration is a JSON text entry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from accel.errors import InvalidArgumentError
from accel.tracking.base import require

SUBDIR = "tensorboard"


class TensorBoardTracker:
    """Write scalars, images, tables and the config to TensorBoard event files.

    Args:
        run_dir: the run's folder; events go to `run_dir/tensorboard`.
        writer_kwargs: passed to `torch.utils.tensorboard.SummaryWriter` (e.g. flush_secs).

    The native writer is `tracker.writer` once started (histograms, graphs, embeddings).

    >>> tracker = TensorBoardTracker("runs/exp1")
    >>> tracker.start(None); tracker.log({"loss": 0.5}, step=1); tracker.finish()
    """

    name = "tensorboard"

    def __init__(self, run_dir: str | Path, **writer_kwargs: Any):
        require("tensorboard", "tensorboard", "the tensorboard tracker")
        self.log_dir = Path(run_dir) / SUBDIR
        self.writer_kwargs = writer_kwargs
        self.writer: Any = None

    def start(self, config: Mapping[str, Any] | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir), **self.writer_kwargs)
        if config is not None:
            text = json.dumps(dict(config), indent=2, sort_keys=True, default=repr)
            # Four leading spaces: TensorBoard renders the text as markdown, this as code.
            self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)

    def log(self, metrics: Mapping[str, float | int], step: int) -> None:
        writer = self._running()
        for name, value in metrics.items():
            writer.add_scalar(name, value, step)

    def log_images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        writer = self._running()
        for name, image in images.items():
            writer.add_image(name, image, step, dataformats="HW" if image.ndim == 2 else "HWC")

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                  step: int) -> None:
        self._running().add_text(name, markdown_table(columns, rows), step)

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _running(self) -> Any:
        if self.writer is None:
            raise InvalidArgumentError(
                f"the tensorboard tracker of {self.log_dir} is not running: call start() "
                "first (init_trackers does), and do not log after finish()"
            )
        return self.writer


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table, which TensorBoard's Text tab renders as a table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
