"""detect_world: every launcher's environment, given as a plain dict, becomes a World."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from accel.errors import LaunchEnvironmentError
from accel.world import DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT, World, detect_world, first_host


def test_plain_process_is_a_world_of_one():
    assert detect_world({}) == World()
    world = detect_world({"PATH": "/usr/bin", "HOME": "/root"})
    assert (world.rank, world.world_size, world.launcher) == (0, 1, "single")
    assert (world.master_addr, world.master_port) == (DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT)


def test_empty_launch_variables_count_as_unset():
    assert detect_world({"RANK": "", "SLURM_PROCID": ""}) == World()


def test_torchrun_single_node():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29511"}
    assert detect_world(env) == World(rank=1, world_size=2, local_rank=1, local_world_size=2,
                                      node_rank=0, num_nodes=1, master_addr="127.0.0.1",
                                      master_port=29511, launcher="torchrun")


def test_torchrun_two_nodes():
    # Rank 5 of 2 nodes x 4 processes: the second process of node 1.
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "node0",
           "MASTER_PORT": "29400"}
    world = detect_world(env)
    assert (world.rank, world.world_size, world.local_rank, world.local_world_size) == (5, 8, 1, 4)
    assert (world.node_rank, world.num_nodes) == (1, 2)
    assert (world.master_addr, world.master_port, world.launcher) == ("node0", 29400, "torchrun")


def test_torchrun_without_group_variables_derives_the_node_count():
    env = {"RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"}
    assert detect_world(env).num_nodes == 2


def test_deepspeed_launcher():
    # The DeepSpeed launcher adds CROSS_RANK / CROSS_SIZE / LOCAL_SIZE to torchrun's set.
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "CROSS_RANK": "1",
           "CROSS_SIZE": "2", "LOCAL_SIZE": "2", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "29500"}
    assert detect_world(env) == World(rank=3, world_size=4, local_rank=1, local_world_size=2,
                                      node_rank=1, num_nodes=2, master_addr="10.0.0.1",
                                      master_port=29500, launcher="deepspeed")


SRUN_ENV = {
    # Task 5 of `srun --nodes 2 --ntasks-per-node 4` on nodes gpu[03-05,9] (job 123456).
    "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
    "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "4(x2)",
    "SLURM_JOB_NODELIST": "gpu[03-05,9]", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "123456",
}


def test_slurm_under_srun():
    world = detect_world(SRUN_ENV)
    assert world == World(rank=5, world_size=8, local_rank=1, local_world_size=4, node_rank=1,
                          num_nodes=2, master_addr="gpu03", master_port=20000 + 123456 % 10000,
                          launcher="slurm")


def test_slurm_master_variables_win_over_the_node_list():
    world = detect_world({**SRUN_ENV, "MASTER_ADDR": "login1", "MASTER_PORT": "1234"})
    assert (world.master_addr, world.master_port) == ("login1", 1234)


def test_slurm_batch_shell_without_a_step_is_a_single_process():
    # sbatch's one shell sees the allocation's SLURM_* but srun started no tasks.
    batch_shell = {k: v for k, v in SRUN_ENV.items() if k != "SLURM_STEP_ID"}
    batch_shell["SLURM_PROCID"] = "0"
    assert detect_world(batch_shell) == World()


def test_torchrun_inside_slurm_is_torchrun():
    env = {**SRUN_ENV, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    world = detect_world(env)
    assert (world.launcher, world.world_size) == ("torchrun", 2)


@pytest.mark.parametrize(("nodelist", "first"), [
    ("gpu[03-05,9]", "gpu03"), ("gpu[9,03-05]", "gpu9"), ("node1,node2", "node1"),
    ("cpu-a[1-4],gpu[1-2]", "cpu-a1"), ("single", "single"), ("", ""),
])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_open_mpi_single_node():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
           "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert detect_world(env) == World(rank=1, world_size=2, local_rank=1, local_world_size=2,
                                      launcher="openmpi")


def test_open_mpi_two_nodes():
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8",
           "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
           "MASTER_ADDR": "node0", "MASTER_PORT": "29600"}
    world = detect_world(env)
    assert (world.rank, world.local_rank, world.node_rank, world.num_nodes) == (5, 1, 1, 2)
    assert (world.master_addr, world.master_port, world.launcher) == ("node0", 29600, "openmpi")


def test_open_mpi_node_rank_is_the_node_index():
    env = {"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8",
           "OMPI_COMM_WORLD_LOCAL_RANK": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
           "OMPI_COMM_WORLD_NODE_RANK": "2", "MASTER_ADDR": "node0"}
    assert detect_world(env).node_rank == 1


def test_mpich_and_intel_mpi():
    env = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
           "MASTER_ADDR": "node0"}
    assert detect_world(env) == World(rank=3, world_size=4, local_rank=1, local_world_size=2,
                                      node_rank=1, num_nodes=2, master_addr="node0",
                                      launcher="mpich")


def test_non_integer_rank_names_the_variable():
    with pytest.raises(LaunchEnvironmentError, match="RANK='one' is not an integer"):
        detect_world({"RANK": "one", "WORLD_SIZE": "2"})


def test_rank_outside_the_world_is_rejected():
    with pytest.raises(LaunchEnvironmentError, match="rank 2 is outside the world of size 2"):
        detect_world({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_local_rank_outside_the_node_is_rejected():
    with pytest.raises(LaunchEnvironmentError, match="local rank 2 is outside"):
        detect_world({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "2",
                      "LOCAL_WORLD_SIZE": "2"})


def test_missing_world_size_is_named():
    with pytest.raises(LaunchEnvironmentError, match="lacks WORLD_SIZE"):
        detect_world({"RANK": "0"})


@pytest.mark.parametrize("env", [
    {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "8",
     "OMPI_COMM_WORLD_LOCAL_SIZE": "4"},
    {"PMI_RANK": "0", "PMI_SIZE": "8", "MPI_LOCALNRANKS": "4"},
], ids=["openmpi", "mpich"])
def test_multi_node_mpi_without_master_addr_says_what_to_export(env):
    with pytest.raises(LaunchEnvironmentError, match="export MASTER_ADDR"):
        detect_world(env)


@st.composite
def torchrun_envs(draw):
    """Any consistent torchrun environment: nodes x processes per node, one rank of it."""
    num_nodes = draw(st.integers(1, 16))
    per_node = draw(st.integers(1, 16))
    node_rank = draw(st.integers(0, num_nodes - 1))
    local_rank = draw(st.integers(0, per_node - 1))
    env = {"RANK": str(node_rank * per_node + local_rank),
           "WORLD_SIZE": str(num_nodes * per_node), "LOCAL_RANK": str(local_rank),
           "LOCAL_WORLD_SIZE": str(per_node), "GROUP_RANK": str(node_rank),
           "GROUP_WORLD_SIZE": str(num_nodes),
           "MASTER_PORT": str(draw(st.integers(1, 65535)))}
    return env


@given(torchrun_envs())
def test_any_torchrun_environment_round_trips(env):
    world = detect_world(env)
    assert world.launcher == "torchrun"
    assert (world.rank, world.world_size) == (int(env["RANK"]), int(env["WORLD_SIZE"]))
    assert (world.local_rank, world.local_world_size) == (int(env["LOCAL_RANK"]),
                                                          int(env["LOCAL_WORLD_SIZE"]))
    assert (world.node_rank, world.num_nodes) == (int(env["GROUP_RANK"]),
                                                  int(env["GROUP_WORLD_SIZE"]))
    assert world.master_port == int(env["MASTER_PORT"])
