"""Training-step throughput on 2 gloo ranks: raw PyTorch DDP vs accel vs Hugging Face Accelerate.

Driver (default): launches one 2-rank torchrun job per scenario and prints a table.

    python bench/ddp_step.py                # ~3 minutes on an idle 2-core machine
    python bench/ddp_step.py --quick        # ~30 seconds
    python bench/ddp_step.py --control      # adds raw_b, a second raw run: the noise floor

Worker: one scenario, all implementations alternating in the same processes (same process
group, same pre-made batches): R rounds of fresh models, each timed in short chunks that
alternate between implementations in a shuffled order, so that neither machine drift nor
position favours one.

    OMP_NUM_THREADS=1 ACCELERATE_USE_CPU=1 PYTHONPATH=. python -m torch.distributed.run \
        --standalone --nproc_per_node 2 bench/ddp_step.py --worker --scenario fp32
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib.util
import json
import os
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ddp_workload import SCENARIOS, Workload, flat_parameters, make_batches

REPO = Path(__file__).resolve().parent.parent
#: raw_b is a second, independent raw run: raw_b/raw shows the noise floor of the machine.
IMPLS = ("raw", "accel", "accelerate", "raw_b")
DEFAULT_IMPLS = ("raw", "accel", "accelerate")
DEFAULTS = {"rounds": 5, "steps": 200, "warmup": 20, "chunk": 20}
QUICK = {"rounds": 2, "steps": 24, "warmup": 8, "chunk": 12}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help="run as a torchrun rank")
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                        help="repeatable; default: all (fp32, accum4, bf16)")
    parser.add_argument("--impl", default=",".join(DEFAULT_IMPLS),
                        help=f"comma-separated, from {','.join(IMPLS)}")
    parser.add_argument("--control", action="store_true",
                        help="add raw_b, a second raw run, to show the machine's noise floor")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps (~30 s)")
    parser.add_argument("--rounds", type=int, help=f"default {DEFAULTS['rounds']}")
    parser.add_argument("--steps", type=int, help=f"timed micro-steps per run, "
                        f"default {DEFAULTS['steps']}")
    parser.add_argument("--warmup", type=int, help=f"untimed micro-steps before each run, "
                        f"default {DEFAULTS['warmup']}")
    parser.add_argument("--chunk", type=int, help=f"micro-steps timed before switching "
                        f"implementation, default {DEFAULTS['chunk']}")
    parser.add_argument("--profile", metavar="IMPL", choices=IMPLS,
                        help="after the rounds, cProfile one more run of IMPL on rank 0")
    parser.add_argument("--result-json", type=Path, help="worker: rank 0 writes its results here")
    parser.add_argument("--save", type=Path, metavar="JSON",
                        help="driver: also write every scenario's raw figures to this file")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.impls = [name.strip() for name in args.impl.split(",") if name.strip()]
    if args.control and "raw_b" not in args.impls:
        args.impls.append("raw_b")
    unknown = sorted(set(args.impls) - set(IMPLS))
    if unknown:
        parser.error(f"unknown --impl {unknown}; choose from {IMPLS}")
    args.scenarios = args.scenario or list(SCENARIOS)
    if args.worker and len(args.scenarios) != 1:
        parser.error("a --worker runs exactly one --scenario")
    if "accelerate" in args.impls and importlib.util.find_spec("accelerate") is None:
        parser.error("Hugging Face Accelerate is not installed: pip install -e '.[bench]' "
                     "(or leave it out: --impl raw,accel)")
    return args


# --------------------------------------------------------------------------- worker


def timed_run(step: Any, batches: list, first: int, count: int) -> tuple[float, float]:
    """(wall seconds, main-thread CPU seconds) of `count` micro-steps, all ranks started
    together and finished together.

    The CPU time leaves out time spent waiting: for other processes on a busy machine, and
    for gloo's all-reduce, which runs on gloo's own threads. It is the cost of forward,
    backward, optimizer and the library around them. A garbage collection first (outside
    the timing), so that each implementation pays for the collections its own garbage
    triggers, not for those its predecessor left due.
    """
    gc.collect()
    dist.barrier()
    start, start_cpu = time.perf_counter(), time.thread_time()
    for index in range(first, first + count):
        x, y = batches[index % len(batches)]
        step(index, x, y)
    cpu = time.thread_time() - start_cpu
    dist.barrier()
    return time.perf_counter() - start, cpu


def run_round(builders: dict[str, Any], session: Any, work: Any, batches: list,
              args: argparse.Namespace, round_index: int) -> dict[str, tuple[list, Any]]:
    """One round: fresh models, warm-up, then the timed steps in alternating chunks.

    Each cycle runs one chunk of `args.chunk` micro-steps of every implementation, in an
    order shuffled per cycle (the same seeded order on every rank), so that neither load
    from other processes, nor going first, nor following a particular implementation
    favours one. Returns {impl: ((wall, cpu) seconds of each chunk, parameters after training)}.
    """
    order = random.Random(round_index)
    names = list(builders)
    order.shuffle(names)
    built = {name: builders[name](session, work) for name in names}
    for step, _ in built.values():
        timed_run(step, batches, 0, args.warmup)
    # Objects alive now (modules, imports) are never garbage: keep collections cheap.
    gc.freeze()
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for first in range(args.warmup, args.warmup + args.steps, args.chunk):
        count = min(args.chunk, args.warmup + args.steps - first)
        order.shuffle(names)
        for name in names:
            seconds[name].append(timed_run(built[name][0], batches, first, count))
    gc.unfreeze()
    return {name: (seconds[name], flat_parameters(built[name][1])) for name in builders}


def profile_run(builder: Any, session: Any, work: Any, batches: list,
                args: argparse.Namespace, path: Path | None) -> None:
    """One more warmed-up run of one implementation, cProfiled where `path` is given."""
    step, _ = builder(session, work)
    timed_run(step, batches, 0, args.warmup)
    gc.collect()
    gc.freeze()  # the collection timed_run starts with is then too small to show up
    profiler = cProfile.Profile()
    if path:
        profiler.enable()
    timed_run(step, batches, args.warmup, args.steps)
    if path:
        profiler.disable()
        profiler.dump_stats(str(path))
    gc.unfreeze()


def worker(args: argparse.Namespace) -> None:
    from ddp_loops import BUILDERS, Session, check_world

    import accel

    torch.set_num_threads(1)
    ctx = accel.init()
    check_world(ctx)
    (scenario,) = args.scenarios
    accumulation, precision = SCENARIOS[scenario]
    for name in ("steps", "warmup", "chunk"):
        if getattr(args, name) % accumulation:
            raise SystemExit(f"--{name} must be a multiple of the accumulation ({accumulation})")
    session, work = Session(ctx, accumulation, precision), Workload()
    batches = make_batches(work, ctx.rank)
    builders = {name: BUILDERS[name] for name in args.impls}
    rates: dict[str, list[float]] = {name: [] for name in args.impls}
    chunks: dict[str, list[float]] = {name: [] for name in args.impls}
    cpu_per_step: dict[str, list[float]] = {name: [] for name in args.impls}
    final: dict[str, torch.Tensor] = {}
    for round_index in range(args.rounds):
        for name, (seconds, params) in run_round(builders, session, work, batches, args,
                                                 round_index).items():
            rates[name].append(args.steps / sum(wall for wall, _ in seconds))
            cpu_per_step[name].append(sum(cpu for _, cpu in seconds) / args.steps)
            chunks[name] += [wall for wall, _ in seconds]
            final.setdefault(name, params)
    profile = None
    if args.profile:
        profile = Path(tempfile.gettempdir()) / f"ddp_step_{scenario}_{args.profile}.pstats"
        profile_run(BUILDERS[args.profile], session, work, batches, args,
                    profile if ctx.is_main_process else None)
    if ctx.is_main_process:
        report_worker(scenario, {"rates": rates, "chunk_seconds": chunks,
                                 "cpu_per_step": cpu_per_step}, final, args, profile)
    accel.shutdown(ctx)


def report_worker(scenario: str, figures: dict[str, dict[str, list[float]]],
                  final: dict[str, torch.Tensor], args: argparse.Namespace,
                  profile: Path | None) -> None:
    reference = final[args.impls[0]]
    diffs = {name: float((params - reference).abs().max()) for name, params in final.items()}
    result = {"scenario": scenario, **figures, "max_param_diff": diffs,
              "reference": args.impls[0], "rounds": args.rounds, "steps": args.steps,
              "warmup": args.warmup, "torch": torch.__version__}
    if args.result_json:
        args.result_json.write_text(json.dumps(result))
    else:
        print_results([result])
    if profile:
        print(f"\ncProfile of one {args.profile} run ({args.steps} steps), rank 0, top 25 "
              f"by own time; saved to {profile}")
        pstats.Stats(str(profile)).sort_stats("tottime").print_stats(25)


# --------------------------------------------------------------------------- driver


RATIOS = (("accel", "raw"), ("accel", "accelerate"), ("raw_b", "raw"))


def print_results(results: list[dict[str, Any]]) -> None:
    """Markdown tables: steps/s and CPU per step of each implementation, then the ratios."""
    impls = [name for name in IMPLS if name in results[0]["rates"]]
    print_row(["scenario", *[f"{name} steps/s" for name in impls],
               *[f"{name} CPU ms/step" for name in impls]], header=True)
    for result in results:
        rates = [statistics.median(result["rates"][name]) for name in impls]
        cpu = [statistics.median(result["cpu_per_step"][name]) * 1e3 for name in impls]
        print_row([result["scenario"], *[f"{r:.1f}" for r in rates], *[f"{c:.2f}" for c in cpu]])
    print()
    print_row(["scenario", "ratio", "steps/s: of medians", "per round: median (min-max)",
               "paired chunks: median [IQR]", "CPU time: of medians"], header=True)
    for result in results:
        for a, b in [(a, b) for a, b in RATIOS if a in impls and b in impls]:
            print_row([result["scenario"], f"{a}/{b}", *ratio_cells(result, a, b)])
    print()
    for result in results:
        diffs = ", ".join(f"{name} {value:.1e}" for name, value in result["max_param_diff"].items()
                          if name != result["reference"])
        print(f"{result['scenario']}: max |param - {result['reference']}| after training: {diffs}")


def ratio_cells(result: dict[str, Any], a: str, b: str) -> list[str]:
    """Speed of `a` relative to `b` (above 1: `a` is faster), four ways.

    The per-round and per-chunk ratios compare runs that saw the same machine load; on a
    machine shared with other jobs they are steadier than the ratio of the medians.
    """
    rates, chunks, cpu = result["rates"], result["chunk_seconds"], result["cpu_per_step"]
    per_round = [x / y for x, y in zip(rates[a], rates[b], strict=True)]
    # Chunks of a and b ran in the same cycle, so each pair saw nearly the same load.
    paired = sorted(y / x for x, y in zip(chunks[a], chunks[b], strict=True))
    quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
    return [f"{statistics.median(rates[a]) / statistics.median(rates[b]):.3f}",
            f"{statistics.median(per_round):.3f} ({min(per_round):.2f}-{max(per_round):.2f})",
            f"{quartiles[1]:.3f} [{quartiles[0]:.2f}-{quartiles[2]:.2f}]",
            f"{statistics.median(cpu[b]) / statistics.median(cpu[a]):.3f}"]


def print_row(cells: list[str], header: bool = False) -> None:
    print("| " + " | ".join(cells) + " |")
    if header:
        print("|" + "---|" * len(cells))


def launch(scenario: str, args: argparse.Namespace, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(Path(__file__).resolve()), "--worker",
               "--scenario", scenario, "--impl", ",".join(args.impls),
               "--rounds", str(args.rounds), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--chunk", str(args.chunk),
               "--result-json", str(out)]
    if args.profile:
        command += ["--profile", args.profile]
    subprocess.run(command, env=env, check=True)


def driver(args: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, 2 gloo ranks x 1 thread; "
          f"{args.rounds} rounds x {args.steps} timed micro-steps (+{args.warmup} warm-up) "
          f"per implementation", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in args.scenarios:
            started = time.perf_counter()
            out = Path(tmp) / f"{scenario}.json"
            launch(scenario, args, out)
            results.append(json.loads(out.read_text()))
            print(f"{scenario}: done in {time.perf_counter() - started:.0f} s", flush=True)
    print()
    print_results(results)
    if args.save:
        args.save.write_text(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
