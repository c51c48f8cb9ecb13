"""How fast can a verified load of an evicted file be, here? Six ways to read 1 GiB.

`checkpoint.py` compares accel's verified load with the disk's own dd-like read. This
bench takes the load apart on one raw 1 GiB file (evicted from the page cache before each
read with posix_fadvise(DONTNEED)), one process, one torch thread:

- `dd`: `readinto` a preallocated buffer in 64 MiB pieces (the kernel copies each piece
  out of the page cache while it reads the next ahead).
- `verify_then_copy`: what `accel.load_state` does: the file mapped, 2 threads each
  populate a 64 MiB segment (MADV_POPULATE_READ) and hash it (XXH3), then one copy
  into the target; nothing is written before every byte is verified.
- `overlapped_copy`: one thread populates segments in order, the other hashes each and
  copies it into the target at once: not transactional (a bad segment found late leaves
  the target half written); shows what overlapping the copy with the read would gain.
- `verify_only`: the same without any copy: the floor of a mapped, verified read.
- `readinto_hash`: `readinto` the target itself and hash each piece: a verified dd,
  not transactional either.
- `readinto_fresh`: `readinto` newly allocated memory and hash each piece; the model's
  tensors would then be swapped for the new ones (no copy): transactional, at the cost
  of a second model's memory until the swap, and of the kernel's first touch of it.

    python bench/load_floor.py              # 7 rounds, ~1 minute
    python bench/load_floor.py --rounds 3
"""

from __future__ import annotations

import argparse
import concurrent.futures
import mmap
import os
import queue
import statistics
import threading
import time
from pathlib import Path

import torch
import xxhash

SIZE, PIECE, POPULATE = 1 << 30, 64 << 20, getattr(mmap, "MADV_POPULATE_READ", 22)


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def mapped(path: Path) -> mmap.mmap:
    with open(path, "rb") as file:
        return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)


def dd(path: Path, target: torch.Tensor) -> None:
    view = memoryview(target.numpy())
    with open(path, "rb", buffering=0) as file:
        for start in range(0, SIZE, PIECE):
            file.readinto(view[start:start + PIECE])


def verify_then_copy(path: Path, target: torch.Tensor) -> None:
    data = mapped(path)

    def segment(start: int) -> str:
        data.madvise(POPULATE, start, PIECE)
        with memoryview(data) as view:
            return xxhash.xxh3_64_hexdigest(view[start:start + PIECE])

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(segment, range(0, SIZE, PIECE)))
    with memoryview(data) as view:
        target.copy_(torch.frombuffer(view, dtype=torch.uint8))


def pipelined(path: Path, target: torch.Tensor | None) -> None:
    data, ready = mapped(path), queue.Queue()

    def read() -> None:
        for start in range(0, SIZE, PIECE):
            data.madvise(POPULATE, start, PIECE)
            ready.put(start)
        ready.put(None)

    reader = threading.Thread(target=read)
    reader.start()
    with memoryview(data) as view:
        while (start := ready.get()) is not None:
            xxhash.xxh3_64_hexdigest(view[start:start + PIECE])
            if target is not None:
                target[start:start + PIECE].copy_(
                    torch.frombuffer(view[start:start + PIECE], dtype=torch.uint8))
    reader.join()


def readinto_hash(path: Path, target: torch.Tensor) -> None:
    view = memoryview(target.numpy())
    with open(path, "rb", buffering=0) as file:
        for start in range(0, SIZE, PIECE):
            file.readinto(view[start:start + PIECE])
            xxhash.xxh3_64_hexdigest(view[start:start + PIECE])


def readinto_fresh(path: Path, target: torch.Tensor) -> None:
    readinto_hash(path, torch.empty_like(target))


WAYS = {"dd": dd, "verify_then_copy": verify_then_copy,
        "overlapped_copy": pipelined, "verify_only": lambda p, t: pipelined(p, None),
        "readinto_hash": readinto_hash, "readinto_fresh": readinto_fresh}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--file", type=Path, default=Path("/tmp/accel-bench-load-floor.bin"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.file.exists() or args.file.stat().st_size != SIZE:
        with open(args.file, "wb") as file:
            block = os.urandom(1 << 20)
            for _ in range(SIZE >> 20):
                file.write(block)
            os.fsync(file.fileno())
    target = torch.ones(SIZE, dtype=torch.uint8)  # allocated and touched, as a model is
    times: dict[str, list[float]] = {name: [] for name in WAYS}
    for _ in range(args.rounds):
        for name, way in WAYS.items():
            evict(args.file)
            start = time.perf_counter()
            way(args.file, target)
            times[name].append(time.perf_counter() - start)
    floor = statistics.median(times["dd"])
    print(f"1 GiB, {args.rounds} rounds, median seconds (speed / dd's); load average "
          f"{os.getloadavg()[0]:.1f}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<17} {median:6.3f} s  {floor / median:5.2f}x   "
              + " ".join(f"{v:.3f}" for v in values))


if __name__ == "__main__":
    main()
