"""An open registry: strategies written here, not in accel, train through shard_model.

`AllReduceHooks` is a whole engine in this file: it averages each gradient across the
data-parallel ranks from a hook, skipped while accumulation switches sync off. With
`accel.Custom`, a function applies torch's own `fully_shard` or DDP on `ctx.mesh`.
Each trains 2 ranks x batch 4 x accumulation 2 to the parameters of one process with
batch 16 (fp32, within 1e-6).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import full_parameters, train_through_loader
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

import accel
from accel.testing import run_world


class AllReduceHooks(accel.Strategy):
    """Data parallelism by gradient hooks: the simplest engine that can train."""

    name = "allreduce-hooks"

    def __init__(self) -> None:
        self.sync = True

    def wrap_model(self, model: nn.Module, ctx: accel.Context) -> nn.Module:
        model = model.to(ctx.device)
        with torch.no_grad():
            for param in model.parameters():
                dist.broadcast(param, src=0, group=ctx.group)
                param.register_post_accumulate_grad_hook(self._average(ctx))
        return model

    def _average(self, ctx: accel.Context):
        def hook(param: torch.Tensor) -> None:
            if self.sync:  # the accumulated gradient, once per cycle
                dist.all_reduce(param.grad, group=ctx.dp_group)
                param.grad /= ctx.dp_size
        return hook

    def set_grad_sync(self, model: nn.Module, enabled: bool) -> None:
        self.sync = enabled


def fsdp_on_the_mesh(model: nn.Module, ctx: accel.Context) -> nn.Module:
    return fully_shard(model.to(ctx.device), mesh=ctx.mesh["dp_shard"])


def ddp_on_the_data_ranks(model: nn.Module, ctx: accel.Context) -> nn.Module:
    return DistributedDataParallel(model.to(ctx.device), process_group=ctx.dp_group)


STRATEGIES = {
    "own class": AllReduceHooks,
    "Custom(fully_shard)": lambda: accel.Custom(fsdp_on_the_mesh),
    "Custom(DDP)": lambda: accel.Custom(ddp_on_the_data_ranks),
}


def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(48, 4, generator=gen)
    return TensorDataset(x, x[:, :1] * 3 - x[:, 1:2])


def train(ctx: accel.Context, strategy, batch_size: int, accumulation: int) -> dict:
    torch.manual_seed(0)  # Custom's functions do not align ranks: they start equal
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    model, ctx = train_through_loader(model, ctx, dataset(), strategy=strategy, lr=0.1, seed=1,
                                      batch_size=batch_size, accumulation=accumulation,
                                      clip=10.0)
    return {"applied": ctx.applied[0], "params": full_parameters(model)}


def train_every_strategy(ctx: accel.Context) -> dict:
    return {name: train(ctx, make(), batch_size=4, accumulation=2)
            for name, make in STRATEGIES.items()}


@pytest.fixture(scope="module")
def ranks():
    return run_world(train_every_strategy, 2, timeout=300)


@pytest.mark.parametrize("name", STRATEGIES)
def test_a_strategy_from_outside_accel_trains_like_one_process(ranks, name):
    expected = train(accel.Context(), "single", batch_size=16, accumulation=1)["params"]
    for rank in ranks:
        for key, value in expected.items():
            error = (rank[name]["params"][key] - value).abs().max().item()
            assert error <= 1e-6, (name, key, error)


def test_the_context_records_the_strategy_by_its_own_name(ranks):
    assert ranks[0]["own class"]["applied"] == "shard_model(allreduce-hooks)"
    assert ranks[0]["Custom(DDP)"]["applied"].startswith("shard_model(custom, parallelize_fn=")


def test_custom_needs_a_function_and_a_module_back():
    with pytest.raises(accel.errors.IncompatibleOptionsError, match="takes a function"):
        accel.Custom("fsdp")
    with pytest.raises(accel.errors.IncompatibleOptionsError, match="must return the model"):
        accel.shard_model(nn.Linear(2, 2), accel.Context(),
                          strategy=accel.Custom(lambda model, ctx: None))
