"""Worlds of local processes started from Python, without a launcher.

Shared by `accel.testing.run_world` (spawned processes, for tests) and
`accel.notebook_launch` (forked processes, for notebooks): the variables each rank gets
in place of torchrun's, and the parent's side that collects each rank's result or
reports the first rank that failed, died or hung.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

from accel.errors import RankFailedError, WorldTimeoutError

#: Variables of an enclosing launch, which must not leak into the ranks started here.
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


def become_rank(rank: int, world_size: int, port: int, threads: int) -> None:
    """In a started process: torchrun's variables for `rank` of a one-machine world."""
    for name in LAUNCH_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads),
    )


#: how long rank 0 keeps serving the process group's store after its own work ended, for
#: the other ranks to end theirs (they need it for milliseconds; a rank stuck longer must
#: not keep rank 0, whose exit ends the peer's collective, waiting).
STORE_GRACE = 5.0


def report_outcome(results: Any, rank: int, size: int, work: Callable[[], Any],
                   finished: Any) -> None:
    """Run `work` and put its result, or the traceback that ended it, on `results`.

    Rank 0 serves the process group's store (no launcher's agent does here): a rank 0
    that exited as soon as it left `shutdown`'s barrier would take the store away from
    ranks still tidying their keys of that barrier. So every other rank releases
    `finished` (a multiprocessing Semaphore) when its work has ended, and rank 0 waits
    for them, at most STORE_GRACE seconds.
    """
    try:
        # Plain pickle bytes: torch's queue pickler would share tensor memory through file
        # descriptors that die with this process before the parent reads them.
        results.put(("ok", rank, pickle.dumps(work())))
    except BaseException:  # noqa: B036 - any failure must reach the parent, not hang it
        results.put(("error", rank, traceback.format_exc()))
    if rank != 0:
        finished.release()
        return
    deadline = time.monotonic() + STORE_GRACE
    for _ in range(size - 1):
        if not finished.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return


def collect(procs: list[Any], results: Any, timeout: float | None) -> list[Any]:
    """Each rank's result, in rank order; the first failure raises.

    Raises:
        RankFailedError: a rank raised (its traceback is in the message) or died.
        WorldTimeoutError: not every rank finished within `timeout` seconds.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
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


def _check_alive(procs: list[Any], outcome: dict[int, Any], deadline: float | None,
                 timeout: float | None) -> None:
    for rank, proc in enumerate(procs):
        if rank not in outcome and proc.exitcode not in (None, 0):
            raise RankFailedError(
                f"rank {rank} of {len(procs)} died with exit code {proc.exitcode} "
                "before returning (killed, or crashed in native code)"
            )
    if deadline is not None and time.monotonic() > deadline:
        pending = [rank for rank in range(len(procs)) if rank not in outcome]
        raise WorldTimeoutError(
            f"ranks {pending} of {len(procs)} did not finish within {timeout:.0f} s "
            "(a collective that not every rank entered hangs); the world was killed"
        )


def stop(procs: list[Any], results: Any) -> None:
    """End every rank still running (the others wait in a collective for a failed one)."""
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=10)
    results.close()
