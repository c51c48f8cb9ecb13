#!/usr/bin/env python3
"""The XLA test lane: tests/xla in its own cached venv with torch 2.9 + torch_xla 2.9, PJRT CPU.

    python3 tools/xla_lane.py [--allow-skip] [PYTEST_ARGS]   # build once (cached), run tests/xla
    python3 tools/xla_lane.py --venv                         # only build (or find) the venv

torch_xla 2.9 needs exactly torch 2.9, while the main suite runs torch 2.13, so the lane has a
venv of its own, in $ACCEL_CACHE_DIR (default ~/.cache/accel)/xla-venv-<hash>; the hash covers
the Python version and the pins below. The only reachable torch 2.9 wheel is the CUDA build
(~4.1 GB download, ~7 GB on disk, a few minutes, once). When the venv cannot be built (no network,
no disk) the lane prints one line saying it is SKIPPED and why, and exits 0 only with
--allow-skip (non-zero otherwise, so a skip is never mistaken for a pass). Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dev import (  # noqa: E402  (tools/ is not a package)
    COMPLETE_STAMP,
    NO_TESTS_COLLECTED,
    REPO,
    cache_dir,
    exclusive,
    pip,
    venv_python,
)

TORCH_PINS = ["torch==2.9.0", "torch_xla==2.9.0"]
# What the tests need besides torch; the checkout itself goes in with --no-deps.
# Installed on every run (pip does nothing, offline, when they are already there), so a
# change here does not cost a new 4 GB venv: only TORCH_PINS name the venv.
OTHER_PINS = ["attrs>=23.1", "numpy>=1.24", "safetensors>=0.4", "tqdm>=4.66", "pytest>=8",
              "pytest-timeout>=2.2", "setuptools>=68"]
# torch 2.9 + torch_xla 2.9 need about this much free disk (the wheels are cached by pip too).
NEEDED_FREE_BYTES = 14 * 1024**3
SKIPPED_EXIT = 3  # a skip without --allow-skip: distinct from a test failure (1)


def say(message: str) -> None:
    print(f"[xla-lane] {message}", flush=True)


def lane_venv() -> Path:
    key = json.dumps({"python": sys.version, "pins": TORCH_PINS})
    return cache_dir() / f"xla-venv-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


class LaneSkipped(Exception):
    """The venv cannot be built here; the message says why."""


def check_disk(where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    if free < NEEDED_FREE_BYTES:
        raise LaneSkipped(f"only {free / 1024**3:.1f} GiB free in {where}; building the torch 2.9 "
                          f"+ torch_xla venv needs ~{NEEDED_FREE_BYTES // 1024**3} GiB")


def build(venv: Path) -> None:
    """Create the venv and install the pins; leaves no stamp (so it is rebuilt) on failure."""
    if venv.exists():
        say(f"removing the incomplete venv {venv} (an earlier build was interrupted)")
        shutil.rmtree(venv)
    check_disk(venv.parent)
    started = time.monotonic()
    say(f"creating {venv}: {' '.join(TORCH_PINS)} (~4 GB download, once)...")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text("\n".join(TORCH_PINS) + "\n")
    try:
        pip(venv, *TORCH_PINS)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(venv, ignore_errors=True)
        raise LaneSkipped(
            f"pip could not install {' '.join(TORCH_PINS)} (exit code {exc.returncode}; "
            "no network or no such wheel for this Python?)") from exc
    (venv / COMPLETE_STAMP).write_text(json.dumps({"pins": TORCH_PINS}, indent=1))
    say(f"venv built in {time.monotonic() - started:.0f} s")


def ensure_lane_venv() -> Path:
    venv = lane_venv()
    with exclusive(venv.with_name(venv.name + ".lock")):
        if (venv / COMPLETE_STAMP).exists():
            say(f"reusing {venv}")
        else:
            build(venv)
        pip(venv, "-c", str(venv / "constraints.txt"), *OTHER_PINS)
        pip(venv, "-c", str(venv / "constraints.txt"), "--no-deps", "--no-build-isolation",
            "-e", str(REPO))
    return venv


def run_tests(venv: Path, pytest_args: list[str]) -> int:
    # PJRT_DEVICE=CPU: torch_xla's CPU device, on any machine. The SPMD tests start their own
    # subprocesses with CPU_NUM_DEVICES set, since it is read once at torch_xla's import.
    env = {**os.environ, "PJRT_DEVICE": os.environ.get("PJRT_DEVICE", "CPU"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = time.monotonic()
    say(f"running pytest tests/xla {' '.join(pytest_args)}".rstrip())
    code = subprocess.run([str(venv_python(venv)), "-m", "pytest", "tests/xla", *pytest_args],
                          cwd=REPO, env=env).returncode
    say(f"tests finished in {time.monotonic() - started:.1f} s with exit code {code}")
    if code == NO_TESTS_COLLECTED:
        say("no tests were collected: that is a failure")
    return code


def main(argv: list[str]) -> int:
    allow_skip = "--allow-skip" in argv
    only_venv = "--venv" in argv
    pytest_args = [a for a in argv if a not in ("--allow-skip", "--venv")]
    started = time.monotonic()
    try:
        venv = ensure_lane_venv()
    except (LaneSkipped, OSError, subprocess.CalledProcessError) as exc:
        verdict = ("allowed by --allow-skip" if allow_skip
                   else "failing (pass --allow-skip to accept)")
        say(f"XLA lane SKIPPED: {exc} [{verdict}]")
        return 0 if allow_skip else SKIPPED_EXIT
    if only_venv:
        print(venv_python(venv))
        return 0
    code = run_tests(venv, pytest_args)
    say(f"total {time.monotonic() - started:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
