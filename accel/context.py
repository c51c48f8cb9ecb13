"""The immutable `Context`, and `init` / `shutdown`, which start and end the world.

A Context is facts and configuration only: who this process is, which device, which
engine, which precision. Transforms return a new one with `Context.record`; nothing that
changes per step lives here.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Mapping
from typing import Any

import attrs
import torch
import torch.distributed as dist

from accel.errors import (
    InvalidArgumentError,
    LaunchEnvironmentError,
    StuckRanksError,
)
from accel.launch_settings import LaunchSettings, read_settings
from accel.mesh import DATA_PARALLEL, MeshLayout
from accel.process_group import (
    _adopt_mesh,
    _join_process_group,
    _with_device_mesh,
    _xla_world,
    default_dist_backend,
    resolve_device,
    verify_connected,
)
from accel.validation import (
    check_bool,
    check_context,
    check_device,
    check_mapping,
    check_seed,
    check_str,
    check_timeout,
    check_type,
    fail,
)
from accel.world import World, detect_world

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)
#: how long accel's own barriers (shutdown, wait_for_everyone) wait for the last rank.
#: Ranks reach them from the same loop, in step within one training step plus what one
#: rank does alone just before (a log line, a small file): seconds. Thirty seconds ends a
#: run whose ranks diverged (one ran out of batches) in half a minute, not 30 minutes.
DEFAULT_BARRIER_TIMEOUT = datetime.timedelta(seconds=30)


def _to_device(value: str | torch.device) -> torch.device:
    return value if isinstance(value, torch.device) else torch.device(value)


def _to_timedelta(value: float | datetime.timedelta) -> datetime.timedelta:
    if isinstance(value, datetime.timedelta):
        return value
    return datetime.timedelta(seconds=float(value))


@attrs.frozen(repr=False)
class Context:
    """Facts and configuration of one process in a (possibly distributed) run.

    Immutable: transforms return `attrs.evolve`d copies, and `applied` is the trail of
    transforms that produced this one.

    >>> ctx = Context()                      # one CPU process, nothing applied
    >>> ctx.is_main_process, ctx.world_size
    (True, 1)
    """

    world: World = attrs.field(factory=World)
    device: torch.device = attrs.field(default=torch.device("cpu"), converter=_to_device)
    #: torch.distributed backend of the process group ("gloo", "nccl", ...); None: no group.
    dist_backend: str | None = None
    #: the training engine transforms dispatch to: single, ddp, fsdp, deepspeed, xla.
    backend: str = "single"
    #: the strategy config `shard_model` applied (accel.DDP(), accel.FSDP(), ...).
    strategy: Any = None
    #: the precision: the launch's (`ctx.settings.mixed_precision`) from init, then with_amp's.
    precision: str = "no"
    grad_accum_steps: int = 1
    #: the LM head's logits are sharded over the vocabulary (tensor_parallel(loss_parallel=True)).
    loss_parallel: bool = False
    #: sequences are split over the `cp` dimension and attention runs as a ring
    #: (accel.context_parallel): the loader cuts batches, FSDP sums the cp ranks' gradients.
    context_parallel: bool = False
    seed: int | None = None
    #: check shapes across ranks before each collective, instead of hanging on a mismatch.
    debug: bool = False
    timeout: datetime.timedelta = attrs.field(default=DEFAULT_TIMEOUT, converter=_to_timedelta)
    #: how long shutdown and wait_for_everyone wait for every rank before naming the missing.
    barrier_timeout: datetime.timedelta = attrs.field(default=DEFAULT_BARRIER_TIMEOUT,
                                                      converter=_to_timedelta)
    #: the process group collectives use; None is torch's default group.
    group: Any = attrs.field(default=None, eq=False)
    #: whether `init` created the default process group, so `shutdown` may destroy it.
    owns_process_group: bool = attrs.field(default=False, eq=False)
    applied: tuple[str, ...] = ()
    #: the named parallel dimensions (pp, dp_replicate, dp_shard, cp, tp) and their sizes.
    layout: MeshLayout = attrs.field(eq=True)
    #: the torch DeviceMesh built for `layout` by `init(mesh=...)` or adopted; see `mesh`.
    device_mesh: Any = attrs.field(default=None, eq=False)
    #: the process group over the data-parallel dimensions; None: `group` serves.
    data_group: Any = attrs.field(default=None, eq=False)
    #: the training settings of the launch (flag > ACCEL_* variable > config file >
    #: default), each with its source: the defaults of with_amp, shard_model, accumulate_grads.
    settings: LaunchSettings = attrs.field(factory=LaunchSettings)

    @layout.default
    def _one_data_parallel_dimension(self) -> MeshLayout:
        return MeshLayout.of(None, self.world.world_size)

    def __attrs_post_init__(self) -> None:
        if self.layout.size(*self.layout.names) != self.world.world_size:
            raise LaunchEnvironmentError(
                f"the mesh layout {self.layout} has {self.layout.size(*self.layout.names)} "
                f"ranks, but the world has {self.world.world_size}"
            )

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def world_size(self) -> int:
        return self.world.world_size

    @property
    def local_rank(self) -> int:
        return self.world.local_rank

    @property
    def local_world_size(self) -> int:
        return self.world.local_world_size

    @property
    def node_rank(self) -> int:
        return self.world.node_rank

    @property
    def num_nodes(self) -> int:
        return self.world.num_nodes

    @property
    def mesh(self) -> Any:
        """The torch DeviceMesh with this Context's dimension names; None without a group.

        Without `init(mesh=...)` it is one data-parallel dimension, ``dp_shard``, over the
        whole process group, as `shard_model` has always used it.
        """
        if self.device_mesh is not None or not dist.is_initialized():
            return self.device_mesh
        from torch.distributed.device_mesh import DeviceMesh

        # Wrapping the existing group is local (no collective): safe to do on first use.
        group = self.group if self.group is not None else dist.group.WORLD
        return DeviceMesh.from_group(group, self.device.type,
                                     mesh_dim_names=self.layout.names)

    @property
    def dp_group(self) -> Any:
        """The process group of this rank's data-parallel peers (None: the default group)."""
        return self.data_group if self.device_mesh is not None else self.group

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (dp_replicate x dp_shard)."""
        return self.layout.rank_in(self.rank, *DATA_PARALLEL)

    @property
    def dp_size(self) -> int:
        """How many ranks see different data: dp_replicate x dp_shard."""
        return self.layout.size(*DATA_PARALLEL)

    @property
    def tp_rank(self) -> int:
        return self.layout.rank_in(self.rank, "tp")

    @property
    def tp_size(self) -> int:
        return self.layout.size("tp")

    @property
    def cp_rank(self) -> int:
        return self.layout.rank_in(self.rank, "cp")

    @property
    def cp_size(self) -> int:
        return self.layout.size("cp")

    @property
    def pp_rank(self) -> int:
        return self.layout.rank_in(self.rank, "pp")

    @property
    def pp_size(self) -> int:
        return self.layout.size("pp")

    @property
    def is_distributed(self) -> bool:
        return self.world.world_size > 1

    @property
    def is_main_process(self) -> bool:
        return self.world.rank == 0

    @property
    def is_local_main_process(self) -> bool:
        return self.world.local_rank == 0

    @property
    def is_last_process(self) -> bool:
        return self.world.rank == self.world.world_size - 1

    @classmethod
    def from_process_group(
        cls,
        group: Any = None,
        *,
        device: str | torch.device | None = None,
        env: Mapping[str, str] | None = None,
        mesh: Any = None,
    ) -> Context:
        """Adopt a process group someone else started; see `accel.from_process_group`."""
        return from_process_group(group, device=device, env=env, mesh=mesh)

    def record(self, description: str, **changes: Any) -> Context:
        """A copy with `changes` applied and `description` appended to `applied`."""
        return attrs.evolve(self, applied=(*self.applied, description), **changes)

    def was_applied(self, transform: str) -> bool:
        """Whether a transform named `transform` (e.g. "with_amp") is in the trail."""
        return any(step.split("(", 1)[0] == transform for step in self.applied)

    def __repr__(self) -> str:
        w = self.world
        parts = [
            f"rank {w.rank}/{w.world_size}",
            f"local {w.local_rank}/{w.local_world_size}",
            f"node {w.node_rank}/{w.num_nodes}",
            f"device={self.device}",
            f"dist={self.dist_backend or 'none'}",
            f"backend={self.backend}",
            f"precision={self.precision}",
            f"grad_accum_steps={self.grad_accum_steps}",
        ]
        if len(self.layout.sizes) > 1:
            parts.append(f"mesh={self.layout}")
        if self.seed is not None:
            parts.append(f"seed={self.seed}")
        if self.debug:
            parts.append("debug")
        trail = " -> ".join(self.applied) or "nothing"
        return (f"Context({', '.join(parts)}; settings: {self.settings.describe()}; "
                f"applied: {trail})")


def init(
    *,
    device: str | torch.device | None = None,
    dist_backend: str | None = None,
    timeout: float | datetime.timedelta = DEFAULT_TIMEOUT,
    seed: int | None = None,
    debug: bool | None = None,
    env: Mapping[str, str] | None = None,
    mesh: Mapping[str, int] | None = None,
    barrier_timeout: float | datetime.timedelta | None = None,
) -> Context:
    """Read the launch environment, start the process group when world size > 1.

    Args:
        device: override the detected device ("cpu", "cuda", "cuda:1", "mps", "xla");
            one this torch cannot use (cuda on a CPU build) raises UnsupportedError.
        dist_backend: torch.distributed backend; default nccl+gloo on CUDA, gloo on CPU.
        timeout: collective timeout (seconds or timedelta).
        seed: seed python, numpy and torch on every rank (see `set_seed`).
        debug: check shapes across ranks before collectives (also ACCEL_DEBUG=1).
        env: the launch variables; defaults to os.environ.
        mesh: named parallel dimensions and their sizes, any of "pp", "dp_replicate",
            "dp_shard", "cp", "tp" (laid out outer to inner in that order); the sizes
            multiply to the world size, one may be -1 (the rest). Builds `ctx.mesh`;
            data-parallel transforms act on dp_replicate x dp_shard. Default: one
            data-parallel dimension over every rank.
        barrier_timeout: seconds `shutdown` and `wait_for_everyone` wait for every rank
            before raising StuckRanksError (also ACCEL_BARRIER_TIMEOUT); default 30.

    Calling init again in the same process returns an equal Context; a process group
    started by someone else is joined, never replaced.

    >>> ctx = accel.init()
    >>> ctx.world_size      # 2 under `accel launch -n 2 train.py`
    >>> ctx = accel.init(mesh={"dp_shard": 2, "tp": 2})   # 4 processes
    """
    _check_init_arguments(device, dist_backend, timeout, seed, debug, env)
    env = os.environ if env is None else env
    settings = read_settings(env)  # before anything starts: a bad value leaves nothing behind
    world = detect_world(env)
    layout = MeshLayout.of(mesh, world.world_size)
    resolved = resolve_device(device, world.local_rank, env)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if resolved.type == "xla":
        world = _xla_world(world, env)
    ctx = Context(
        world=world,
        device=resolved,
        timeout=timeout,
        barrier_timeout=_barrier_timeout(barrier_timeout, env),
        seed=seed,
        debug=debug if debug is not None else settings.debug,
        layout=layout,
        precision=settings.mixed_precision,
        settings=settings,
    )
    if world.world_size > 1:
        ctx = _join_process_group(ctx, dist_backend or default_dist_backend(resolved), env)
        if mesh is not None:
            ctx = _with_device_mesh(ctx)
    if seed is not None:
        from accel.runtime.seeding import set_seed

        set_seed(seed, ctx)
    return ctx


def _check_init_arguments(device: Any, dist_backend: Any, timeout: Any, seed: Any,
                          debug: Any, env: Any) -> None:
    """Before anything starts: a wrong argument must not leave a process group behind."""
    check_device("init", "device", device, optional=True)
    check_str("init", "dist_backend", dist_backend, optional=True)
    if dist_backend is not None:
        _check_dist_backend(dist_backend)
    check_timeout("init", "timeout", timeout)
    check_seed("init", seed, optional=True)
    check_bool("init", "debug", debug, optional=True)
    check_mapping("init", "env", env, "a mapping of launch variables (os.environ by default)",
                  optional=True)


def _check_dist_backend(value: str) -> None:
    """A backend torch knows ("gloo", "nccl", ...), or one per device: "cpu:gloo,cuda:nccl"."""
    known = [name for name in dist.Backend.backend_list if name != "undefined"] + ["xla"]
    for part in value.split(","):
        backend = part.rpartition(":")[2].strip().lower()
        if backend not in known:
            fail("init", "dist_backend", value,
                 f"a torch.distributed backend ({', '.join(known)}), or one per device "
                 "such as 'cpu:gloo,cuda:nccl'", wrong_type=False)


def _barrier_timeout(value: float | datetime.timedelta | None,
                     env: Mapping[str, str]) -> datetime.timedelta:
    """init's barrier_timeout, else ACCEL_BARRIER_TIMEOUT (seconds), else the default."""
    source = "init(barrier_timeout=...)"
    if value is None:
        value, source = env.get("ACCEL_BARRIER_TIMEOUT") or None, "ACCEL_BARRIER_TIMEOUT"
    if value is None:
        return DEFAULT_BARRIER_TIMEOUT
    try:  # a bool is no number of seconds; inf and 1e300 overflow a timedelta
        timeout = None if isinstance(value, bool) else _to_timedelta(value)
    except (TypeError, ValueError, OverflowError):
        timeout = None
    if timeout is None or timeout.total_seconds() <= 0:
        raise InvalidArgumentError(
            f"{source} must be a positive number of seconds (or a timedelta), got {value!r}")
    return timeout


