"""Test your own distributed code the way accel tests itself.

- `run_world(fn, world_size=2)`: N real gloo processes, each running `fn(ctx, *args)`.
- `fake_world(rank, world_size)`: one process that believes it is rank `rank` of
  `world_size` (torch's fake process group): shapes and rank-dependent logic, no numbers.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist

from accel.context import Context, init, shutdown
from accel.errors import AccelError, RankFailedError, WorldTimeoutError
from accel.world import World

#: Variables of an enclosing launch, which must not leak into ranks that run_world starts.
LAUNCH_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RUN_ID",
    "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE", "ACCEL_LAUNCH_DIR",
    "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID",
)


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
    **init_kwargs: Any,
) -> list[Any]:
    """Run `fn(ctx, *args)` on `world_size` real processes joined by gloo; return each result.

    `fn` and its results must pickle (define `fn` at module level). `env` adds variables
    to every rank (e.g. ACCEL_DEBUG=1); `init_kwargs` go to `accel.init`. A rank that
    raises fails the whole world with its traceback; a world that does not finish within
    `timeout` seconds is killed and reported.

    >>> def rank_times_two(ctx):
    ...     return ctx.rank * 2
    >>> run_world(rank_times_two, world_size=2)
    [0, 2]
    """
    mp = multiprocessing.get_context("spawn")
    results: Any = mp.Queue()
    port = free_port()
    procs = [
        mp.Process(
            target=_rank_main,
            args=(fn, rank, world_size, port, args, dict(env or {}), init_kwargs, results),
            daemon=False,  # a daemon rank could not start DataLoader workers
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    try:
        return _collect(procs, results, timeout)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=10)
        results.close()


def _collect(procs: list[Any], results: Any, timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    outcome: dict[int, Any] = {}
    while len(outcome) < len(procs):
        try:
            status, rank, payload = results.get(timeout=0.2)
        except queue_module.Empty:
            _check_alive(procs, outcome, deadline, timeout)
            continue
        if status == "error":
            raise RankFailedError(f"rank {rank} of {len(procs)} failed:\n{payload}")
        outcome[rank] = pickle.loads(payload)
    return [outcome[rank] for rank in range(len(procs))]


def _check_alive(procs: list[Any], outcome: dict[int, Any], deadline: float, timeout: float):
    for rank, proc in enumerate(procs):
        if rank not in outcome and proc.exitcode not in (None, 0):
            raise RankFailedError(
                f"rank {rank} of {len(procs)} died with exit code {proc.exitcode} "
                "before returning (killed, or crashed in native code)"
            )
    if time.monotonic() > deadline:
        pending = [rank for rank in range(len(procs)) if rank not in outcome]
        raise WorldTimeoutError(
            f"ranks {pending} of {len(procs)} did not finish within {timeout:.0f} s "
            "(a collective that not every rank entered hangs); the world was killed"
        )


def _rank_main(fn, rank, world_size, port, args, env, init_kwargs, results) -> None:
    for name in LAUNCH_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    os.environ.update(env)
    torch.set_num_threads(1)  # two cores shared by every rank: oversubscription is slower
    try:
        ctx = init(**init_kwargs)
        try:
            result = fn(ctx, *args)
        finally:
            shutdown(ctx)
        # Plain pickle bytes: torch's queue pickler would share tensor memory through file
        # descriptors that die with this process before the parent reads them.
        results.put(("ok", rank, pickle.dumps(result)))
    except BaseException:  # noqa: B036 - any failure must reach the parent, not hang it
        results.put(("error", rank, traceback.format_exc()))


@contextlib.contextmanager
def fake_world(rank: int = 0, world_size: int = 2, *, local_world_size: int | None = None,
               device: str | torch.device = "cpu") -> Iterator[Context]:
    """Pretend to be `rank` of `world_size` in this one process (torch's fake process group).

    Collectives return at once with unchanged or zero data: use it for what a transform
    builds, records and rejects on every rank, not for numbers.

    >>> with fake_world(rank=3, world_size=8) as ctx:
    ...     assert not ctx.is_main_process
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise AccelError("fake_world() needs a process without a process group; one exists")
    local = local_world_size or world_size
    world = World(rank=rank, world_size=world_size, local_rank=rank % local,
                  local_world_size=local, node_rank=rank // local,
                  num_nodes=max(1, world_size // local), launcher="fake")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield Context(world=world, device=device, dist_backend="fake", owns_process_group=True)
    finally:
        dist.destroy_process_group()
