"""Joining the process group: the device, the torch.distributed group, the device mesh.

What `accel.init` and `accel.from_process_group` do once the launch environment is read:
pick the device, start or join the group (torchrun's store across elastic restarts),
check every rank connected, and build or adopt the named DeviceMesh of the layout.
"""

from __future__ import annotations

import atexit
import functools
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch
import torch.distributed as dist

from accel.errors import (
    LaunchEnvironmentError,
    MissingDependencyError,
    NotConnectedError,
    UnsupportedError,
)
from accel.mesh import MeshLayout, build_device_mesh, dp_group_of
from accel.world import World

if TYPE_CHECKING:
    from accel.context import Context


def resolve_device(
    device: str | torch.device | None, local_rank: int, env: Mapping[str, str]
) -> torch.device:
    """The device this process computes on: the explicit choice, ACCEL_DEVICE, or detected.

    Detection order: cuda:LOCAL_RANK, an XLA runtime (PJRT_DEVICE set), mps, cpu.
    """
    choice = device if device is not None else env.get("ACCEL_DEVICE") or None
    if choice is None:
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if env.get("PJRT_DEVICE"):
            return _xla_device()
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    choice = torch.device(choice)
    _check_available(choice, "device" if device is not None else "ACCEL_DEVICE")
    if choice.type == "cuda" and choice.index is None:
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    if choice.type == "xla":
        return _xla_device()
    return choice


