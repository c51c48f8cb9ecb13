"""What schedulers tell `accel launch`: torchrun's PET_* (Kubeflow), a PyTorchJob pod, SLURM.

The layers are pure functions of the environment, tested from dicts; then real launches
on this machine: PET_* variables for one pod and for two pods, one process per pod
(RANK / WORLD_SIZE only), and `accel launch` in two tasks of a SLURM step (its variables
set by hand; tools/slurm_lane.py runs the real srun).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import REPO

from accel.cli import launch
from accel.cli.main import build_parser, main
from accel.errors import IncompatibleOptionsError, LaunchEnvironmentError
from accel.testing import LAUNCH_VARIABLES, free_port
from accel.transforms import schedulers, settings
from accel.world import World, detect_world, slurm_tasks_per_node


def options(env: dict, flags: dict | None = None, config: Path | None = None):
    env = {"ACCEL_CONFIG_FILE": os.devnull, **env}
    resolved = settings.resolve_settings(flags or {}, env, str(config) if config else None)
    return launch.launch_options(resolved), resolved


def torchrun_flags(opts) -> list[str]:
    return launch.torchrun_arguments(opts, "train.py", [])[:-3]  # less --module WORKER train.py


# ---- torchrun's PET_* variables (the Kubeflow operators set them) ----

KUBEFLOW_POD = {  # pod 1 of a 2-pod TrainJob with 4 processes per pod (Kubeflow Trainer)
    "PET_NNODES": "2", "PET_NPROC_PER_NODE": "4", "PET_NODE_RANK": "1",
    "PET_MASTER_ADDR": "job-node-0-0.job", "PET_MASTER_PORT": "29400",
}


def test_pet_variables_become_the_torchrun_arguments():
    opts, resolved = options(KUBEFLOW_POD)
    assert torchrun_flags(opts) == [
        "--nproc-per-node=4", "--nnodes=2", "--node-rank=1", "--max-restarts=0",
        "--master-addr=job-node-0-0.job", "--master-port=29400"]
    assert resolved.sources["num_nodes"] == "$PET_NNODES"
    assert resolved.sources["num_processes"] == "$PET_NPROC_PER_NODE"


def test_flag_beats_accel_variable_beats_pet_variable_beats_config_file(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("num_processes = 5\nmax_restarts = 2\n")
    env = {**KUBEFLOW_POD, "ACCEL_NUM_PROCESSES": "3"}
    assert options(env, config=config)[0].num_processes == 3
    assert options(env, {"num_processes": 2}, config)[0].num_processes == 2
    opts, resolved = options(KUBEFLOW_POD, config=config)
    assert (opts.num_processes, resolved.sources["num_processes"]) == (4, "$PET_NPROC_PER_NODE")
    assert (opts.max_restarts, resolved.sources["max_restarts"]) == (2, f"config file {config}")


def test_an_elastic_pytorchjob_gives_a_node_range_and_its_rendezvous():
    env = {"PET_NNODES": "1:3", "PET_NPROC_PER_NODE": "2", "PET_RDZV_BACKEND": "c10d",
           "PET_RDZV_ENDPOINT": "job-worker-0:23456", "PET_RDZV_ID": "job",
           "PET_RDZV_CONF": "join_timeout=900", "PET_MAX_RESTARTS": "5"}
    opts, _ = options(env)
    assert torchrun_flags(opts) == [
        "--nproc-per-node=2", "--nnodes=1:3", "--node-rank=0", "--max-restarts=5",
        "--rdzv-backend=c10d", "--rdzv-endpoint=job-worker-0:23456", "--rdzv-id=job",
        "--rdzv-conf=join_timeout=900"]


@pytest.mark.parametrize(("value", "expected"), [
    ("auto", None), ("gpu", None), ("cpu", os.cpu_count()), ("3", 3)])
def test_pet_nproc_per_node_words(value, expected):
    assert options({"PET_NPROC_PER_NODE": value})[0].num_processes == expected


@pytest.mark.parametrize(("env", "message"), [
    ({"PET_NPROC_PER_NODE": "many"}, "$PET_NPROC_PER_NODE='many' is not an integer"),
    ({"PET_NNODES": "3:2"}, "PET_NNODES='3:2' is not a node count"),
    ({"PET_NNODES": "0"}, "PET_NNODES='0' is not a node count"),
    ({"PET_NNODES": "1:2", "PET_MASTER_ADDR": "h"}, "needs a rendezvous that admits nodes"),
    ({"PET_NNODES": "2"}, "needs a meeting point"),
])
def test_bad_pet_variables_name_themselves(env, message):
    with pytest.raises(LaunchEnvironmentError, match=re.escape(message)):
        options(env)


def test_accel_num_nodes_below_a_pet_range_is_refused():
    env = {"PET_NNODES": "1:2", "ACCEL_NUM_NODES": "3", "PET_RDZV_BACKEND": "c10d",
           "PET_RDZV_ENDPOINT": "h:1"}
    with pytest.raises(LaunchEnvironmentError,
                       match=r"max_nodes 2 \(\$PET_NNODES\) is below num_nodes 3"):
        options(env)


# ---- a PyTorchJob pod without PET_*: RANK, WORLD_SIZE, MASTER_ADDR (one process a pod) ----

POD = {"WORLD_SIZE": "4", "RANK": "2", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"}


def test_detect_world_in_a_pod_is_one_process_per_node():
    world = detect_world(POD)
    assert world == World(rank=2, world_size=4, local_rank=0, local_world_size=1,
                          node_rank=2, num_nodes=4, master_addr="job-master-0",
                          master_port=23456, launcher="torchrun")


def test_accel_launch_in_a_pod_makes_each_pod_a_node():
    opts, resolved = options(POD)
    assert (opts.num_nodes, opts.node_rank, opts.master_addr, opts.master_port) == (
        4, 2, "job-master-0", 23456)
    assert resolved.sources["node_rank"] == "$RANK"
    assert opts.num_processes is None  # one per GPU of the pod


def test_a_torchrun_worker_is_not_a_pod():
    worker = {**POD, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    assert schedulers.pod_layers(worker) == []
    assert detect_world(worker).num_nodes == 2



def test_a_training_operator_v1_pod_with_nproc_per_node():
    # Worker 0 of a PyTorchJob (Master + 1 Worker) with nprocPerNode "8": the operator sets
    # torchrun's PET_NNODES / PET_NODE_RANK / PET_NPROC_PER_NODE but MASTER_* unprefixed.
    env = {"MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "16",
           "RANK": "1", "PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_NPROC_PER_NODE": "8"}
    opts, resolved = options(env)
    assert torchrun_flags(opts) == [
        "--nproc-per-node=8", "--nnodes=2", "--node-rank=1", "--max-restarts=0",
        "--master-addr=job-master-0", "--master-port=23456"]
    assert (resolved.sources["node_rank"], resolved.sources["master_addr"]) == (
        "$PET_NODE_RANK", "$MASTER_ADDR")


def test_a_stray_master_address_does_not_move_a_one_node_launch():
    opts, _ = options({"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29999"})
    assert (opts.num_nodes, opts.master_addr, opts.master_port) == (1, None, None)


# ---- SLURM ----

JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1",
       "SLURM_JOB_NODELIST": "cn7", "SLURM_NODELIST": "cn7", "SLURM_NODEID": "0",
       "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


def srun_task(procid: int, nodes: int, per_node: str, ntasks: int) -> dict[str, str]:
    """A task of `srun` in job 4242 on nodes cn[7-8] (variables as srun 22.05 sets them)."""
    counts = slurm_tasks_per_node({"SLURM_STEP_TASKS_PER_NODE": per_node})
    node = next(i for i in range(len(counts)) if procid < sum(counts[:i + 1]))
    return {**JOB, "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_JOB_NUM_NODES": "2",
            "SLURM_JOB_NODELIST": "cn[7-8]", "SLURM_NODELIST": "cn[7-8]",
            "SLURM_STEP_NODELIST": "cn[7-8]", "SLURM_NNODES": str(nodes),
            "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_NTASKS": str(ntasks),
            "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_STEP_TASKS_PER_NODE": per_node,
            "SLURM_TASKS_PER_NODE": per_node, "SLURM_PROCID": str(procid),
            "SLURM_NODEID": str(node), "SLURM_LOCALID": str(procid - sum(counts[:node]))}


def test_slurm_tasks_per_node_expands_the_repeat_form():
    assert slurm_tasks_per_node({"SLURM_TASKS_PER_NODE": "2(x3),1"}) == [2, 2, 2, 1]
    assert slurm_tasks_per_node({}) == []
    with pytest.raises(LaunchEnvironmentError, match="not in SLURM's N"):
        slurm_tasks_per_node({"SLURM_TASKS_PER_NODE": "2x3"})


def test_batch_shell_of_one_node_runs_its_tasks_as_processes():
    batch = {**JOB, "SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "2"}
    assert schedulers.slurm_mode(batch) == "batch"
    opts, resolved = options(batch)
    assert (opts.num_processes, opts.num_nodes) == (2, 1)
    assert resolved.sources["num_processes"] == "$SLURM_TASKS_PER_NODE"
    # one task says nothing about processes: the default (one per GPU) stays
    assert options({**JOB, "SLURM_TASKS_PER_NODE": "1"})[0].num_processes is None


def test_batch_shell_of_several_nodes_says_to_use_srun():
    batch = {**JOB, "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
             "SLURM_TASKS_PER_NODE": "1(x2)"}
    with pytest.raises(LaunchEnvironmentError, match="srun --ntasks-per-node=1 accel launch"):
        schedulers.check_slurm_launch(batch)


def test_srun_with_one_task_per_node_makes_each_task_its_nodes_launcher():
    task = srun_task(1, nodes=2, per_node="1(x2)", ntasks=2)
    assert schedulers.slurm_mode(task) == "per-node"
    opts, resolved = options(task, {"num_processes": 4})
    assert torchrun_flags(opts) == [
        "--nproc-per-node=4", "--nnodes=2", "--node-rank=1", "--max-restarts=0",
        "--master-addr=cn7", f"--master-port={20000 + 4242}"]
    assert resolved.sources["node_rank"] == "$SLURM_NODEID"


def test_srun_with_one_task_per_rank_is_the_launcher_itself():
    task = srun_task(4, nodes=2, per_node="3,2", ntasks=5)  # uneven: 3 tasks, then 2
    assert schedulers.slurm_mode(task) == "per-rank"
    assert schedulers.slurm_layers(task) == []
    world = detect_world(task)
    assert (world.rank, world.world_size, world.node_rank, world.num_nodes) == (4, 5, 1, 2)
    assert (world.local_rank, world.local_world_size, world.launcher) == (1, 2, "slurm")
    assert (world.master_addr, world.master_port) == ("cn7", 24242)
    assert launch.rank_variables(world) == {
        "RANK": "4", "WORLD_SIZE": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "cn7",
        "MASTER_PORT": "24242"}


def test_a_step_on_part_of_the_job_counts_the_steps_nodes_and_tasks():
    # `srun -N1 -n2` in a 2-node job: SLURM_JOB_NUM_NODES says 2, the step has 1 node.
    task = {**srun_task(1, nodes=1, per_node="2", ntasks=2), "SLURM_STEP_NODELIST": "cn8"}
    world = detect_world(task)
    assert (world.world_size, world.num_nodes, world.master_addr) == (2, 1, "cn8")


def test_srun_task_refuses_more_processes_and_restarts(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    env = {**srun_task(0, nodes=1, per_node="2", ntasks=2)}
    done = run_cli(["launch", "-n", "2", str(script)], env)
    assert done.returncode == 2 and "asks for more processes per task" in done.stderr
    with pytest.raises(IncompatibleOptionsError, match="needs torchrun's agent"):
        launch.launch_as_task(detect_world(env), launch.LaunchOptions(max_restarts=1),
                              str(script), [])


def test_the_slurm_guide_shows_the_script_the_lane_submits():
    guide = (REPO / "docs" / "slurm.md").read_text()
    script = (REPO / "tools" / "slurm" / "train.sbatch").read_text()
    assert f"```bash\n{script}```" in guide


# ---- the command line ----

def test_nnodes_takes_a_range():
    parser = build_parser()
    args = parser.parse_args(["launch", "--nnodes", "2:4", "--rdzv-backend", "c10d",
                              "--rdzv-endpoint", "h:1", "train.py"])
    flags = launch.command_line_settings(args)
    assert (flags["num_nodes"], flags["max_nodes"]) == (2, 4)
    opts = launch.launch_options(settings.resolve_settings(flags, {"ACCEL_CONFIG_FILE":
                                                                   os.devnull}))
    assert launch.node_count(opts) == "2:4"
    assert launch.node_count(launch.LaunchOptions(num_nodes=3)) == "3"


def test_a_bad_node_range_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["launch", "--nnodes", "4:2", "train.py"])
    assert exit_.value.code == 2
    assert "'4:2' is not a node count" in capsys.readouterr().err


def test_a_dynamic_rendezvous_gives_each_worker_group_a_fresh_store():
    elastic = launch.LaunchOptions(rdzv_backend="c10d", rdzv_endpoint="h:1")
    assert launch._rendezvous_environment(elastic) == {
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    assert launch._rendezvous_environment(launch.LaunchOptions()) == {}


# ---- real launches ----

RANKS_SCRIPT = """
    import torch
    import accel
    from accel.runtime import ops

    ctx = accel.init()
    total = ops.reduce(torch.tensor([1.0]), ctx, op="sum").item()
    print(f"rank {ctx.rank} of {ctx.world_size}: node {ctx.node_rank} of {ctx.num_nodes}, "
          f"local {ctx.local_rank} of {ctx.local_world_size}, sum {total:g}", flush=True)
    accel.shutdown(ctx)
