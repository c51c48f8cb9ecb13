"""The central property through distribute_loader, with shuffling, as a user writes it.

One process x batch 16 == 2 ranks x batch 8 == 2 ranks x batch 4 x accumulation 2 ==
2 ranks with split_batches (global batch 16) == dispatch_batches: the same samples form
each optimizer step, so the parameters agree (fp32: within 1e-6).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import accel
from accel.testing import run_world


def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(64, 1, generator=gen)
    return TensorDataset(x, 2 * x + 3)


def train(ctx: accel.Context, batch_size: int, accumulation: int, **loader_options) -> dict:
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, ctx = accel.shard_model(model, ctx)
    optimizer, ctx = accel.wrap_optimizer(optimizer, ctx)
    loader, ctx = accel.distribute_loader(
        DataLoader(dataset(), batch_size=batch_size, shuffle=True), ctx, seed=7,
        **loader_options)
    model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx, steps=accumulation,
                                                   loader=loader)
    for _ in range(3):
        for x, y in loader:
            accel.backward(nn.functional.mse_loss(model(x), y), optimizer, ctx)
            optimizer.step()
            optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in accel.unwrap_model(model, ctx).state_dict().items()}


VARIANTS = {
    "2x8": dict(batch_size=8, accumulation=1),
    "2x4x2": dict(batch_size=4, accumulation=2),
    "split_batches": dict(batch_size=16, accumulation=1, split_batches=True),
    "dispatch_batches": dict(batch_size=8, accumulation=1, dispatch_batches=True),
}


def train_variants(ctx: accel.Context) -> dict[str, dict]:
    return {name: train(ctx, **options) for name, options in VARIANTS.items()}


@pytest.fixture(scope="module")
def ranks():
    return run_world(train_variants, 2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_ranks_through_the_loader_match_one_process(ranks, variant):
    expected = train(accel.Context(), batch_size=16, accumulation=1)
    for rank in ranks:
        for name, value in expected.items():
            assert (rank[variant][name] - value).abs().max().item() <= 1e-6, (variant, name)


def test_shuffled_training_is_not_the_unshuffled_one():
    """Shuffling really happened (the property is not trivially met by a fixed order)."""
    shuffled = train(accel.Context(), batch_size=16, accumulation=1)
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        for x, y in DataLoader(dataset(), batch_size=16):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    assert not torch.equal(shuffled["weight"], model.weight.detach())
