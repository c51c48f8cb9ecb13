"""compile_model: regional (per block) against whole-model compile time, and steps/s
compiled against eager, on a 12-layer transformers Llama.

    python bench/compile.py                    # eager, regional, whole; inductor
    python bench/compile.py --layers 12 --steps 20 --backend inductor

Each mode runs in a fresh process (no compiled code or in-memory cache carried over)
with inductor's on-disk caches off (TORCHINDUCTOR_FORCE_DISABLE_CACHES=1), so every
compile is a cold one, one compile thread (TORCHINDUCTOR_COMPILE_THREADS=1) and one
compute thread (OMP_NUM_THREADS=1: inductor's OpenMP kernels spin at their barriers when
other processes hold the cores, and slowed 5x here on a shared machine without it).
- compile time: the first training step (forward, backward, AdamW) minus a warm step,
  wall seconds and CPU seconds of the process and its children (CPU time is what a
  loaded machine does not inflate);
- steps/s: the median of `--rounds` timings of `--steps` warm steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODES = ("eager", "regional", "whole")
BATCH, SEQ = 4, 64


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def worker(mode: str, layers: int, steps: int, rounds: int, backend: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import accel

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, use_cache=False))
    ctx = accel.Context()
    if mode != "eager":
        model, ctx = accel.compile_model(model, ctx, regional=mode == "regional", backend=backend)
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-4), ctx)
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        accel.backward(model(input_ids=ids, labels=ids).loss, optimizer, ctx)
        optimizer.step()
        optimizer.zero_grad()

    wall, cpu = time.perf_counter(), cpu_seconds()
    step()
    first_wall, first_cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    step()  # a compiled model may still specialise on its second call
    timings = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        timings.append(time.perf_counter() - start)
    per_step = statistics.median(timings) / steps
    return {"mode": mode, "compile_wall_s": first_wall - per_step,
            "compile_cpu_s": first_cpu - per_step, "steps_per_s": 1 / per_step}


def run(mode: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1", "OMP_NUM_THREADS": "1",
           "TORCHINDUCTOR_COMPILE_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, __file__, "--worker", mode, "--layers", str(args.layers),
               "--steps", str(args.steps), "--rounds", str(args.rounds),
               "--backend", args.backend]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--worker", choices=MODES)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.layers, args.steps, args.rounds,
                                args.backend)), flush=True)
        return
    results = {mode: run(mode, args) for mode in args.modes.split(",")}
    print(f"{args.layers}-layer Llama (hidden 128), batch {BATCH} x {SEQ}, "
          f"backend {args.backend}, cold compiles")
    print(f"{'mode':10} {'compile wall s':>15} {'compile CPU s':>14} {'steps/s':>9}")
    for mode, result in results.items():
        compiled = mode != "eager"
        print(f"{mode:10} {result['compile_wall_s'] if compiled else 0:15.1f} "
              f"{result['compile_cpu_s'] if compiled else 0:14.1f} {result['steps_per_s']:9.2f}")
    if {"regional", "whole"} <= results.keys():
        ratio = results["whole"]["compile_cpu_s"] / results["regional"]["compile_cpu_s"]
        print(f"whole / regional compile CPU time: {ratio:.1f}x")
    if "eager" in results:
        for mode in results.keys() - {"eager"}:
            speed = results[mode]["steps_per_s"] / results["eager"]["steps_per_s"]
            print(f"{mode} steps/s / eager steps/s: {speed:.2f}")


if __name__ == "__main__":
    main()
