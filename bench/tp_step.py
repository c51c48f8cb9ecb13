"""Tensor-parallel training step: accel against hand-written torch in the same run.

    python bench/tp_step.py                # TP 2 (2 processes), then TP 2 x FSDP 2 (4)
    python bench/tp_step.py --rounds 5 --steps 20

Scenarios, each a torchrun job on gloo with OMP_NUM_THREADS=1:
- `tp2`: a transformers Llama (2 layers, hidden 128) with `parallelize_module` over a
  1-D "tp" mesh and a plain AdamW loop (`raw`), against `accel.init(mesh={"tp": 2})`,
  `tensor_parallel(plan="auto")`, `wrap_optimizer`, `accel.backward` (`accel`).
- `tp2xfsdp2`: the same plan on mesh["tp"] then `fully_shard` per decoder layer and the
  root on mesh["dp_shard"], as torchtitan writes it (`raw`), against
  `tensor_parallel` + `shard_model(strategy=accel.FSDP())` (`accel`).

Rounds alternate the implementations inside each process in ABBA order (raw, accel,
accel, raw, ...), so both see the same machine load and neither always runs first; the
ratio is the median over rounds of raw time / accel time per step (1.0: no overhead,
above 1: accel faster): wall time, and CPU time of the main thread (forward, backward,
optimizer and the library, not the waits for the other rank or for a core), the steadier
one when two ranks share two cores with gloo's threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCENARIOS = {"tp2": ({"tp": 2}, 2), "tp2xfsdp2": ({"dp_shard": 2, "tp": 2}, 4)}
BATCH, SEQ = 4, 64


def llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=128))


def hand_written_plan():
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
        "model.layers.*.self_attn.q_proj": ColwiseParallel(),
        "model.layers.*.self_attn.k_proj": ColwiseParallel(),
        "model.layers.*.self_attn.v_proj": ColwiseParallel(),
        "model.layers.*.self_attn.o_proj": RowwiseParallel(),
        "model.layers.*.mlp.gate_proj": ColwiseParallel(),
        "model.layers.*.mlp.up_proj": ColwiseParallel(),
        "model.layers.*.mlp.down_proj": RowwiseParallel(),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    }


def raw_setup(mesh_sizes: dict):
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", tuple(mesh_sizes.values()),
                            mesh_dim_names=tuple(mesh_sizes))
    model = llama()
    parallelize_module(model, mesh["tp"], hand_written_plan())
    if "dp_shard" in mesh_sizes:
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh["dp_shard"])
        fully_shard(model, mesh=mesh["dp_shard"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(ids):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return step


def accel_setup(ctx):
    import torch

    import accel

    model, ctx = accel.tensor_parallel(llama(), ctx, plan="auto")
    strategy = accel.FSDP() if ctx.dp_size > 1 else "single"
    model, ctx = accel.shard_model(model, ctx, strategy=strategy)
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), ctx)

    def step(ids):
        accel.backward(model(input_ids=ids, labels=ids).loss, optimizer, ctx)
        optimizer.step()
        optimizer.zero_grad()
    return step


def worker(scenario: str, rounds: int, steps: int, warmup: int) -> None:
    import torch

    import accel

    torch.set_num_threads(1)
    mesh_sizes, _ = SCENARIOS[scenario]
    ctx = accel.init(mesh=mesh_sizes)  # the process group both implementations use
    impls = {"raw": raw_setup(mesh_sizes), "accel": accel_setup(ctx)}
    gen = torch.Generator().manual_seed(ctx.dp_rank)
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=gen)
    times: dict[str, list[float]] = {name: [] for name in impls}
    cpu: dict[str, list[float]] = {name: [] for name in impls}
    for step in impls.values():
        for _ in range(warmup):
            step(ids)
    for round_ in range(rounds):
        order = list(impls.items()) if round_ % 2 == 0 else list(impls.items())[::-1]
        for name, step in order:  # ABBA: neither goes first every time
            torch.distributed.barrier()
            start, start_cpu = time.perf_counter(), time.thread_time()
            for _ in range(steps):
                step(ids)
            cpu[name].append((time.thread_time() - start_cpu) / steps)
            torch.distributed.barrier()
            times[name].append((time.perf_counter() - start) / steps)
    if ctx.is_main_process:
        raw, ours = statistics.median(times["raw"]), statistics.median(times["accel"])
        print(f"{scenario}: raw {raw * 1e3:.1f} ms/step, accel {ours * 1e3:.1f} ms/step, "
              f"ratio raw/accel {paired_ratio(times):.3f} wall, {paired_ratio(cpu):.3f} "
              f"main-thread CPU (medians of {rounds} paired rounds)", flush=True)
    accel.shutdown(ctx)


def paired_ratio(times: dict[str, list[float]]) -> float:
    return statistics.median(r / a for r, a in zip(times["raw"], times["accel"], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), action="append")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if args.worker:
        worker(args.scenario[0], args.rounds, args.steps, args.warmup)
        return
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    for scenario in args.scenario or list(SCENARIOS):
        _, processes = SCENARIOS[scenario]
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={processes}", __file__, "--worker", "--scenario",
                        scenario, "--rounds", str(args.rounds), "--steps", str(args.steps),
                        "--warmup", str(args.warmup)], env=env, check=True)


if __name__ == "__main__":
    main()
