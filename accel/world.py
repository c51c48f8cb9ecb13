"""Who am I in the world: a pure function from launch environment variables to a `World`.

Every launcher accel knows (torchrun / `accel launch`, the DeepSpeed launcher, a Kubeflow
PyTorchJob pod, SLURM, Open MPI, MPICH / Intel MPI, a plain process) is recognised from a
mapping alone, so each is unit-tested without starting a process. What a scheduler tells
`accel launch` (torchrun's `PET_*` variables, a SLURM allocation) is read the same way, in
`accel.transforms.schedulers`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import attrs

from accel.errors import LaunchEnvironmentError
from accel.validation import check_mapping

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500


@attrs.frozen
class World:
    """The shape of the job and this process's place in it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = DEFAULT_MASTER_ADDR
    master_port: int = DEFAULT_MASTER_PORT
    launcher: str = "single"

    def __attrs_post_init__(self) -> None:
        if self.world_size < 1:
            raise LaunchEnvironmentError(f"world size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise LaunchEnvironmentError(
                f"rank {self.rank} is outside the world of size {self.world_size}; "
                "check RANK / WORLD_SIZE (or your launcher's equivalents)"
            )
        if not 0 <= self.local_rank < self.local_world_size:
            raise LaunchEnvironmentError(
                f"local rank {self.local_rank} is outside the node's {self.local_world_size} "
                "processes; check LOCAL_RANK / LOCAL_WORLD_SIZE"
            )


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int:
    """The first of `names` set in `env`, as an int; `default` when none is set."""
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise LaunchEnvironmentError(
                    f"{name}={value!r} is not an integer; fix the launch environment"
                ) from None
    if default is None:
        raise LaunchEnvironmentError(f"the launch environment lacks {' or '.join(names)}")
    return default


