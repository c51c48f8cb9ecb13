"""Tutorial 01: your first distributed run — one script, one process or many.

Run it on two CPU processes, then as a plain script:

    accel launch -n 2 tutorials/01_first_distributed_run.py
    python tutorials/01_first_distributed_run.py

A small MLP learns y = sin(3x) * x from synthetic data. `accel.init` reads the launch
environment and joins the processes; `shard_model` wraps the model in DDP when there are
several (gradients are averaged across processes in backward); `distribute_loader` gives
each process its share of every epoch's batches.

The launch decides the engine and the precision, not the script: `init` reads the
settings of `accel launch` (flags, ACCEL_* variables, a config file) into `ctx.settings`,
and `with_amp` and `shard_model` take them when called without `dtype` / `strategy`:

    accel launch -n 2 --strategy fsdp --mixed-precision bf16 tutorials/01_first_distributed_run.py
    accel launch --config run.toml tutorials/01_first_distributed_run.py  # see `accel config`
"""

import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import accel

EPOCHS = 8


def make_data(num_samples: int = 2048) -> TensorDataset:
    """The same seeded data on every process: x in [-pi, pi], y = sin(3x) * x + noise."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand(num_samples, 1, generator=generator) * 2 - 1) * math.pi
    y = torch.sin(3 * x) * x + 0.05 * torch.randn(num_samples, 1, generator=generator)
    return TensorDataset(x, y)


def main() -> None:
    ctx = accel.init(seed=42)  # same initial weights on every rank
    model = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = DataLoader(make_data(), batch_size=32, shuffle=True)

    model, ctx = accel.with_amp(model, ctx)             # the launch's precision; fp32 by default
    model, ctx = accel.shard_model(model, ctx)          # the launch's strategy; DDP on 2+
    optimizer, ctx = accel.wrap_optimizer(optimizer, ctx)
    loader, ctx = accel.distribute_loader(loader, ctx)  # a new shuffle each epoch
    accel.print(f"training on {ctx.world_size} process(es): {ctx}", ctx=ctx)

    for epoch in range(EPOCHS):
        total = torch.zeros(())
        for x, y in loader:
            loss = nn.functional.mse_loss(model(x), y)
            accel.backward(loss, optimizer, ctx)
            optimizer.step()
            optimizer.zero_grad()
            total += loss.detach()
        # Each rank saw its own share: average the epoch loss over all ranks.
        epoch_loss = accel.reduce(total / len(loader), ctx)
        accel.print(f"epoch {epoch + 1}/{EPOCHS}  loss {epoch_loss.item():.4f}", ctx=ctx)

    accel.shutdown(ctx)


if __name__ == "__main__":
    main()
