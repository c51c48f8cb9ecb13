"""What a scheduler tells `accel launch`, as layers of launch settings.

Three sources, read from the environment alone (so each is unit-tested from a dict):

- torchrun's `PET_<FLAG>` variables, which torchrun reads as defaults of its flags and
  the Kubeflow operators set in every pod (`PET_NNODES`, `PET_NPROC_PER_NODE`,
  `PET_NODE_RANK`, `PET_MASTER_ADDR`, `PET_MASTER_PORT`, `PET_RDZV_*`, `PET_MAX_RESTARTS`);
- a Kubeflow PyTorchJob pod: its `MASTER_ADDR` / `MASTER_PORT` (which torchrun itself
  does not read), and without `PET_NNODES`, `WORLD_SIZE` pods, this one `RANK`, one node
  each;
- a SLURM allocation: in the batch script's shell (one node), or under `srun` with one
  task per node (each task is the launcher of its node). Under `srun` with one task per
  rank, `slurm_mode` says "per-rank" and `accel launch` runs the script once per task.

They sit, in that order, below the `ACCEL_<NAME>` variables and above the config file:
flag > `ACCEL_<NAME>` > `PET_<NAME>` > PyTorchJob pod > SLURM > config file > default
(see accel.transforms.settings). Each value's source is the variable it came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from accel.errors import LaunchEnvironmentError
from accel.world import (
    detect_world,
    slurm_master_host,
    slurm_master_port,
    slurm_tasks_per_node,
)

#: one settings layer: (its source, {setting name: value}).
Layer = tuple[str, dict[str, Any]]

#: torchrun's variable for each launch setting (torchrun reads the others, e.g.
#: PET_MONITOR_INTERVAL, itself: accel passes them through untouched).
PET_VARIABLES = (
    ("PET_NPROC_PER_NODE", "num_processes"), ("PET_NNODES", "num_nodes"),
    ("PET_NODE_RANK", "node_rank"), ("PET_MASTER_ADDR", "master_addr"),
    ("PET_MASTER_PORT", "master_port"), ("PET_RDZV_BACKEND", "rdzv_backend"),
    ("PET_RDZV_ENDPOINT", "rdzv_endpoint"), ("PET_RDZV_ID", "rdzv_id"),
    ("PET_RDZV_CONF", "rdzv_conf"), ("PET_MAX_RESTARTS", "max_restarts"),
)
_INT_SETTINGS = ("node_rank", "master_port", "max_restarts")
#: torchrun's device-count words for --nproc-per-node: accel's default (one per GPU).
_DEVICE_COUNTS = ("auto", "gpu", "xpu")


def scheduler_layers(env: Mapping[str, str]) -> list[Layer]:
    """The launch settings that torchrun's variables, a PyTorchJob pod and SLURM give.

    >>> scheduler_layers({"PET_NNODES": "1:4"})
    [('$PET_NNODES', {'num_nodes': 1, 'max_nodes': 4})]
    """
    return [*torchrun_layers(env), *pod_layers(env), *slurm_layers(env)]


def torchrun_layers(env: Mapping[str, str]) -> list[Layer]:
    """One layer per `PET_*` variable set.

    >>> torchrun_layers({"PET_NPROC_PER_NODE": "auto", "PET_NODE_RANK": "1"})
    [('$PET_NODE_RANK', {'node_rank': 1})]
    """
    layers = []
    for variable, name in PET_VARIABLES:
        raw = env.get(variable, "").strip()
        if raw == "":
            continue
        if name == "num_processes":
            values = _processes(variable, raw)
        elif name == "num_nodes":
            low, high = node_range(raw, variable)
            values = {"num_nodes": low, "max_nodes": high}
        elif name in _INT_SETTINGS:
            values = {name: _integer(variable, raw)}
        else:
            values = {name: raw}
        if values:
            layers.append((f"${variable}", values))
    return layers


def node_range(text: str, source: str) -> tuple[int, int]:
    """torchrun's node count, 'N' or 'MIN:MAX' (elastic), as (MIN, MAX).

    >>> node_range("2:4", "--nnodes")
    (2, 4)
    """
    parts = text.strip().split(":")
    if len(parts) in (1, 2) and all(part.strip().isdigit() for part in parts):
        low, high = int(parts[0]), int(parts[-1])
        if 1 <= low <= high:
            return low, high
    raise LaunchEnvironmentError(
        f"{source}={text!r} is not a node count: pass N, or MIN:MAX with 1 <= MIN <= MAX for "
        "an elastic run (e.g. 1:4)")


def _processes(variable: str, raw: str) -> dict[str, Any]:
    if raw.lower() in _DEVICE_COUNTS:
        return {}  # one per GPU (else 1): accel launch's default
    if raw.lower() == "cpu":
        return {"num_processes": os.cpu_count() or 1}
    return {"num_processes": _integer(variable, raw)}


def _integer(variable: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise LaunchEnvironmentError(
            f"${variable}={raw!r} is not an integer; fix or unset it") from None


def pod_layers(env: Mapping[str, str]) -> list[Layer]:
    """A PyTorchJob pod: the operator's MASTER_ADDR / MASTER_PORT (torchrun reads only
    PET_MASTER_*), and without PET_NNODES, RANK of WORLD_SIZE pods, one node each.

    >>> pod_layers({"WORLD_SIZE": "2", "RANK": "1"})
    [('$WORLD_SIZE', {'num_nodes': 2, 'max_nodes': 2}), ('$RANK', {'node_rank': 1})]
    """
    if any(env.get(name) for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "CROSS_RANK")):
        return []  # inside a torchrun / DeepSpeed worker: not a pod's launch variables
    layers: list[Layer] = []
    nodes = 1
    if env.get("PET_NNODES"):
        nodes = node_range(env["PET_NNODES"], "$PET_NNODES")[1]
    elif env.get("RANK") and env.get("WORLD_SIZE"):
        world = detect_world(env)
        nodes = world.num_nodes
        layers += [("$WORLD_SIZE", {"num_nodes": nodes, "max_nodes": nodes}),
                   ("$RANK", {"node_rank": world.node_rank})]
    # Only for a job of several pods: a stray MASTER_* in a shell must not move a local run.
    if nodes > 1 and env.get("MASTER_ADDR"):
        layers.append(("$MASTER_ADDR", {"master_addr": env["MASTER_ADDR"]}))
    if nodes > 1 and env.get("MASTER_PORT"):
        layers.append(("$MASTER_PORT", {"master_port": _integer("MASTER_PORT",
                                                                env["MASTER_PORT"])}))
    return layers


def slurm_mode(env: Mapping[str, str]) -> str | None:
    """How `accel launch` runs in a SLURM job, or None outside one.

    "batch": the batch script's (or salloc's) shell, on the first node only;
    "per-node": a task of `srun` with one task per node, which starts the node's processes;
    "per-rank": a task of `srun` with several tasks on a node, each one rank.

    >>> slurm_mode({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_TASKS_PER_NODE": "4"})
    'per-rank'
    """
    if not (env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")):
        return None
    if not (env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")):
        return "batch"
    per_node = slurm_tasks_per_node(env)
    if per_node:
        return "per-node" if max(per_node) == 1 else "per-rank"
    world = detect_world(env)
    return "per-node" if world.world_size == world.num_nodes else "per-rank"


def slurm_nodes(env: Mapping[str, str]) -> tuple[str, int]:
    """The variable giving the step's (else the job's) node count, and the count.

    >>> slurm_nodes({"SLURM_JOB_NUM_NODES": "4", "SLURM_STEP_NUM_NODES": "2"})
    ('SLURM_STEP_NUM_NODES', 2)
    """
    for variable in ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"):
        if env.get(variable):
            return variable, _integer(variable, env[variable])
    return "SLURM_NNODES", 1


def slurm_layers(env: Mapping[str, str]) -> list[Layer]:
    """The batch shell of a one-node job: its tasks are the processes; a per-node srun
    task: the step's nodes, this node's index and the first node as the meeting point.

    >>> slurm_layers({"SLURM_JOB_ID": "7", "SLURM_TASKS_PER_NODE": "2"})
    [('$SLURM_TASKS_PER_NODE', {'num_processes': 2})]
    """
    mode = slurm_mode(env)
    variable, nodes = slurm_nodes(env)
    per_node = slurm_tasks_per_node(env)
    if mode == "batch":
        if nodes > 1 or not per_node or per_node[0] < 2:
            return []  # one task says nothing: keep the default (one per GPU)
        return [("$SLURM_TASKS_PER_NODE", {"num_processes": per_node[0]})]
    if mode != "per-node":
        return []
    layers: list[Layer] = [(f"${variable}", {"num_nodes": nodes, "max_nodes": nodes}),
                           ("$SLURM_NODEID", {"node_rank": _integer(
                               "SLURM_NODEID", env.get("SLURM_NODEID") or "0")})]
    if nodes > 1:  # one node: torchrun picks a free port itself
        layers += [("$SLURM_STEP_NODELIST", {"master_addr": slurm_master_host(env)}),
                   ("$SLURM_JOB_ID", {"master_port": slurm_master_port(env)})]
    return layers


def check_slurm_launch(env: Mapping[str, str]) -> None:
    """Refuse `accel launch` in the batch shell of a multi-node job: it runs on node 0 only.

    Raises:
        LaunchEnvironmentError: saying to start it with srun, one task per node.

    >>> check_slurm_launch({"SLURM_JOB_ID": "7", "SLURM_NNODES": "1"})  # one node: fine
    """
    variable, nodes = slurm_nodes(env)
    if slurm_mode(env) == "batch" and nodes > 1:
        raise LaunchEnvironmentError(
            f"this is the batch shell of a {nodes}-node SLURM job (${variable}), which runs "
            "on the first node only; start accel launch on every node: "
            "srun --ntasks-per-node=1 accel launch ... (see docs/slurm.md)")