def shutdown(ctx: Context) -> None:
    """Destroy the process group if (and only if) `init` created it, once every rank is here.

    Every rank waits at most `ctx.barrier_timeout` (init's `barrier_timeout`, 30 s by
    default) for the others. The group object itself is released at interpreter exit,
    not here. A DDP model freed after `shutdown` would otherwise drop the group's last
    reference inside torch's Reducer, whose destructor joins gloo's worker threads while
    holding the GIL, and a worker still releasing a finished collective waits for the
    GIL: the process hangs at exit (seen in about 1 of 10 restarted runs under load).
    Released from Python at exit, the group's destructor runs without the GIL.

    Raises:
        StuckRanksError: ranks did not arrive in time; the message names them.

    >>> accel.shutdown(ctx)
    """
    check_context("shutdown", ctx)
    from accel.runtime.pending import wait_all

    wait_all()  # a checkpoint still saving in the background commits first (or raises)
    if not (ctx.owns_process_group and dist.is_initialized()):
        return
    from accel.runtime.process import bounded_barrier

    try:
        bounded_barrier(ctx, "shutdown", ctx.barrier_timeout)
    except StuckRanksError:
        # Released now (no collective is in flight here): its connections close, and a
        # rank stuck in a collective with this one fails at once, not at its timeout.
        dist.destroy_process_group()
        raise
    keep_until_exit = [dist.group.WORLD]
    atexit.register(keep_until_exit.clear)
    dist.destroy_process_group()


