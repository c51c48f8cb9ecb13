"""A small DDP training run that checkpoints, resumes and can be killed (test_checkpoint_spawned).

    accel launch -n 2 tests/checkpoint_script.py --ckpt DIR --batches DIR --out FILE
        [--save-at 3,6] [--die-in-save-at 7] [--die-at-step 8 --die-rank 1 --marker FILE]

At start it loads the newest checkpoint in --ckpt, if any, and continues from its step.
Each rank appends the sample indices of every step to --batches/rank{r}.jsonl; rank 0 writes
the final parameters to --out (safetensors). --die-in-save-at kills rank 0 with SIGKILL
in the middle of that step's save_state; --die-at-step kills --die-rank with SIGKILL
after that step, once (while --marker does not exist).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import accel
from accel.checkpoint import CheckpointFolder, load_state, save_state


class DieDuringSave:
    """An extra whose state_dict() kills the process: save_state is half done by then."""

    def state_dict(self) -> dict:
        os.kill(os.getpid(), signal.SIGKILL)
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--batches", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--save-at", default="3,6")
    parser.add_argument("--die-in-save-at", type=int, default=None)
    parser.add_argument("--die-at-step", type=int, default=None)
    parser.add_argument("--die-rank", type=int, default=0)
    parser.add_argument("--marker", type=Path, default=None)
    return parser.parse_args()


def build(ctx: accel.Context):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    data = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(data, torch.arange(16)), batch_size=2, shuffle=True)
    model, ctx = accel.shard_model(model, ctx)
    optimizer, ctx = accel.wrap_optimizer(optimizer, ctx)
    loader, ctx = accel.distribute_loader(loader, ctx)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
    scheduler, ctx = accel.wrap_scheduler(scheduler, ctx, optimizer)
    return model, optimizer, loader, scheduler, ctx


def main() -> None:
    args = parse()
    ctx = accel.init(seed=0)
    model, optimizer, loader, scheduler, ctx = build(ctx)
    objects = dict(model=model, optimizer=optimizer, scheduler=scheduler, loader=loader)
    folder = CheckpointFolder(args.ckpt, total_limit=2)
    step = 0
    if folder.latest() is not None:
        step = load_state(folder, ctx, **objects).step
    save_at = {int(s) for s in args.save_at.split(",") if s}
    args.batches.mkdir(parents=True, exist_ok=True)
    with open(args.batches / f"rank{ctx.rank}.jsonl", "a") as log:
        while step < args.steps:
            for x, index in loader:
                loss = model(x).pow(2).mean()
                accel.backward(loss, optimizer, ctx)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                step += 1
                log.write(json.dumps({"step": step, "samples": index.tolist()}) + "\n")
                log.flush()
                if step in save_at:
                    extra = {"killer": DieDuringSave()} if step == args.die_in_save_at else {}
                    save_state(folder, ctx, **objects, **extra)
                if (step == args.die_at_step and ctx.rank == args.die_rank
                        and not args.marker.exists()):
                    args.marker.touch()
                    os.kill(os.getpid(), signal.SIGKILL)
                if step >= args.steps:
                    break
    if ctx.is_main_process:
        weights = accel.unwrap_model(model, ctx).state_dict()
        save_file({k: v.detach().clone() for k, v in weights.items()}, str(args.out))
    accel.shutdown(ctx)


if __name__ == "__main__":
    main()
