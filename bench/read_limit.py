"""Cap the read speed of the disk under a folder for the processes a benchmark starts.

A virtual machine's "evicted" reads are often served from the host's page cache, at
memory speed (3.8 GB/s here), faster than the SSDs and network disks checkpoints
usually live on. `read_limited(folder, gb_per_s)` puts the processes it is handed into
a control group whose reads of that disk are throttled by the kernel's block layer
(cgroup v2 `io.max`, or v1 `blkio.throttle.read_bps_device`), so a run can also be
measured at a real disk's speed. Needs root; buffered and memory-mapped reads are
throttled alike, writes are not.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def disk_of(folder: Path) -> str:
    """The "major:minor" of the whole disk holding `folder` (throttling takes disks, not
    partitions)."""
    device = os.stat(folder).st_dev
    node = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    if (node / "partition").exists():
        node = node.resolve().parent
    return (node / "dev").read_text().strip()


@contextlib.contextmanager
def read_limited(folder: Path, gb_per_s: float) -> Iterator[Callable[[], None]]:
    """A `preexec_fn` that moves a starting process into a group whose reads of `folder`'s
    disk are capped at `gb_per_s` (10^9 bytes per second); the group is removed after."""
    disk, rate = disk_of(folder), int(gb_per_s * 1e9)
    if (ROOT / "cgroup.controllers").exists():  # v2: one hierarchy
        group = ROOT / "accel-bench-read-limit"
        group.mkdir(exist_ok=True)
        (ROOT / "cgroup.subtree_control").write_text("+io")
        (group / "io.max").write_text(f"{disk} rbps={rate}")
    else:
        group = ROOT / "blkio" / "accel-bench-read-limit"
        group.mkdir(exist_ok=True)
        (group / "blkio.throttle.read_bps_device").write_text(f"{disk} {rate}")

    def enter() -> None:
        (group / "cgroup.procs").write_text(str(os.getpid()))

    try:
        yield enter
    finally:
        with contextlib.suppress(OSError):  # a process still inside keeps it: harmless
            group.rmdir()
