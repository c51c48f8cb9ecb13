"""Node-local disks: `save_state(..., save_on_each_node=True)` on a simulated two-node run.

Each of two real processes is its own "node" (launched without LOCAL_RANK, as a
scheduler starting one process per machine does) and writes to a folder of its own,
standing for its own disk. Each node's folder holds what its rank needs, and nothing of
the other's; both load back exactly; the numbering agrees across nodes; another node
layout is refused with the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import accel
from accel.checkpoint import CheckpointFolder, load_state, save_state
from accel.errors import IncompatibleOptionsError
from accel.testing import run_world

#: each rank its own node: no LOCAL_RANK / LOCAL_WORLD_SIZE (see accel.world)
NODES = {"LOCAL_RANK": "", "LOCAL_WORLD_SIZE": ""}


def prepare(ctx, strategy):
    from helpers import full_parameters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3))
    model, ctx = accel.shard_model(model, ctx, strategy=strategy)
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=0.05), ctx)
    data = TensorDataset(torch.randn(32, 6), torch.randn(32, 3))
    loader, ctx = accel.distribute_loader(DataLoader(data, batch_size=4), ctx, seed=0)

    def params():
        return full_parameters(model.module if strategy == "ddp" else model)

    return model, optimizer, loader, ctx, params


def steps(model, optimizer, loader, ctx, count: int) -> None:
    for index, (x, y) in enumerate(loader):
        if index == count:
            break
        accel.backward(nn.functional.mse_loss(model(x), y), optimizer, ctx)
        optimizer.step()
        optimizer.zero_grad()


def two_nodes(ctx, base):
    assert (ctx.num_nodes, ctx.node_rank, ctx.local_rank) == (2, ctx.rank, 0)
    disk = Path(base) / f"node{ctx.node_rank}"  # this node's own disk
    report = {}
    for strategy in ("ddp", "fsdp"):
        model, optimizer, loader, sctx, params = prepare(ctx, strategy)
        folder = CheckpointFolder(disk / strategy, total_limit=1)
        steps(model, optimizer, loader, sctx, 2)
        save_state(folder, sctx, model=model, optimizer=optimizer, loader=loader,
                   save_on_each_node=True)
        steps(model, optimizer, loader, sctx, 1)
        path = save_state(folder, sctx, model=model, optimizer=optimizer, loader=loader,
                          save_on_each_node=True)
        expected, position = params(), loader.state_dict()
        steps(model, optimizer, loader, sctx, 2)  # moves on; the load brings it back
        info = load_state(folder, sctx, model=model, optimizer=optimizer, loader=loader)
        report[strategy] = {
            "name": path.name, "step": info.step,
            "files": sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()),
            "restored": all(torch.equal(expected[k], v) for k, v in params().items()),
            "position": loader.state_dict() == position}
    return report


def test_each_node_writes_what_its_ranks_need_and_loads_it_back(tmp_path):
    nodes = run_world(two_nodes, 2, str(tmp_path), env=NODES, timeout=240)
    for rank, report in enumerate(nodes):
        ddp, fsdp = report["ddp"], report["fsdp"]
        assert ddp["name"] == fsdp["name"] == "checkpoint_000002"  # agreed, then rotated
        assert (ddp["step"], ddp["restored"], ddp["position"]) == (3, True, True)
        assert (fsdp["step"], fsdp["restored"], fsdp["position"]) == (3, True, True)
        own = [f"ranks/rank{rank}.json", f"ranks/rank{rank}.safetensors"]
        main = ["accel.json", "state.json", "state.safetensors"]
        whole = ["model.json", "model.safetensors", "optimizer.json",
                 "optimizer.safetensors"] if rank == 0 else []  # broadcast from rank 0
        assert ddp["files"] == sorted(main + own + whole)
        shards = [f"{part}/rank{rank}.{ext}" for part in ("model", "optimizer")
                  for ext in ("json", "safetensors")]
        assert fsdp["files"] == sorted(main + own + shards)
        for strategy in ("ddp", "fsdp"):
            assert [p.name for p in (tmp_path / f"node{rank}" / strategy).iterdir()] == [
                "checkpoint_000002"]
    model = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3))
    with pytest.raises(IncompatibleOptionsError, match="loads on the same layout only"):
        load_state(CheckpointFolder(tmp_path / "node0" / "ddp"), accel.Context(), model=model,
                   rng=False)
