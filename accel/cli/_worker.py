"""What each process of `accel launch` runs: the user's script, then a check that it joined.

Usage (by `accel launch`, through torchrun): `python -m accel.cli._worker SCRIPT ARGS...`
or `python -m accel.cli._worker -m MODULE ARGS...`. The target runs with `__main__`
semantics, as `python SCRIPT` / `python -m MODULE` would run it. A rank of a world larger
than one that returns without having joined a process group exits with
`NOT_CONNECTED_EXIT_CODE`: N unconnected copies of a training script are N independent
runs, which is never what a launch of N processes means.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

NOT_CONNECTED_EXIT_CODE = 3


def main(argv: list[str]) -> int:
    """Run the target named by `argv`, then fail if this rank never joined the others."""
    if not argv or (argv[0] == "-m" and len(argv) < 2):
        print("usage: python -m accel.cli._worker (SCRIPT | -m MODULE) [ARGS...]",
              file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    launch_dir = os.environ.get("ACCEL_LAUNCH_DIR")
    if launch_dir:
        # An elastic restart reuses the directory: only this attempt's join counts.
        Path(launch_dir, f"joined-{rank}").unlink(missing_ok=True)
    _run_target(argv)
    if world_size > 1 and not has_joined(rank, world_size, launch_dir):
        others = f"{world_size - 1} rank{'s' if world_size > 2 else ''}"
        print(
            f"accel launch: rank {rank} ran without joining the other {others}: the script "
            "never called accel.init() (or torch.distributed.init_process_group), so "
            f"{world_size} independent copies ran; "
            "call accel.init() at the start, or pass --allow-unconnected",
            file=sys.stderr,
        )
        return NOT_CONNECTED_EXIT_CODE
    return 0


def _run_target(argv: list[str]) -> None:
    """Run a script or module as `__main__`; a SystemExit other than success propagates."""
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]  # run_module replaces argv[0] by the file
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            script = argv[0]
            sys.argv = list(argv)
            # `python SCRIPT` puts the script's folder first on sys.path, not the cwd.
            sys.path[0] = os.path.dirname(os.path.abspath(script))
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            raise


def has_joined(rank: int, world_size: int, launch_dir: str | None) -> bool:
    """Whether this process took part in a process group of `world_size` ranks.

    `accel.init()` and `Context.from_process_group()` leave a mark in `launch_dir`; a
    script that uses torch.distributed directly shows a live group of the right size, or,
    when it destroyed the group before returning, the backend torch remembers having used.
    """
    if launch_dir and Path(launch_dir, f"joined-{rank}").exists():
        return True
    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() == world_size
    # torch keeps the default group's backend name after destroy_process_group(), and
    # has no public record of a destroyed group; without it the common
    # init ... destroy_process_group() script would be reported as unconnected.
    from torch.distributed import distributed_c10d

    return getattr(distributed_c10d, "_backend", None) is not None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
