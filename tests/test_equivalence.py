"""The central property: N ranks x batch b x accumulation k == 1 process x batch N*b*k.

Data are split by hand here so that the training transforms are tested on their own;
tests/test_equivalence_loader.py runs the same property through distribute_loader.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import accel
from accel.testing import run_world

SAMPLES, EPOCHS, GLOBAL_BATCH = 64, 3, 16


def line_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(SAMPLES, 1, generator=gen)
    return x, 2 * x + 3


def mlp_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(SAMPLES, 8, generator=gen)
    return x, torch.sin(x.sum(dim=1, keepdim=True))


def make_line(kind: str):
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def make_mlp(kind: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


PROBLEMS = {"line": (make_line, line_data), "mlp": (make_mlp, mlp_data)}


def train(ctx: accel.Context, problem: str, precision: str, per_rank_batch: int,
          accumulation: int) -> dict[str, torch.Tensor]:
    """Train with the transforms; rank r reads its own slice of every global batch."""
    make, data = PROBLEMS[problem]
    model, optimizer = make(problem)
    model, ctx = accel.with_amp(model, ctx, dtype=precision)
    model, ctx = accel.shard_model(model, ctx)
    # A loss scale low enough never to overflow here: with the default 2**16 the first
    # steps overflow or not depending on the batch size, and the runs skip different steps.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if precision == "fp16" else None
    optimizer, ctx = accel.wrap_optimizer(optimizer, ctx, scaler=scaler)
    model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx, steps=accumulation)
    x, y = data()
    assert per_rank_batch * ctx.world_size * accumulation == GLOBAL_BATCH
    for _ in range(EPOCHS):
        for start in range(0, SAMPLES, per_rank_batch * ctx.world_size):
            lo = start + ctx.rank * per_rank_batch
            xb, yb = x[lo:lo + per_rank_batch], y[lo:lo + per_rank_batch]
            loss = nn.functional.mse_loss(model(xb), yb)
            accel.backward(loss, optimizer, ctx)
            optimizer.step()
            optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in accel.unwrap_model(model, ctx).state_dict().items()}


CONFIGS = [  # (problem, precision, per-rank batch, accumulation), on 2 ranks
    ("line", "no", 8, 1), ("line", "no", 4, 2),
    ("line", "bf16", 8, 1), ("line", "bf16", 4, 2),
    ("line", "fp16", 8, 1), ("line", "fp16", 4, 2),
    ("mlp", "no", 8, 1), ("mlp", "no", 4, 2), ("mlp", "bf16", 4, 2),
]
#: max |difference| from the one-process run in the same precision. fp32 sums the same
#: numbers in another order; bf16 (8-bit mantissa) and fp16 (11-bit) round per batch.
TOLERANCE = {"no": 1e-6, "bf16": 2e-2, "fp16": 3e-3}


def train_all(ctx: accel.Context) -> list[dict[str, torch.Tensor]]:
    return [train(ctx, *config) for config in CONFIGS]


@pytest.fixture(scope="module")
def world_results():
    return run_world(train_all, 2)


@functools.cache
def reference(problem: str, precision: str) -> dict[str, torch.Tensor]:
    return train(accel.Context(), problem, precision, GLOBAL_BATCH, 1)


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=["-".join(map(str, c)) for c in CONFIGS])
def test_two_ranks_match_one_process(world_results, index):
    problem, precision, _, _ = CONFIGS[index]
    expected = reference(problem, precision)
    ranks = [results[index] for results in world_results]
    for rank_params in ranks:
        for name, value in expected.items():
            diff = (rank_params[name] - value).abs().max().item()
            assert diff <= TOLERANCE[precision], f"{name} differs by {diff}"
    # both ranks hold the same parameters, bit for bit
    for name in expected:
        assert torch.equal(ranks[0][name], ranks[1][name])


def test_precisions_really_differ_from_fp32():
    """The low-precision runs are not fp32 runs in disguise."""
    fp32 = reference("mlp", "no")
    bf16 = reference("mlp", "bf16")
    assert any(not torch.equal(fp32[k], bf16[k]) for k in fp32)


def test_one_process_accumulation_matches_big_batch():
    expected = reference("mlp", "no")
    got = train(accel.Context(), "mlp", "no", GLOBAL_BATCH // 4, 4)
    for name, value in expected.items():
        assert torch.allclose(got[name], value, atol=1e-6)