def _check_available(device: torch.device, name: str) -> None:
    """A CUDA or MPS device this torch cannot use fails here, named, not deep in torch."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedError(
            f"init: {name}={str(device)!r}, but this torch ({torch.__version__}) sees no "
            f"CUDA device{'' if torch.backends.cuda.is_built() else ' (it is a CPU build)'}"
            ": drop the choice to use the detected device, or install a CUDA build of torch "
            "on a machine with a GPU")
    if device.type == "cuda" and device.index is not None and (
            device.index >= torch.cuda.device_count()):
        raise UnsupportedError(
            f"init: {name}={str(device)!r}, but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s); choose cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}, or 'cuda' for cuda:LOCAL_RANK")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UnsupportedError(f"init: {name}='mps', but MPS is not available here: use "
                               "'cpu', or drop the choice to use the detected device")


def _xla_device() -> torch.device:
    try:
        import torch_xla
    except ImportError as exc:
        raise MissingDependencyError("torch_xla", "xla", "an XLA device") from exc
    # Not torch_xla.device(): it starts the XLA runtime, after which SPMD (shard_model with
    # accel.XLA(fsdp=True)) can no longer be switched on. xla:0 is the process's device
    # both for a replica and for SPMD's virtual device.
    del torch_xla
    return torch.device("xla", 0)


def default_dist_backend(device: torch.device) -> str:
    """nccl for CUDA tensors plus gloo for CPU ones on GPUs; gloo elsewhere."""
    if device.type == "cuda":
        return "cpu:gloo,cuda:nccl"
    if device.type == "xla":
        return "xla"
    return "gloo"

def _with_device_mesh(ctx: Context) -> Context:
    """Build the DeviceMesh of ctx.layout and its data-parallel group (every rank, once)."""
    if ctx.device.type == "xla":
        raise LaunchEnvironmentError(
            "init(mesh=...) builds a torch DeviceMesh, which XLA devices do not use; on XLA "
            "describe the SPMD mesh with shard_model(strategy=accel.XLA(mesh_shape=...))"
        )
    device_mesh, data_group = build_device_mesh(ctx.layout, ctx.device.type, ctx.group)
    return attrs.evolve(ctx, device_mesh=device_mesh, data_group=data_group)


def _xla_world(world: World, env: Mapping[str, str]) -> World:
    """Under `xmp.spawn` (`accel launch --xla`) the XLA runtime, not variables, knows the world."""
    from accel.runtime import xla

    if world.launcher == "single":
        world = xla.runtime_world(env)
    xla.check_multiprocess(world)
    return world


def _join_process_group(ctx: Context, backend: str, env: Mapping[str, str]) -> Context:
    world = ctx.world
    owns = not dist.is_initialized()
    if owns:
        # torchrun's agent already serves the store at MASTER_PORT: join it through env://.
        # Other launchers publish no store, so rank 0 starts one at the master address.
        use_env = world.launcher in ("torchrun", "deepspeed") and env is os.environ
        init_method = "env://" if use_env else f"tcp://{world.master_addr}:{world.master_port}"
        if backend == "xla":  # torch_xla's rendezvous: ranks from the XLA runtime
            init_method = "xla://"
        store = _elastic_attempt_store(ctx, env) if use_env else None
        dist.init_process_group(
            backend, init_method=None if store is not None else init_method, store=store,
            rank=world.rank, world_size=world.world_size, timeout=ctx.timeout,
        )
    elif (dist.get_rank(), dist.get_world_size()) != (world.rank, world.world_size):
        raise LaunchEnvironmentError(
            f"a process group already exists as rank {dist.get_rank()} of "
            f"{dist.get_world_size()}, but the launch environment says rank {world.rank} of "
            f"{world.world_size}; use Context.from_process_group() to adopt the existing group"
        )
    ctx = attrs.evolve(ctx, dist_backend=dist.get_backend(), owns_process_group=owns)
    verify_connected(ctx)
    return ctx


def _elastic_attempt_store(ctx: Context, env: Mapping[str, str]) -> Any:
    """torchrun's agent store, with keys under this restart's prefix; None on a first run.

    The agent keeps one store across `--max-restarts` restarts: a restarted gloo group
    would read the previous attempt's addresses and fail ("connectFullMesh ... Connection
    refused") or hang, as about half of the measured restarts did.
    """
    attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0" or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    world = ctx.world
    store = dist.TCPStore(world.master_addr, world.master_port, is_master=False,
                          timeout=ctx.timeout)
    return dist.PrefixStore(f"accel/attempt{attempt}", store)


def verify_connected(ctx: Context) -> None:
    """All-reduce a 1 from every rank: the sum must be the world size.

    Also leaves a mark for `accel launch`, which reports ranks that never joined.
    """
    probe = torch.ones(1, device=ctx.device if ctx.dist_backend != "gloo" else "cpu")
    dist.all_reduce(probe, group=ctx.group)
    if int(probe.item()) != ctx.world_size:
        raise NotConnectedError(
            f"rank {ctx.rank} expected {ctx.world_size} connected ranks but counted "
            f"{int(probe.item())}: the processes did not join one process group"
        )
    launch_dir = os.environ.get("ACCEL_LAUNCH_DIR")
    if launch_dir:
        Path(launch_dir, f"joined-{ctx.rank}").touch()
    _let_collective_workers_finish_at_exit()


#: how long the interpreter's exit waits for collective worker threads (see below).
EXIT_GRACE_SECONDS = 0.05


@functools.cache
def _let_collective_workers_finish_at_exit() -> None:
    """Before the interpreter finalizes, give gloo's worker threads the GIL for a moment.

    A gloo worker frees a finished collective's tensors after the caller has already
    returned; for tensors Python let go of first (a gather's outputs), that needs the GIL.
    If the main thread reaches interpreter finalization first, the worker's GIL request
    ends its thread inside a C++ destructor and the process aborts ("terminate called
    without an active exception", exit code 134) after the script succeeded. Plain torch
    does it too: 3 of 110 two-rank runs ending in an all_gather, on this 2-core machine.
    Sleeping releases the GIL, so a waiting worker finishes first.
    """
    atexit.register(time.sleep, EXIT_GRACE_SECONDS)

def _adopt_mesh(ctx: Context, mesh: Any) -> Context:
    names = tuple(mesh.mesh_dim_names or ())
    if mesh.size() != ctx.world_size or len(names) != mesh.ndim:
        raise LaunchEnvironmentError(
            f"from_process_group(mesh=...) needs a DeviceMesh over the same {ctx.world_size} "
            f"ranks with a name for every dimension; got {mesh.size()} ranks named {names}"
        )
    layout = MeshLayout.from_names(names, tuple(mesh.shape))
    if list(layout.coordinates(ctx.rank).values()) != list(mesh.get_coordinate() or ()):
        raise LaunchEnvironmentError(
            f"from_process_group(mesh=...): rank {ctx.rank} sits at {mesh.get_coordinate()} "
            f"of the mesh, not at the row-major place {layout.coordinates(ctx.rank)}; build "
            "the mesh with init_device_mesh(device_type, shape, mesh_dim_names=...)"
        )
    data_group = ctx.group if len(names) == 1 else dp_group_of(mesh, layout)
    return attrs.evolve(ctx, layout=layout, device_mesh=mesh, data_group=data_group)
