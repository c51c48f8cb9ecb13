"""Helpers shared by test modules (tests/ is on sys.path through pytest's rootdir)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from accel.testing import LAUNCH_VARIABLES

REPO = Path(__file__).resolve().parent.parent


def accel_cli(*args: str, pythonpath: tuple[Path, ...] = (), extra_env: dict | None = None,
              timeout: float = 180) -> subprocess.CompletedProcess:
    """Run `python -m accel ARGS` as a user would, with this checkout importable."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(map(str, (REPO, *pythonpath)))
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "accel", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=timeout)
