"""An elastic training run: FSDP, a fixed global batch, a checkpoint every step (test_elastic).

    accel launch --nnodes 1:2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id JOB \\
        --max-restarts 3 tests/elastic_script.py --ckpt DIR --out FILE --log FILE \\
        [--gates 3@2,6@1 --gate-dir DIR]

Every start (the first, and each restart torchrun makes after a node is lost or joins)
resumes from the newest checkpoint in --ckpt, on however many ranks it now has: FSDP's
sharded state and the loader's position reshard. The global batch is 8 samples whatever
the world size (split_batches), and the loss is the mean over the global batch, so the
parameters follow the same path as one uninterrupted process's.

Rank 0 appends one JSON line per event to --log (`start`, `step`, `gate`, `done`) with
the world size, so a test can follow the run. A gate STEP@WORLD holds rank 0 after that
step's checkpoint, when the world has WORLD ranks, until the file go-STEP-wWORLD appears
in --gate-dir (at most 60 s): the test kills or adds a node while the run is held there.
Rank 0 writes the final parameters to --out (safetensors).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import accel
from accel.checkpoint import CheckpointFolder, load_state, save_state

GLOBAL_BATCH = 8
GATE_TIMEOUT_S = 60.0


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--gates", default="", help="STEP@WORLD,... (see the docstring)")
    parser.add_argument("--gate-dir", type=Path, default=None)
    return parser.parse_args()


def build(ctx: accel.Context):
    torch.manual_seed(0)
    # Widths that 2 ranks do not divide evenly: uneven FSDP shards.
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    data = torch.randn(48, 6, generator=torch.Generator().manual_seed(1))
    targets = data[:, :3].sin()
    loader = DataLoader(TensorDataset(data, targets), batch_size=GLOBAL_BATCH, shuffle=True)
    model, ctx = accel.shard_model(model, ctx, strategy=accel.FSDP())
    optimizer, ctx = accel.wrap_optimizer(optimizer, ctx)
    loader, ctx = accel.distribute_loader(loader, ctx, split_batches=True)
    return model, optimizer, loader, ctx


def log(args: argparse.Namespace, ctx: accel.Context, event: str, **fields) -> None:
    if ctx.is_main_process:
        with open(args.log, "a") as file:
            file.write(json.dumps({"event": event, "world": ctx.world_size,
                                   "time": time.time(), **fields}) + "\n")


def hold_at_gate(args: argparse.Namespace, ctx: accel.Context, step: int) -> None:
    gates = {tuple(map(int, gate.split("@"))) for gate in args.gates.split(",") if gate}
    if not ctx.is_main_process or (step, ctx.world_size) not in gates:
        return
    log(args, ctx, "gate", step=step)
    go = args.gate_dir / f"go-{step}-w{ctx.world_size}"
    deadline = time.monotonic() + GATE_TIMEOUT_S
    while not go.exists():  # the other ranks wait in the next step's collective
        if time.monotonic() > deadline:
            raise TimeoutError(f"nobody opened the gate {go} in {GATE_TIMEOUT_S} s")
        time.sleep(0.05)


def train(ctx: accel.Context, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Resume from the newest checkpoint if any, train to --steps; the whole parameters.

    `args.ckpt` None: no checkpoints (the uninterrupted reference of test_elastic).
    """
    model, optimizer, loader, ctx = build(ctx)
    objects = dict(model=model, optimizer=optimizer, loader=loader)
    folder = CheckpointFolder(args.ckpt, total_limit=2) if args.ckpt else None
    step, saved_by = 0, None
    if folder is not None and folder.latest() is not None:
        # rng=False: generator states are per rank, and nothing here draws after init.
        info = load_state(folder, ctx, **objects, rng=False)
        step, saved_by = info.step, info.world_size
    log(args, ctx, "start", step=step, saved_by=saved_by)
    while step < args.steps:
        for x, y in loader:
            loss = nn.functional.mse_loss(model(x), y)  # this rank's mean: equal shares
            accel.backward(loss, optimizer, ctx)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if folder is not None:
                save_state(folder, ctx, **objects, step=step)
            log(args, ctx, "step", step=step)
            hold_at_gate(args, ctx, step)
            if step >= args.steps:
                break
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in accel.unwrap_model(model, ctx).named_parameters()}


def main() -> None:
    args = parse()
    ctx = accel.init(seed=0, timeout=60)
    params = train(ctx, args)
    if ctx.is_main_process:
        save_file(params, str(args.out))
    log(args, ctx, "done", step=args.steps)
    accel.shutdown(ctx)


if __name__ == "__main__":
    main()
