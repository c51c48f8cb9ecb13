"""Which mesh accel.FSDP shards over, and how context parallelism changes its reduction.

Split from fsdp.py: the strategy's own mesh, HSDP built from replicate_degree, or the
data-parallel dimensions of ctx.mesh, with dp_shard x cp flattened under context
parallelism (its cp ranks' gradients summed, the dp ranks' averaged).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from accel.context import Context
from accel.errors import IncompatibleOptionsError


def fsdp_mesh(ctx: Context, strategy: Any) -> DeviceMesh:
    """The mesh FSDP shards over: the strategy's own, a replicate x shard mesh built for
    replicate_degree, or the data-parallel dimensions of ctx.mesh."""
    if strategy.mesh is not None:
        return strategy.mesh
    degree = strategy.replicate_degree
    if degree is None:
        return _data_parallel_mesh(ctx)
    if not ctx.layout.only_data_parallel or len(ctx.layout.dp_names) > 1:
        raise IncompatibleOptionsError(
            f"FSDP(replicate_degree={degree!r}) cannot be combined with the mesh "
            f"{ctx.layout} of accel.init(mesh=...): give the replicas as the mesh's "
            "'dp_replicate' dimension instead"
        )
    if not isinstance(degree, int) or degree < 1 or ctx.world_size % degree:
        raise IncompatibleOptionsError(
            f"FSDP(replicate_degree={degree!r}) must be a positive divisor of the world size "
            f"{ctx.world_size}"
        )
    if ctx.group is not None:
        raise IncompatibleOptionsError(
            "FSDP(replicate_degree=...) builds its mesh from the default process group; for "
            "a group of your own build a 2-D DeviceMesh and pass FSDP(mesh=...)"
        )
    return init_device_mesh(ctx.device.type, (degree, ctx.world_size // degree),
                            mesh_dim_names=("replicate", "shard"))


def _data_parallel_mesh(ctx: Context) -> DeviceMesh:
    """The data-parallel dimensions of ctx.mesh: 1-D (FSDP) or replicate x shard (HSDP).

    Under context parallelism the cp ranks hold the same parameters and see parts of the
    same sequences: FSDP shards over dp_shard x cp, flattened (torchtitan's dp_shard_cp).
    """
    mesh, names = ctx.mesh, ctx.layout.dp_names
    if ctx.context_parallel:
        names = _with_cp_sharded(mesh, names)
    if tuple(mesh.mesh_dim_names) == names:
        return mesh
    return mesh[names]


def _with_cp_sharded(mesh: DeviceMesh, names: tuple[str, ...]) -> tuple[str, ...]:
    if "dp_shard" not in names:
        return (*names, "cp")
    mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    return tuple("dp_shard_cp" if name == "dp_shard" else name for name in names)


def sum_over_cp(unit: nn.Module, ctx: Context) -> None:
    """The cp ranks' gradients are parts of one sequence's: summed, and averaged over dp."""
    if ctx.context_parallel:
        unit.set_gradient_divide_factor(float(ctx.dp_size))
        unit.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
