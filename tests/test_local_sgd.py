"""local_sgd: no gradient all-reduce inside, parameters averaged every k steps and on exit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import accel
from accel.testing import run_world


def train_locally(ctx: accel.Context) -> dict[str, list[torch.Tensor]]:
    torch.manual_seed(0)
    model, ctx = accel.shard_model(nn.Linear(4, 1), ctx, strategy="ddp")
    optimizer, ctx = accel.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), ctx)
    gen = torch.Generator().manual_seed(100 + ctx.rank)  # ranks see different data
    snapshots = []
    with accel.local_sgd(model, ctx, sync_every=3) as sgd:
        for _ in range(7):
            x = torch.randn(8, 4, generator=gen)
            accel.backward(model(x).pow(2).mean(), optimizer, ctx)
            optimizer.step()
            optimizer.zero_grad()
            sgd.step()
            snapshots.append(model.module.weight.detach().clone())
    final = model.module.weight.detach().clone()
    return {"snapshots": snapshots, "final": [final]}


def test_local_sgd_averages_every_k_steps_and_on_exit():
    rank0, rank1 = run_world(train_locally, 2)
    pairs = zip(rank0["snapshots"], rank1["snapshots"], strict=True)
    for step, (a, b) in enumerate(pairs, start=1):
        # without gradient sync the ranks drift apart, except right after an averaging
        assert torch.equal(a, b) == (step % 3 == 0), f"step {step}"
    assert torch.equal(rank0["final"][0], rank1["final"][0])


def test_local_sgd_rejects_bad_period():
    with pytest.raises(accel.errors.IncompatibleOptionsError, match="sync_every"):
        with accel.local_sgd(nn.Linear(2, 2), accel.Context(), sync_every=0):
            pass


def test_local_sgd_refuses_sharded_backends():
    ctx = accel.Context().record("shard_model(fsdp)", backend="fsdp", strategy=accel.FSDP())
    with pytest.raises(accel.errors.UnsupportedError, match="strategy='ddp'"):
        with accel.local_sgd(nn.Linear(2, 2), ctx, sync_every=2):
            pass