"""


def cli_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARIABLES and not k.startswith(("PET_", "SLURM_"))}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def run_cli(argv: list[str], extra: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "accel", *argv], env=cli_env(extra),
                          cwd=REPO, capture_output=True, text=True, timeout=180)


def run_together(commands: list[list[str]], envs: list[dict[str, str]]) -> list[str]:
    """Start every command at once (the "pods" or tasks); each one's output, all exit 0."""
    processes = [subprocess.Popen(command, env=cli_env(env), cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for command, env in zip(commands, envs, strict=True)]
    try:
        outputs = [process.communicate(timeout=180)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output
    return outputs


@pytest.fixture
def ranks_script(tmp_path) -> str:
    path = tmp_path / "ranks.py"
    path.write_text(textwrap.dedent(RANKS_SCRIPT))
    return str(path)


@pytest.mark.spawned
def test_launch_with_pet_variables_of_one_pod(ranks_script):
    done = run_cli(["launch", ranks_script], {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "2"})
    assert done.returncode == 0, done.stderr
    for rank in (0, 1):
        assert f"rank {rank} of 2: node 0 of 1, local {rank} of 2, sum 2" in done.stdout


@pytest.mark.spawned
def test_launch_in_two_pods_with_pet_variables(ranks_script):
    port = str(free_port())
    pod = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_MASTER_ADDR": "127.0.0.1",
           "PET_MASTER_PORT": port}
    command = [sys.executable, "-m", "accel", "launch", ranks_script]
    outputs = run_together([command, command],
                           [{**pod, "PET_NODE_RANK": "0"}, {**pod, "PET_NODE_RANK": "1"}])
    for node, output in enumerate(outputs):
        assert f"rank {node} of 2: node {node} of 2, local 0 of 1, sum 2" in output


@pytest.mark.spawned
def test_one_process_per_pod_without_a_launcher(ranks_script):
    pod = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    command = [sys.executable, ranks_script]
    outputs = run_together([command, command], [{**pod, "RANK": "0"}, {**pod, "RANK": "1"}])
    for rank, output in enumerate(outputs):
        assert f"rank {rank} of 2: node {rank} of 2, local 0 of 1, sum 2" in output


@pytest.mark.spawned
def test_launch_in_each_task_of_a_slurm_step(ranks_script):
    # MASTER_PORT: a free one rather than the one derived from the job id
    step = {"SLURM_STEP_NODELIST": "localhost", "MASTER_PORT": str(free_port())}
    tasks = [{**srun_task(r, nodes=1, per_node="2", ntasks=2), **step} for r in (0, 1)]
    command = [sys.executable, "-m", "accel", "launch", ranks_script]
    outputs = run_together([command, command], tasks)
    for rank, output in enumerate(outputs):
        assert f"rank {rank} of 2: node 0 of 1, local {rank} of 2, sum 2" in output