def _nodes(world_size: int, local_world_size: int) -> int:
    return max(1, world_size // max(1, local_world_size))


def _master(env: Mapping[str, str], default_addr: str, default_port: int) -> tuple[str, int]:
    addr = env.get("MASTER_ADDR") or default_addr
    return addr, _int(env, "MASTER_PORT", default=default_port)


def _from_torchrun(env: Mapping[str, str]) -> World:
    deepspeed = "CROSS_RANK" in env  # the DeepSpeed launcher's own addition to torchrun's set
    if not deepspeed and not env.get("LOCAL_RANK") and not env.get("LOCAL_WORLD_SIZE"):
        return _one_process_per_node(env)
    world_size = _int(env, "WORLD_SIZE")
    local_world_size = _int(env, "LOCAL_WORLD_SIZE", default=world_size)
    addr, port = _master(env, DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT)
    return World(
        rank=_int(env, "RANK"),
        world_size=world_size,
        local_rank=_int(env, "LOCAL_RANK", default=0),
        local_world_size=_int(env, "LOCAL_SIZE", default=local_world_size) if deepspeed
        else local_world_size,
        node_rank=_int(env, "CROSS_RANK" if deepspeed else "GROUP_RANK", default=0),
        num_nodes=_int(env, "CROSS_SIZE", "GROUP_WORLD_SIZE",
                       default=_nodes(world_size, local_world_size)),
        master_addr=addr,
        master_port=port,
        launcher="deepspeed" if deepspeed else "torchrun",
    )


def _one_process_per_node(env: Mapping[str, str]) -> World:
    """RANK and WORLD_SIZE without LOCAL_*: a scheduler started each rank on a machine (or
    pod) of its own, as a Kubeflow PyTorchJob does for `python train.py` in every pod."""
    world_size = _int(env, "WORLD_SIZE")
    rank = _int(env, "RANK")
    addr, port = _master(env, DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT)
    return World(rank=rank, world_size=world_size, local_rank=0, local_world_size=1,
                 node_rank=rank, num_nodes=world_size, master_addr=addr, master_port=port,
                 launcher="torchrun")


def _from_open_mpi(env: Mapping[str, str]) -> World:
    world_size = _int(env, "OMPI_COMM_WORLD_SIZE")
    local_world_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", default=world_size)
    rank = _int(env, "OMPI_COMM_WORLD_RANK")
    addr, port = _mpi_master(env, _nodes(world_size, local_world_size))
    return World(
        rank=rank,
        world_size=world_size,
        local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", default=0),
        local_world_size=local_world_size,
        # OMPI_COMM_WORLD_NODE_RANK is the rank within the node, not the node index.
        node_rank=rank // local_world_size,
        num_nodes=_nodes(world_size, local_world_size),
        master_addr=addr,
        master_port=port,
        launcher="openmpi",
    )


def _from_pmi(env: Mapping[str, str]) -> World:
    """MPICH and Intel MPI (Hydra process manager)."""
    world_size = _int(env, "PMI_SIZE")
    local_world_size = _int(env, "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE", default=world_size)
    rank = _int(env, "PMI_RANK")
    addr, port = _mpi_master(env, _nodes(world_size, local_world_size))
    return World(
        rank=rank,
        world_size=world_size,
        local_rank=_int(env, "MPI_LOCALRANKID", "PMI_LOCAL_RANK", default=0),
        local_world_size=local_world_size,
        node_rank=rank // local_world_size,
        num_nodes=_nodes(world_size, local_world_size),
        master_addr=addr,
        master_port=port,
        launcher="mpich",
    )


def _mpi_master(env: Mapping[str, str], num_nodes: int) -> tuple[str, int]:
    # MPI launchers publish no rendezvous address; across nodes it must come from the user.
    if num_nodes > 1 and not env.get("MASTER_ADDR"):
        raise LaunchEnvironmentError(
            "an MPI job over several nodes needs the rendezvous host: export MASTER_ADDR "
            "(the first node's address) and MASTER_PORT to every rank, e.g. "
            "mpirun -x MASTER_ADDR=node1 -x MASTER_PORT=29500 ..."
        )
    return _master(env, DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT)


def _from_slurm(env: Mapping[str, str]) -> World:
    # srun overrides the job's counts with its step's; the STEP_ names are the step's alone.
    world_size = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    num_nodes = _int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES",
                     default=1)
    node_rank = _int(env, "SLURM_NODEID", default=0)
    per_node = slurm_tasks_per_node(env)
    local_world_size = (per_node[node_rank] if node_rank < len(per_node)
                        else max(1, world_size // num_nodes))
    addr, port = _master(env, slurm_master_host(env) or DEFAULT_MASTER_ADDR,
                         slurm_master_port(env))
    return World(
        rank=_int(env, "SLURM_PROCID"),
        world_size=world_size,
        local_rank=_int(env, "SLURM_LOCALID", default=0),
        local_world_size=local_world_size,
        node_rank=node_rank,
        num_nodes=num_nodes,
        master_addr=addr,
        master_port=port,
        launcher="slurm",
    )


def slurm_tasks_per_node(env: Mapping[str, str]) -> list[int]:
    """Tasks on each node of the step (or job): SLURM's '2(x3),1' -> [2, 2, 2, 1]; [] if unset.

    >>> slurm_tasks_per_node({"SLURM_TASKS_PER_NODE": "2(x2),1"})
    [2, 2, 1]
    """
    spec = (env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
            or env.get("SLURM_NTASKS_PER_NODE") or "")
    counts: list[int] = []
    for item in filter(None, spec.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            raise LaunchEnvironmentError(
                f"SLURM tasks per node {spec!r} is not in SLURM's N(xM),... form; fix the "
                "launch environment")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def slurm_master_host(env: Mapping[str, str]) -> str:
    """The first host of the step's (else the job's) node list: every task agrees on it.

    >>> slurm_master_host({"SLURM_JOB_NODELIST": "gpu[03-05]"})
    'gpu03'
    """
    return first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST")
                      or env.get("SLURM_JOB_NODELIST") or "")


def slurm_master_port(env: Mapping[str, str]) -> int:
    """A port every task of a job derives alike from the job id (20000-29999), so two jobs
    sharing a node do not clash; torch's default 29500 outside a job.

    >>> slurm_master_port({"SLURM_JOB_ID": "123456"})
    23456
    """
    job_id = _int(env, "SLURM_JOB_ID", "SLURM_JOBID", default=0)
    return 20000 + job_id % 10000 if job_id else DEFAULT_MASTER_PORT


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        return ""
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


_LAUNCHERS: tuple[tuple[str, Callable[[Mapping[str, str]], World]], ...] = (
    # torchrun and the DeepSpeed launcher set RANK; they win over an enclosing srun/mpirun.
    ("RANK", _from_torchrun),
    ("OMPI_COMM_WORLD_RANK", _from_open_mpi),
    ("PMI_RANK", _from_pmi),
    ("SLURM_PROCID", _from_slurm),
)


def detect_world(env: Mapping[str, str]) -> World:
    """Read the world from launch variables: torchrun, DeepSpeed, Open MPI, MPICH, SLURM.

    A mapping with none of them is a plain single process. RANK and WORLD_SIZE without
    LOCAL_RANK / LOCAL_WORLD_SIZE (a Kubeflow PyTorchJob pod running `python train.py`) is
    one process per node: local rank 0, node rank = RANK.

    >>> detect_world({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).rank
    1
    """
    check_mapping("detect_world", "env", env,
                  "a Mapping of launch variables (os.environ or a dict of str)")
    for marker, parse in _LAUNCHERS:
        if env.get(marker, "") != "":
            # SLURM without srun (a batch script's one shell) has SLURM_PROCID=0 but also
            # SLURM_NTASKS>1: trust it only when srun actually started the tasks.
            srun_started = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
            if marker == "SLURM_PROCID" and not srun_started:
                continue
            return parse(env)
    return World()
