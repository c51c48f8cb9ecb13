"""`notebook_launch`: run a function from a notebook cell on N local processes.

A function defined in a cell lives in `__main__`, which no other process can import, so
`run_world` (spawned processes) and `accel launch` (a script) cannot run it. Forked
processes inherit it: each becomes one rank of a one-machine world (torchrun's
variables set), calls `fn(*args)`, which calls `accel.init()` as a script would, and
sends its result back. Forking is unsafe once CUDA is initialised in the parent (the
children would inherit a CUDA context they cannot use), so that is refused up front.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from accel.errors import LaunchEnvironmentError, UnsupportedError
from accel.runtime.local_world import become_rank, collect, free_port, report_outcome, stop
from accel.validation import check_callable, check_int, check_timeout, check_type


def notebook_launch(fn: Callable[..., Any], args: Sequence[Any] = (),
                    num_processes: int | None = None, *,
                    timeout: float | datetime.timedelta | None = None) -> list[Any]:
    """Run `fn(*args)` on `num_processes` local processes; return each rank's result.

    `fn` may be defined in the notebook itself; it starts the world with `accel.init()`
    (and ends it with `accel.shutdown(ctx)`), exactly as a script under `accel launch`.
    Results must pickle. Processes are forked from the kernel, so call it before any
    cell touches the GPU; where the platform cannot fork, `fn` must be importable.

    Args:
        num_processes: default one per GPU when CUDA is available, else 1.
        timeout: seconds before a world that has not finished is killed (default: none).

    Raises:
        RankFailedError: a rank raised (the message names it, with its traceback) or died;
            the other ranks are ended.
        LaunchEnvironmentError: CUDA is already initialised in this process, or a
            process group already exists in it.
        WorldTimeoutError: the world did not finish within `timeout`.

    >>> def train(lr):
    ...     ctx = accel.init()
    ...     ...                                   # the training loop
    ...     accel.shutdown(ctx)
    ...     return final_loss
    >>> losses = accel.notebook_launch(train, args=(1e-3,), num_processes=2)
    """
    check_callable("notebook_launch", "fn", fn, "a function (defined in the notebook is fine)")
    check_type("notebook_launch", "args", args, (list, tuple),
               "a tuple of the function's arguments, e.g. args=(1e-3,)")
    check_int("notebook_launch", "num_processes", num_processes, minimum=1, optional=True)
    check_timeout("notebook_launch", "timeout", timeout, optional=True)
    method = _start_method(fn)
    size = num_processes or _default_num_processes()
    mp = multiprocessing.get_context(method)
    results: Any = mp.Queue()
    port, threads = free_port(), max(1, (os.cpu_count() or 1) // size)
    finished = mp.Semaphore(0)
    procs = [mp.Process(target=_rank_main, args=(fn, tuple(args), rank, size, port, threads,
                                                 results, finished))
             for rank in range(size)]
    for proc in procs:
        proc.start()
    try:
        return collect(procs, results, _seconds(timeout))
    finally:
        stop(procs, results)


def _seconds(timeout: float | datetime.timedelta | None) -> float | None:
    return timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else timeout


def _start_method(fn: Callable[..., Any]) -> str:
    """fork when the platform has it and it is safe; else spawn, for importable functions."""
    if "fork" not in multiprocessing.get_all_start_methods():
        if getattr(fn, "__module__", None) == "__main__":
            raise UnsupportedError(
                "this platform cannot fork processes, and a function defined in the "
                f"notebook ({getattr(fn, '__name__', fn)!r}) cannot be imported by a new "
                "one: move it to a .py file next to the notebook and import it from there"
            )
        return "spawn"
    torch = sys.modules.get("torch")  # not imported: nothing of CUDA can have started
    if torch is not None and torch.cuda.is_initialized():
        raise LaunchEnvironmentError(
            "CUDA is already initialised in this process (a cell used the GPU: a tensor "
            "or model moved to cuda, torch.cuda.* queried), and forked processes cannot "
            "use it: restart the kernel and call notebook_launch before any cell touches "
            "the GPU (build the model inside the launched function)"
        )
    if torch is not None and torch.distributed.is_available() \
            and torch.distributed.is_initialized():
        raise LaunchEnvironmentError(
            "a process group already exists in this process (accel.init() or "
            "init_process_group ran in a cell); the launched processes start their own: "
            "call accel.shutdown(ctx) (or restart the kernel) first"
        )
    return "fork"


def _default_num_processes() -> int:
    torch = sys.modules.get("torch")
    if torch is None:
        import torch
    # device_count() asks the driver without initialising CUDA in this process.
    return torch.cuda.device_count() or 1


def _rank_main(fn: Callable[..., Any], args: tuple, rank: int, size: int, port: int,
               threads: int, results: Any, finished: Any) -> None:
    become_rank(rank, size, port, threads)
    torch = sys.modules.get("torch")
    if torch is not None:  # the forked interpreter keeps the kernel's thread count
        torch.set_num_threads(threads)
    report_outcome(results, rank, size, lambda: _run(fn, args), finished)


def _run(fn: Callable[..., Any], args: tuple) -> Any:
    try:
        return fn(*args)
    finally:
        # A function that returns without accel.shutdown leaves its group: release it here
        # (a forked process exits without running atexit handlers).
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
