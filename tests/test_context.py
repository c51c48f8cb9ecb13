"""Context, init, shutdown and from_process_group, on real processes where it matters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch
import torch.distributed as dist

import accel
from accel.errors import LaunchEnvironmentError
from accel.testing import fake_world, free_port, run_world

REPO = Path(__file__).resolve().parents[1]


def test_context_is_immutable_and_records_its_trail():
    ctx = accel.Context()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        ctx.precision = "bf16"  # type: ignore[misc]
    later = ctx.record("with_amp(bf16)", precision="bf16").record("shard_model(ddp)")
    assert ctx.applied == () and ctx.precision == "no"
    assert later.applied == ("with_amp(bf16)", "shard_model(ddp)")
    assert later.was_applied("with_amp") and not later.was_applied("wrap_optimizer")
    assert "applied: with_amp(bf16) -> shard_model(ddp)" in repr(later)


def test_single_process_init_has_no_process_group():
    ctx = accel.init(env={})
    assert (ctx.rank, ctx.world_size, ctx.dist_backend) == (0, 1, None)
    assert ctx.is_main_process and ctx.is_local_main_process and ctx.is_last_process
    assert ctx.device == torch.device("cpu") and not dist.is_initialized()
    assert accel.init(env={}) == ctx
    accel.shutdown(ctx)


def test_device_override_and_environment_variable():
    assert accel.init(device="cpu", env={}).device == torch.device("cpu")
    assert accel.init(env={"ACCEL_DEVICE": "meta"}).device == torch.device("meta")
    assert accel.init(env={"ACCEL_DEBUG": "1"}).debug
    assert not accel.init(env={"ACCEL_DEBUG": "0"}).debug


def test_rank_properties_in_a_fake_world():
    with fake_world(rank=7, world_size=8, local_world_size=4) as ctx:
        assert (ctx.local_rank, ctx.node_rank, ctx.num_nodes) == (3, 1, 2)
        assert ctx.is_last_process and not ctx.is_main_process and not ctx.is_local_main_process


def init_twice_and_adopt(ctx: accel.Context) -> dict[str, object]:
    again = accel.init()
    adopted = accel.Context.from_process_group()
    accel.shutdown(again)  # did not create the group: must leave it alone
    still_there = dist.is_initialized()
    mismatch = ""
    try:
        accel.init(env={**os.environ, "RANK": str(1 - ctx.rank)})
    except LaunchEnvironmentError as err:
        mismatch = str(err)
    return {"equal": again == ctx, "owns": (ctx.owns_process_group, again.owns_process_group),
            "adopted": (adopted.rank, adopted.world_size, adopted.dist_backend),
            "still_there": still_there, "mismatch": mismatch}


def test_init_twice_from_process_group_and_shutdown_ownership():
    results = run_world(init_twice_and_adopt, 2)
    for rank, result in enumerate(results):
        assert result["equal"] and result["owns"] == (True, False)
        assert result["adopted"] == (rank, 2, "gloo")
        assert result["still_there"]
        assert "from_process_group" in result["mismatch"]


def test_from_process_group_without_a_group_says_what_to_do():
    with pytest.raises(LaunchEnvironmentError, match="init_process_group"):
        accel.Context.from_process_group()


PROBE = ("import accel, torch.distributed as d; c = accel.init(); "
         "print(c.rank, c.world_size, c.world.launcher, d.get_world_size()); accel.shutdown(c)")


@pytest.mark.parametrize("launcher", ["slurm", "openmpi", "mpich"])
def test_init_joins_a_real_world_from_other_launchers(launcher):
    """Two processes that only carry SLURM / MPI variables connect over tcp://."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        env.update(PYTHONPATH=str(REPO), MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   **_launcher_env(launcher, rank))
        procs.append(subprocess.Popen([sys.executable, "-c", PROBE], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = [p.communicate(timeout=120) for p in procs]
    for rank, (proc, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, err
        assert out.split() == [str(rank), "2", launcher, "2"]


def _launcher_env(launcher: str, rank: int) -> dict[str, str]:
    if launcher == "slurm":
        return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
                "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1", "SLURM_STEP_ID": "0",
                "SLURM_JOB_NODELIST": "localhost"}
    if launcher == "openmpi":
        return {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": "2",
                "OMPI_COMM_WORLD_LOCAL_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    return {"PMI_RANK": str(rank), "PMI_SIZE": "2", "MPI_LOCALRANKID": str(rank),
            "MPI_LOCALNRANKS": "2"}


def seeded_draws(ctx: accel.Context) -> list[float]:
    accel.set_seed(1234, ctx)
    same = torch.rand(1).item()
    accel.set_seed(1234, ctx, per_rank=True)
    per_rank = torch.rand(1).item()
    torch.manual_seed(ctx.rank)  # diverge, then synchronise from rank 0
    accel.synchronize_rng_states(ctx)
    synced = torch.rand(1).item()
    return [same, per_rank, synced]


def test_seeds_across_ranks():
    (same0, own0, synced0), (same1, own1, synced1) = run_world(seeded_draws, 2)
    assert same0 == same1 and own0 != own1 and synced0 == synced1


def test_a_device_this_torch_cannot_use_is_named():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(accel.errors.UnsupportedError, match="device='cuda'.*sees no CUDA"):
        accel.init(device="cuda", env={})
    with pytest.raises(accel.errors.UnsupportedError, match="ACCEL_DEVICE='cuda:1'"):
        accel.init(env={"ACCEL_DEVICE": "cuda:1"})
