"""The training script of the SLURM guide and lane (docs/slurm.md, tools/slurm_lane.py).

    srun accel launch tools/slurm/train.py --out params.json      # inside an sbatch job
    accel launch -n 2 tools/slurm/train.py --out params.json      # the same, by torchrun

A small MLP trained with DDP over a distributed loader. Every rank prints how it was
launched; rank 0 writes the final parameters to --out as JSON (exact float32 values), so
two runs can be compared without torch.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import accel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="JSON file for the final parameters")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    ctx = accel.init(seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    data = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(data, data.sum(1, keepdim=True).sin()), batch_size=4,
                        shuffle=True)
    model, ctx = accel.shard_model(model, ctx)
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), ctx)
    loader, ctx = accel.distribute_loader(loader, ctx)
    slurm_task = os.environ.get("SLURM_PROCID", "-")
    print(f"rank {ctx.rank} of {ctx.world_size} connected (node {ctx.node_rank} of "
          f"{ctx.num_nodes}, local rank {ctx.local_rank}, SLURM task {slurm_task})",
          flush=True)
    for _ in range(args.epochs):
        for x, y in loader:
            accel.backward(nn.functional.mse_loss(model(x), y), optimizer, ctx)
            optimizer.step()
            optimizer.zero_grad()
    if ctx.is_main_process:
        weights = accel.unwrap_model(model, ctx).state_dict()
        with open(args.out, "w") as file:
            json.dump({name: value.flatten().tolist() for name, value in weights.items()},
                      file)
    accel.shutdown(ctx)


if __name__ == "__main__":
    main()
