"""Tutorial 01: your first distributed run — one script, one process or many.

Run it on two CPU processes, then as a plain script:

    accel launch -n 2 tutorials/01_first_distributed_run.py
    python tutorials/01_first_distributed_run.py

A small MLP learns y = sin(3x) * x from synthetic data. `accel.init` reads the launch
environment and joins the processes; torch's DistributedDataParallel averages the
gradients and a DistributedSampler gives each process its share of the data. (Later
tutorials replace both with accel's transforms.)
"""

import math

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import accel
from accel import ops, process

EPOCHS = 8


def make_data(num_samples: int = 2048) -> TensorDataset:
    """The same seeded data on every process: x in [-pi, pi], y = sin(3x) * x + noise."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand(num_samples, 1, generator=generator) * 2 - 1) * math.pi
    y = torch.sin(3 * x) * x + 0.05 * torch.randn(num_samples, 1, generator=generator)
    return TensorDataset(x, y)


def main() -> None:
    ctx = accel.init(seed=42)  # same initial weights on every rank
    process.print(f"training on {ctx.world_size} process(es): {ctx}", ctx=ctx)

    model = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 1))
    if ctx.is_distributed:
        model = DistributedDataParallel(model)  # all-reduces gradients in backward
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    dataset = make_data()
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, seed=42)
    loader = DataLoader(dataset, batch_size=64, sampler=sampler)

    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)  # a different shuffle each epoch, the same on every rank
        total = torch.zeros(())
        for x, y in loader:
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.detach()
        # Each rank saw its own share: average the epoch loss over all ranks.
        epoch_loss = ops.reduce(total / len(loader), ctx)
        process.print(f"epoch {epoch + 1}/{EPOCHS}  loss {epoch_loss.item():.4f}", ctx=ctx)

    accel.shutdown(ctx)


if __name__ == "__main__":
    main()