def from_process_group(
    group: Any = None,
    *,
    device: str | torch.device | None = None,
    env: Mapping[str, str] | None = None,
    mesh: Any = None,
) -> Context:
    """A Context for a world someone else started (Lightning, a Trainer, your own code).

    Reads rank and world size from `group` (default: torch's default group); accel never
    destroys that group. Local rank and node come from the launch variables when they
    describe the same world (torchrun's, or Ray Train's with its NODE_RANK), else every
    rank is taken to be on one node. `mesh`: a torch DeviceMesh your framework built over
    the same ranks, with dimension names from "pp", "dp_replicate", "dp_shard", "cp",
    "tp" in that order; accel uses it as it is.

    >>> dist.init_process_group("gloo")            # done by your framework
    >>> ctx = accel.Context.from_process_group()
    """
    _check_adopted(group, device, env, mesh)
    if not dist.is_initialized():
        raise LaunchEnvironmentError(
            "Context.from_process_group() needs an initialised torch.distributed process "
            "group; call torch.distributed.init_process_group() first, or use accel.init()"
        )
    env = os.environ if env is None else env
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    launched = detect_world(env)
    if (launched.rank, launched.world_size) == (rank, size):
        world = _node_from_node_rank(launched, env)
    else:
        world = World(rank=rank, world_size=size, local_rank=rank, local_world_size=size,
                      launcher="external")
    settings = read_settings(env)
    ctx = Context(world=world, device=resolve_device(device, world.local_rank, env),
                  dist_backend=dist.get_backend(group), group=group,
                  precision=settings.mixed_precision, settings=settings)
    verify_connected(ctx)
    return ctx if mesh is None else _adopt_mesh(ctx, mesh)


def _node_from_node_rank(world: World, env: Mapping[str, str]) -> World:
    """Ray Train (like Lightning) names the node NODE_RANK beside torchrun's RANK and
    LOCAL_*, where torchrun says GROUP_RANK: without it every Ray node would be node 0."""
    node = env.get("NODE_RANK", "")
    if world.launcher != "torchrun" or env.get("GROUP_RANK") or not node.isdigit():
        return world
    return attrs.evolve(world, node_rank=int(node),
                        num_nodes=max(world.num_nodes, int(node) + 1))


def _check_adopted(group: Any, device: Any, env: Any, mesh: Any) -> None:
    from torch.distributed.device_mesh import DeviceMesh

    check_type("from_process_group", "group", group, dist.ProcessGroup,
               "a torch.distributed ProcessGroup (None: the default group)", optional=True)
    check_device("from_process_group", "device", device, optional=True)
    check_mapping("from_process_group", "env", env,
                  "a mapping of launch variables (os.environ by default)", optional=True)
    check_type("from_process_group", "mesh", mesh, DeviceMesh,
               "a torch DeviceMesh over the group's ranks", optional=True)
