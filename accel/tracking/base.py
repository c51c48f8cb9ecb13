"""The tracker protocol every backend implements, and the check for its optional package.

A tracker is any object with a `name` and `start`, `log`, `finish` methods. Logging
images and tables is optional: a tracker that can do it has `log_images` /
`log_table`; one without them makes `Trackers.log_images` / `log_table` raise
`UnsupportedError` naming it, before anything is logged anywhere.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from accel.errors import MissingDependencyError

#: The extra that installs every tracker library.
EXTRA = "tracking"


@runtime_checkable
class Tracker(Protocol):
    """What `init_trackers` needs from a tracker (built in, or your own object).

    Optional methods, present only where the backend supports them:
    `log_images(images: dict[str, np.ndarray], step: int)` (uint8 HW or HWC arrays) and
    `log_table(name: str, columns: list[str], rows: list[list], step: int)`.

    >>> class PrintTracker:
    ...     name = "print"
    ...     def start(self, config): print("config", config)
    ...     def log(self, metrics, step): print(step, metrics)
    ...     def finish(self): pass
    """

    name: str

    def start(self, config: Mapping[str, Any] | None) -> None:
        """Open the run (files, writer, client) and record the run's configuration."""

    def log(self, metrics: Mapping[str, float | int], step: int) -> None:
        """Record scalar metrics (already converted to python numbers) at `step`."""

    def finish(self) -> None:
        """Flush and close the run; calling it twice is harmless."""


def require(module: str, package: str, purpose: str) -> None:
    """Raise MissingDependencyError naming `accel[tracking]` unless `module` is importable.

    Finds the module without importing it, so every rank can check cheaply (mlflow takes
    seconds to import) and a missing package fails on all ranks alike, not on rank 0 only.
    """
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(package, EXTRA, purpose)
