"""The device mesh in the Context: layouts, who each rank is, and data parallelism on it.

The central property on a mesh: N data-parallel ranks x batch b x accumulation k train to
the parameters of one process with batch N*b*k (fp32, within 1e-6), whatever other
dimensions (tp here, not applied yet: its ranks hold replicas) the mesh has.
"""

from __future__ import annotations

import pytest
import torch
from helpers import full_parameters, train_through_loader
from torch import nn
from torch.utils.data import TensorDataset

import accel
from accel.errors import InvalidArgumentError
from accel.mesh import MeshLayout
from accel.testing import run_world
from accel.world import World

# --------------------------------------------------------------------------- layouts


def test_layout_orders_dimensions_outer_to_inner_and_fills_the_rest():
    layout = MeshLayout.of({"tp": 2, "dp_shard": -1, "pp": 2}, world_size=16)
    assert layout.sizes == (("pp", 2), ("dp_shard", 4), ("tp", 2))


def test_layout_without_a_data_parallel_dimension_gets_dp_shard_of_one():
    assert MeshLayout.of({"tp": 4}, world_size=4).sizes == (("dp_shard", 1), ("tp", 4))


def test_coordinates_are_row_major_like_init_device_mesh():
    layout = MeshLayout.of({"dp_replicate": 2, "dp_shard": 2, "tp": 2}, world_size=8)
    assert layout.coordinates(5) == {"dp_replicate": 1, "dp_shard": 0, "tp": 1}
    # rank 5 is data-parallel rank 2 (replica 1, shard 0) of 4; tp peers share it
    assert [layout.rank_in(r, "dp_replicate", "dp_shard") for r in range(8)] == [
        0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize(("mesh", "message"), [
    ({"dp_shard": 2, "tp": 3}, "multiply to 6, but the world has 4"),
    ({"tp": -1, "dp_shard": -1}, "only one dimension may be -1"),
    ({"tp": 3, "dp_shard": -1}, "multiply to 3, which does not divide the world size 4"),
    ({"model": 2}, "unknown dimension(s) ['model']"),
    ({"tp": 0}, "must be a positive integer"),
    ({"tp": "2"}, "must be a positive integer"),
    ({}, "must be a dict of dimension sizes"),
])
def test_wrong_layouts_name_the_product_and_the_world(mesh, message):
    with pytest.raises(InvalidArgumentError, match=None) as info:
        MeshLayout.of(mesh, world_size=4)
    assert message in str(info.value)


def test_context_says_who_this_rank_is_on_each_dimension():
    layout = MeshLayout.of({"pp": 2, "dp_shard": 2, "tp": 2}, world_size=8)
    ctx = accel.Context(world=World(rank=6, world_size=8, local_rank=6, local_world_size=8),
                        layout=layout)
    assert (ctx.pp_rank, ctx.pp_size) == (1, 2)
    assert (ctx.dp_rank, ctx.dp_size) == (1, 2)
    assert (ctx.tp_rank, ctx.tp_size) == (0, 2)
    assert (ctx.cp_rank, ctx.cp_size) == (0, 1)
    assert "mesh=pp=2 x dp_shard=2 x tp=2" in repr(ctx)


def test_without_a_mesh_every_rank_is_a_data_parallel_rank():
    ctx = accel.Context(world=World(rank=1, world_size=2, local_rank=1, local_world_size=2))
    assert (ctx.dp_rank, ctx.dp_size, ctx.tp_size) == (1, 2, 1)
    assert ctx.layout.sizes == (("dp_shard", 2),)
    assert accel.Context().mesh is None  # one process, no group: nothing to build


def test_init_refuses_a_mesh_that_does_not_fit_the_world():
    with pytest.raises(InvalidArgumentError, match="multiply to 2, but the world has 1"):
        accel.init(mesh={"dp_shard": 2}, env={})


# --------------------------------------------------------------------------- training

def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(64, 4, generator=gen)
    return TensorDataset(x, x.sum(dim=1, keepdim=True) * 2 + 3)


def train(ctx: accel.Context, strategy, batch_size: int, accumulation: int) -> dict:
    """Two epochs of a small MLP through the public transforms, as a user writes them."""
    torch.manual_seed(ctx.rank)  # ranks start different: shard_model gives them rank 0's
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    model, _ = train_through_loader(model, ctx, dataset(), strategy=strategy, lr=0.05, seed=3,
                                    batch_size=batch_size, accumulation=accumulation)
    return full_parameters(model)


def reference(dp_size: int, batch_size: int, accumulation: int) -> dict:
    """One process, batch dp_size * b * k, with rank 0's initial weights."""
    return train(accel.Context(), "single", dp_size * batch_size * accumulation, 1)


CASES = {"2x8": (8, 1), "2x4x2": (4, 2)}


def train_on_mesh(ctx: accel.Context) -> dict:
    """Every strategy x case on this rank, plus what the Context says about the rank."""
    results = {"who": (ctx.dp_rank, ctx.dp_size, ctx.tp_rank, ctx.tp_size,
                       tuple(ctx.mesh.mesh_dim_names))}
    for strategy in ("ddp", "fsdp"):
        for name, (batch_size, accumulation) in CASES.items():
            results[strategy, name] = train(ctx, strategy, batch_size, accumulation)
    return results


MESHES = {
    "dp_shard=2": ({"dp_shard": 2}, 2),
    "dp_replicate=2 x dp_shard=2": ({"dp_replicate": 2, "dp_shard": 2}, 4),
    "dp_shard=2 x tp=2": ({"dp_shard": 2, "tp": 2}, 4),
}


@pytest.mark.parametrize("mesh_name", MESHES)
def test_data_parallel_on_a_mesh_matches_one_process(mesh_name):
    mesh, world_size = MESHES[mesh_name]
    ranks = run_world(train_on_mesh, world_size, mesh=mesh, timeout=300)
    dp_size = ranks[0]["who"][1]
    assert dp_size == mesh.get("dp_replicate", 1) * mesh["dp_shard"]
    assert ranks[0]["who"][4] == tuple(name for name in ("dp_replicate", "dp_shard", "tp")
                                       if name in mesh)
    for name, (batch_size, accumulation) in CASES.items():
        expected = reference(dp_size, batch_size, accumulation)
        for rank, result in enumerate(ranks):
            for strategy in ("ddp", "fsdp"):
                for key, value in expected.items():
                    error = (result[strategy, name][key] - value).abs().max().item()
                    assert error <= 1e-6, (mesh_name, rank, strategy, name, key, error)


def adopt_a_mesh(ctx: accel.Context) -> tuple:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
    adopted = accel.Context.from_process_group(mesh=mesh)
    gathered = accel.gather(torch.tensor([adopted.rank]), adopted)
    return adopted.dp_rank, adopted.tp_rank, adopted.mesh is mesh, gathered.tolist()


def test_from_process_group_adopts_a_framework_mesh_and_gathers_over_data_ranks():
    results = run_world(adopt_a_mesh, 4, timeout=300)
    assert [r[:3] for r in results] == [(0, 0, True), (0, 1, True), (1, 0, True),
                                        (1, 1, True)]
    # gather runs over the data-parallel peers: ranks 0 and 2 (tp 0), 1 and 3 (tp 1)
    assert [r[3] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
