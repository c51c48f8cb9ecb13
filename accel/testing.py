"""Test your own distributed code the way accel tests itself.

- `run_world(fn, world_size=2)`: N real gloo processes, each running `fn(ctx, *args)`.
- `fake_world(rank, world_size)`: one process that believes it is rank `rank` of
  `world_size` (torch's fake process group): shapes and rank-dependent logic, no numbers.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist

from accel.context import Context, init, shutdown
from accel.errors import AccelError
from accel.runtime.local_world import (  # noqa: F401 - LAUNCH_VARIABLES, free_port: public here
    LAUNCH_VARIABLES,
    become_rank,
    collect,
    free_port,
    report_outcome,
    stop,
)
from accel.world import World


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
    port, finished = free_port(), mp.Semaphore(0)
    procs = [
        mp.Process(
            target=_rank_main,
            args=(fn, rank, world_size, port, args, dict(env or {}), init_kwargs, results,
                  finished),
            daemon=False,  # a daemon rank could not start DataLoader workers
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    try:
        return collect(procs, results, timeout)
    finally:
        stop(procs, results)


def _rank_main(fn, rank, world_size, port, args, env, init_kwargs, results, finished) -> None:
    become_rank(rank, world_size, port, threads=1)
    os.environ.update(env)
    torch.set_num_threads(1)  # two cores shared by every rank: oversubscription is slower
    report_outcome(results, rank, world_size, lambda: _in_world(fn, args, init_kwargs),
                   finished)


def _in_world(fn: Callable[..., Any], args: tuple, init_kwargs: dict[str, Any]) -> Any:
    ctx = init(**init_kwargs)
    try:
        return fn(ctx, *args)
    finally:
        shutdown(ctx)


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
