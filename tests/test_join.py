"""Uneven inputs under DDP: refused with a clear error, or trained to the end with join."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import accel
from accel.errors import UnsupportedError
from accel.testing import run_world


def uneven_training(ctx: accel.Context) -> dict[str, object]:
    torch.manual_seed(0)
    model, ctx = accel.shard_model(nn.Linear(2, 1), ctx, strategy="ddp")
    optimizer, ctx = accel.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), ctx)
    data = TensorDataset(torch.arange(6.0).reshape(3, 2), torch.ones(3, 1))
    loader, ctx = accel.distribute_loader(DataLoader(data, batch_size=1), ctx,
                                          even_batches=False)
    refused = ""
    try:
        iter(loader)
    except UnsupportedError as err:
        refused = str(err)
    steps = 0
    with accel.join_uneven_inputs(model, ctx, loader=loader):
        for x, y in loader:
            accel.backward(nn.functional.mse_loss(model(x), y), optimizer, ctx)
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
    return {"refused": refused, "steps": steps, "joined_after": loader.joined,
            "weight": accel.unwrap_model(model, ctx).weight.detach().clone()}


def test_uneven_ddp_inputs_are_refused_then_joined():
    rank0, rank1 = run_world(uneven_training, 2)
    for result in (rank0, rank1):
        assert "[2, 1] batches" in result["refused"] and "join_uneven_inputs" in result["refused"]
        assert result["joined_after"] is False
    assert (rank0["steps"], rank1["steps"]) == (2, 1)
    assert torch.equal(rank0["weight"], rank1["weight"])  # the joined rank kept in step


def test_single_process_join_is_a_plain_block():
    model = nn.Linear(2, 1)
    with accel.join_uneven_inputs(model, accel.Context()):
        model(torch.ones(1, 2)).sum().backward()
    assert model.weight.grad is not None
