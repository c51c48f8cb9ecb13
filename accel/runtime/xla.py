"""The XLA runtime as the core sees it: who this process is among XLA replicas, barriers.

Kept apart from the XLA engine (backends/xla.py): `accel.init` and the process helpers
need these before, or without, any strategy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from accel.errors import MissingDependencyError, UnsupportedError
from accel.world import World


def torch_xla_modules() -> Any:
    """torch_xla with its runtime and xla_model modules loaded; a clear error without it."""
    try:
        import torch_xla
        import torch_xla.core.xla_model  # noqa: F401
        import torch_xla.runtime  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("torch_xla", "xla", "the XLA backend") from exc
    return torch_xla


def runtime_world(env: Mapping[str, str]) -> World:
    """This process's place among XLA replicas spawned by `xmp.spawn`, from the XLA runtime.

    Outside a spawned replica (no PJRT_LOCAL_PROCESS_COUNT) it is one process, and the
    runtime is left unstarted: starting it would rule out switching SPMD on later.
    """
    if not env.get("PJRT_LOCAL_PROCESS_COUNT"):
        return World()
    xr = torch_xla_modules().runtime
    size, local = xr.world_size(), xr.local_process_count()
    return World(rank=xr.global_ordinal(), world_size=size, local_rank=xr.local_ordinal(),
                 local_world_size=local, node_rank=xr.host_index(),
                 num_nodes=max(1, size // local), launcher="xla" if size > 1 else "single")


def check_multiprocess(world: World) -> None:
    """Refuse several processes on PJRT's CPU device, which torch_xla cannot connect."""
    if world.world_size > 1 and torch_xla_modules().runtime.device_type() == "CPU":
        raise UnsupportedError(
            "torch_xla cannot connect several processes on its CPU device (each would "
            "silently train alone with world size 1); run one process with SPMD "
            "(CPU_NUM_DEVICES=N and accel.XLA(fsdp=True)), or use device='cpu' with gloo"
        )


def rendezvous(tag: str) -> None:
    """Block until every XLA replica reaches `tag` (the XLA process group's barrier is a no-op)."""
    torch_xla_modules().core.xla_model.rendezvous(tag)
