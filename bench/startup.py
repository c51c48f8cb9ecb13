"""Start-up cost: `import accel` against `import torch`, `accel launch` against `torchrun`.

Each figure is the CPU time (user + system) of a whole process tree, read with
`resource.getrusage(RUSAGE_CHILDREN)` around one run: interpreter start, imports, the
launcher, its workers and their exit. The two sides of a comparison run in alternating
pairs (A B, B A, A B, ...) so that machine drift favours neither; the report gives the
medians and their ratio, and the median of the per-pair ratios.

    python bench/startup.py                  # 5 pairs per comparison (~3 min on 2 idle cores)
    python bench/startup.py --pairs 3        # quicker, noisier
    python bench/startup.py --only import    # or: launch

Comparisons (right side over left side; 1.00 = the same cost):
- `import torch` -> `import accel` (the lazy table alone), `import accel` + `accel.init`
  (the name resolved: torch and accel's core load), `import accelerate` (when installed).
- `torchrun --nproc_per_node 2 trivial.py` -> `accel launch -n 2 trivial.py`; the same
  script (`accel.init()`, `accel.shutdown(ctx)`) under both launchers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRIVIAL_SCRIPT = "import accel\nctx = accel.init()\naccel.shutdown(ctx)\n"
#: The targets of issue 18: right side / left side must stay at or below these.
TARGETS = {"import accel + accel.init": 1.05, "accel launch -n 2": 1.10}


def cpu_seconds(command: Sequence[str], env: dict[str, str]) -> float:
    """CPU time of `command` and every process it started (all waited for on exit)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def compare(name: str, left: Sequence[str], right: Sequence[str], pairs: int,
            env: dict[str, str]) -> dict:
    """Alternating pairs of runs; medians, their ratio and the median per-pair ratio."""
    cpu_seconds(left, env), cpu_seconds(right, env)  # warm the page cache, untimed
    lefts, rights = [], []
    for index in range(pairs):
        if index % 2 == 0:
            lefts.append(cpu_seconds(left, env))
            rights.append(cpu_seconds(right, env))
        else:
            rights.append(cpu_seconds(right, env))
            lefts.append(cpu_seconds(left, env))
    ratios = [r / left_ for left_, r in zip(lefts, rights, strict=True)]
    return {"name": name, "left_s": statistics.median(lefts),
            "right_s": statistics.median(rights),
            "ratio": statistics.median(rights) / statistics.median(lefts),
            "pair_ratio": statistics.median(ratios), "pair_range": [min(ratios), max(ratios)],
            "target": TARGETS.get(name)}


def import_comparisons(pairs: int, env: dict[str, str]) -> Iterator[dict]:
    python = [sys.executable, "-c"]
    torch = [*python, "import torch"]
    yield compare("import accel", torch, [*python, "import accel"], pairs, env)
    yield compare("import accel + accel.init", torch, [*python, "import accel; accel.init"],
                  pairs, env)
    if importlib.util.find_spec("accelerate") is not None:
        yield compare("import accelerate", torch, [*python, "import accelerate"], pairs, env)


def launch_comparisons(pairs: int, env: dict[str, str], folder: Path) -> Iterator[dict]:
    script = folder / "trivial.py"
    script.write_text(TRIVIAL_SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                str(script)]
    accel = [sys.executable, "-m", "accel", "launch", "-n", "2", str(script)]
    yield compare("accel launch -n 2", torchrun, accel, pairs, env)


HEADER = ("| right side | left side s | right side s | ratio of medians | "
          "per-pair ratio: median (range) | target |\n|---|---|---|---|---|---|")


def row_line(row: dict) -> str:
    low, high = row["pair_range"]
    target = f"<= {row['target']:.2f}" if row["target"] else "-"
    return (f"| {row['name']} | {row['left_s']:.2f} | {row['right_s']:.2f} | "
            f"{row['ratio']:.3f} | {row['pair_ratio']:.3f} ({low:.2f}-{high:.2f}) | {target} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5, help="alternating pairs per comparison")
    parser.add_argument("--only", choices=("import", "launch"), help="one comparison group")
    parser.add_argument("--save", metavar="FILE", help="write the figures as JSON")
    args = parser.parse_args(argv)
    # One thread per process on both sides; this checkout importable; no enclosing launch.
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    print(f"CPU seconds of whole processes, medians of {args.pairs} alternating pairs; "
          f"left side: `import torch` / `torchrun`; load average {os.getloadavg()[0]:.1f}")
    print(HEADER, flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="accel-startup-") as folder:
        groups = {"import": lambda: import_comparisons(args.pairs, env),
                  "launch": lambda: launch_comparisons(args.pairs, env, Path(folder))}
        for name, run in groups.items():
            if args.only in (None, name):
                for row in run():
                    rows.append(row)
                    print(row_line(row), flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.save:
        Path(args.save).write_text(json.dumps(rows, indent=1))
    missed = [row["name"] for row in rows if row["target"] and row["ratio"] > row["target"]]
    if missed:
        print(f"above target: {', '.join(missed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
