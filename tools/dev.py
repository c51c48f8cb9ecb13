#!/usr/bin/env python3
"""Developer entry point that needs nothing but Python 3.11+: a cached venv, then a task.

    python3 tools/dev.py demo            # tutorial 01 on 2 CPU processes (accel launch -n 2)
    python3 tools/dev.py test [ARGS]     # the test suite; ARGS go to pytest (-k ops, -x, ...)
    python3 tools/dev.py venv            # only build (or find) the venv; print its python

The virtual environment lives outside the checkout, in
$ACCEL_CACHE_DIR (default ~/.cache/accel)/venv-<hash>, where the hash covers the Python
version and every requirement installed; a change of dependencies builds a new one, a
fresh clone reuses the old one. DeepSpeed's JIT-built C++ ops are cached beside it, in
$ACCEL_CACHE_DIR/torch_extensions (TORCH_EXTENSIONS_DIR overrides). Only the standard
library is used here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Extras of pyproject.toml installed into the dev venv.
EXTRAS = ["dev", "fp8", "deepspeed", "tracking", "notebook", "peft", "ray", "streaming"]
# Pinned and installed first: an unpinned torch resolves to a CUDA build of several GB.
TORCH_PIN = "torch==2.13.0"

REPO = Path(__file__).resolve().parent.parent
COMPLETE_STAMP = ".accel-complete"
NO_TESTS_COLLECTED = 5  # pytest's exit code when nothing ran: a failure for us


def say(message: str) -> None:
    print(f"[dev] {message}", flush=True)


def requirements() -> list[str]:
    """Everything installed besides torch and the checkout itself, from pyproject.toml."""
    import tomllib

    with open(REPO / "pyproject.toml", "rb") as file:
        project = tomllib.load(file)
    extras = project["project"].get("optional-dependencies", {})
    missing = [name for name in EXTRAS if name not in extras]
    if missing:
        sys.exit(f"[dev] pyproject.toml has no extra(s) {missing}; fix EXTRAS in tools/dev.py")
    # The build backend too: the checkout is installed without build isolation.
    found = [*project["build-system"]["requires"], *project["project"]["dependencies"]]
    for name in EXTRAS:
        found += extras[name]
    return sorted(set(found))


def cache_dir() -> Path:
    """$ACCEL_CACHE_DIR, default ~/.cache/accel: venvs and built C++ ops, outside the checkout."""
    return Path(os.environ.get("ACCEL_CACHE_DIR") or Path.home() / ".cache" / "accel").expanduser()


def venv_dir(reqs: list[str]) -> Path:
    """The cache folder of the venv for these requirements and this Python."""
    key = json.dumps({"python": sys.version, "torch": TORCH_PIN, "requirements": reqs})
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / f"venv-{digest}"


def task_env() -> dict[str, str]:
    """The environment of a task, with TORCH_EXTENSIONS_DIR in the cache.

    DeepSpeed's JIT-built C++ ops (30-60 s each) land there, so the next run, and CI
    restoring the cache, loads them instead of building them again.
    """
    default = str(cache_dir() / "torch_extensions")
    return {**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", default)}


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def pip(venv: Path, *args: str) -> None:
    subprocess.run([str(venv_python(venv)), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", *args], check=True)


def build_venv(venv: Path, reqs: list[str]) -> None:
    """Create the venv and install torch, then the requirements, all under the torch pin."""
    if venv.exists():
        say(f"removing the incomplete venv {venv} (an earlier build was interrupted)")
        shutil.rmtree(venv)
    started = time.monotonic()
    say(f"creating venv {venv} (python {sys.version.split()[0]})...")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    say(f"installing {TORCH_PIN}...")
    pip(venv, TORCH_PIN)
    say(f"installing {len(reqs)} requirements (extras {', '.join(EXTRAS)})...")
    pip(venv, "-c", str(constraints), *reqs)
    (venv / COMPLETE_STAMP).write_text(json.dumps({"requirements": reqs}, indent=1))
    say(f"venv ready in {time.monotonic() - started:.0f} s")


@contextlib.contextmanager
def exclusive(lock_file: Path):
    """Hold an exclusive lock, so two runs never build the same venv at once."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no lock; concurrent first builds are the user's risk
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def ensure_venv() -> Path:
    """The venv for this checkout: reused when complete, (re)built otherwise."""
    reqs = requirements()
    venv = venv_dir(reqs)
    with exclusive(venv.with_name(venv.name + ".lock")):
        if (venv / COMPLETE_STAMP).exists():
            say(f"reusing venv {venv}")
        else:
            build_venv(venv, reqs)
        started = time.monotonic()
        # Cheap, and makes the shared venv import this checkout's accel.
        pip(venv, "-c", str(venv / "constraints.txt"), "--no-deps", "--no-build-isolation",
            "-e", str(REPO))
    say(f"installed this checkout ({REPO}) in {time.monotonic() - started:.1f} s")
    return venv


def run(venv: Path, args: list[str], env: dict[str, str] | None = None) -> int:
    started = time.monotonic()
    code = subprocess.run([str(venv_python(venv)), *args], cwd=REPO, env=env).returncode
    say(f"finished in {time.monotonic() - started:.1f} s with exit code {code}")
    return code


def demo(venv: Path, args: list[str]) -> int:
    say("running tutorial 01 on 2 CPU processes: accel launch -n 2 ...")
    tutorial = str(REPO / "tutorials" / "01_first_distributed_run.py")
    return run(venv, ["-m", "accel", "launch", "-n", "2", tutorial, *args], task_env())


def test(venv: Path, args: list[str]) -> int:
    # One thread per process: the spawned tests share the cores between 2 ranks, and a
    # fixed thread count keeps floating-point results the same on every machine.
    env = {**task_env(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if "-m" not in args and not any(_names_tests(arg) for arg in args):
        # The main suite; the heavy lane is `test -m heavy` (tests/conftest.py, HEAVY).
        args = ["-m", "not heavy", *args]
    say(f"running pytest {' '.join(args)}".rstrip())
    code = run(venv, ["-m", "pytest", *args], env)
    if code == NO_TESTS_COLLECTED:
        say("no tests were collected: that is a failure")
    return code


def _names_tests(arg: str) -> bool:
    """A file, folder or test id given on the command line: run what it names, heavy or not."""
    return "::" in arg or (not arg.startswith("-") and (REPO / arg).exists())


def show_venv(venv: Path, args: list[str]) -> int:
    print(venv_python(venv))
    return 0


TASKS = {"demo": demo, "test": test, "venv": show_venv}


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 11):
        sys.exit("[dev] tools/dev.py needs Python 3.11 or newer (it reads pyproject.toml "
                 "with tomllib)")
    if not argv or argv[0] not in TASKS:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        venv = ensure_venv()
    except subprocess.CalledProcessError as exc:
        say(f"venv setup failed: {' '.join(map(str, exc.cmd))} exited with {exc.returncode}")
        return exc.returncode or 1
    code = TASKS[argv[0]](venv, argv[1:])
    say(f"total {time.monotonic() - started:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
