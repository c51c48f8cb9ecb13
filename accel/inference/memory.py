"""Device names, memory budgets and byte counts: parsing, reading free memory, formatting."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection, Mapping
from typing import Any

import torch

from accel.errors import InvalidArgumentError

#: A device as users write it in maps and budgets: 0, "cuda:1", "cpu", "disk", torch.device.
DeviceLike = int | str | torch.device

DISK = "disk"
CPU = "cpu"
# Part of the free memory a budget read from the machine takes: the rest is headroom for
# activations, the allocator's fragmentation and other processes.
FREE_MEMORY_FRACTION = 0.9

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclasses.dataclass(frozen=True)
class Budget:
    """How many bytes of weights one device may hold, and where that number came from."""

    device: str
    bytes: float  # math.inf for disk
    source: str


def device_name(device: DeviceLike) -> str:
    """The canonical name of a device in a device map: "cuda:0", "cpu", "disk", "mps"."""
    if isinstance(device, bool):
        raise InvalidArgumentError(f"a device cannot be a bool, got {device!r}")
    if isinstance(device, int):
        if device < 0:
            raise InvalidArgumentError(f"a GPU index must be >= 0, got {device!r}")
        return f"cuda:{device}"
    if isinstance(device, str) and device.strip().lower() == DISK:
        return DISK
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgumentError(
            f"unknown device {device!r}; use a GPU index (0), 'cuda:1', 'cpu' or 'disk'"
        ) from exc
    if parsed.type in ("cpu", "meta"):
        if parsed.type == "meta":
            raise InvalidArgumentError("'meta' is not a place to run weights; use a GPU, "
                                       "'cpu' or 'disk'")
        return CPU
    return f"{parsed.type}:{parsed.index or 0}"


def is_accelerator(device: str) -> bool:
    return device not in (CPU, DISK)


def parse_size(value: int | float | str) -> int:
    """Bytes from an int or a string with a unit: "10GiB", "500MB", "1.5 GB".

    >>> parse_size("2GiB")
    2147483648
    """
    if isinstance(value, bool):
        raise InvalidArgumentError(f"a memory size cannot be a bool, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).upper() if match else ""
        if not match or unit not in _UNITS:
            raise InvalidArgumentError(
                f"cannot read the memory size {value!r}; write bytes as an int or a number "
                "with a unit: '10GiB', '500MB'"
            )
        number = float(match.group(1)) * _UNITS[unit]
    if number < 0 or math.isnan(number):
        raise InvalidArgumentError(f"a memory size must be >= 0, got {value!r}")
    return int(number)


def format_size(size: float) -> str:
    """A byte count for people: "1.50 GiB", "12.0 MiB", "512 B"."""
    if math.isinf(size):
        return "unlimited"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{int(size)} B"


def memory_budgets(max_memory: Mapping[DeviceLike, Any] | None,
                   accelerators: Collection[str] | None = None, processes_per_node: int = 1
                   ) -> list[Budget]:
    """The budgets a device map fills, in order: accelerators by index, then cpu, then disk.

    Args:
        max_memory: bytes per device; devices not named are not used (disk always is).
            None: 90% of the free memory of every GPU and of the available RAM.
        accelerators: the accelerators that may be used (each rank its own GPU, a CPU
            rank none); None: all.
        processes_per_node: RAM is shared by this many processes, each gets its part.
    """
    if max_memory is None:
        budgets = _free_memory_budgets(processes_per_node)
    else:
        try:
            budgets = [Budget(device_name(d), parse_size(v), "max_memory")
                       for d, v in max_memory.items() if device_name(d) != DISK]
        except InvalidArgumentError as exc:  # say which argument held the bad entry
            raise InvalidArgumentError(f"max_memory: {exc}") from None
    if accelerators is not None:
        budgets = [b for b in budgets if not is_accelerator(b.device)
                   or b.device in accelerators]
    names = [b.device for b in budgets]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"max_memory names a device twice: {names}")
    budgets.sort(key=_device_order)
    return [*budgets, Budget(DISK, math.inf, "disk is the last resort")]


def _device_order(budget: Budget) -> tuple[int, str, int]:
    if budget.device == CPU:
        return (1, "", 0)
    kind, _, index = budget.device.partition(":")
    return (0, kind, int(index or 0))


def _free_memory_budgets(processes_per_node: int) -> list[Budget]:
    budgets = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, _ = torch.cuda.mem_get_info(index)
            budgets.append(Budget(f"cuda:{index}", int(free * FREE_MEMORY_FRACTION),
                                  "90% of its free memory"))
    share = "" if processes_per_node == 1 else f", shared by {processes_per_node} processes"
    ram = available_ram() * FREE_MEMORY_FRACTION / processes_per_node
    budgets.append(Budget(CPU, int(ram), f"90% of the available RAM{share}"))
    return budgets


def available_ram() -> int:
    """Bytes of RAM the kernel could give without swapping (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
