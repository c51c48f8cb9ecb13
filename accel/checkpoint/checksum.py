"""Checksums of checkpoint files: XXH3-64 per 64 MiB segment, as written and as read.

A record is ``{"bytes": size, ALGORITHM: value}``; the key names the algorithm, so a
checkpoint of an older accel (``"crc32"``: zlib's CRC32 of the whole file) still
verifies. accel records ``"xxh3_64_per_64MiB"``: the XXH3-64 digest of each 64 MiB
segment of the file, in order. XXH3 (the `xxhash` package, BSD licensed, a dependency
of accel) runs at memory speed and releases the GIL; the segments let a load verify a
large file on several cores at once (`digest_of`), each segment read in whole first. Both
catch truncation and corruption; neither resists tampering. Without xxhash installed,
saves fall back to CRC32, and an XXH3 record loads only with verify=False.
"""

from __future__ import annotations

import concurrent.futures
import os
import zlib
from collections.abc import Callable, Mapping
from typing import Any

from accel.errors import UnsupportedError

try:
    import xxhash
except ImportError:  # pragma: no cover - a dependency of accel; only a broken install lacks it
    xxhash = None

SEGMENT = 64 << 20
XXH3, CRC32 = "xxh3_64_per_64MiB", "crc32"
#: the algorithm this accel records for the files it writes.
ALGORITHM = XXH3 if xxhash is not None else CRC32
#: what each algorithm is called in messages.
NAMES = {XXH3: "XXH3-64", CRC32: "CRC32"}
#: asks the kernel to start reading bytes [start, start + length) of what is hashed.
ReadAhead = Callable[[int, int], None]


class Hasher:
    """A running checksum of the bytes given to `update`, by `algorithm`.

    >>> hasher = Hasher()
    >>> hasher.update(b"abc")
    >>> hasher.value()
    ['78af5f94892f3950']
    """

    def __init__(self, algorithm: str = ALGORITHM):
        self.algorithm = _known(algorithm)
        self._crc = 0
        self._digests: list[str] = []
        self._segment = xxhash.xxh3_64() if algorithm == XXH3 else None
        self._filled = 0

    def update(self, data: Any) -> None:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if self._segment is None:
            self._crc = zlib.crc32(view, self._crc)
            return
        while view.nbytes:  # each segment's digest apart, wherever the writes split
            take = min(SEGMENT - self._filled, view.nbytes)
            self._segment.update(view[:take])
            self._filled, view = self._filled + take, view[take:]
            if self._filled == SEGMENT:
                self._digests.append(self._segment.hexdigest())
                self._segment, self._filled = xxhash.xxh3_64(), 0

    def value(self) -> Any:
        if self._segment is None:
            return f"{self._crc:08x}"
        return self._digests + ([self._segment.hexdigest()] if self._filled else [])


def _known(algorithm: str) -> str:
    if algorithm == XXH3 and xxhash is None:
        raise UnsupportedError(
            "this checkpoint's files are recorded with XXH3-64 checksums and the xxhash "
            "package is not installed: pip install xxhash (a dependency of accel), or "
            "load with verify=False")
    if algorithm not in NAMES:
        raise UnsupportedError(
            f"unknown checksum algorithm {algorithm!r}: the checkpoint comes from a newer "
            "accel; upgrade accel")
    return algorithm


def make_record(size: int, hasher: Hasher) -> dict[str, Any]:
    return {"bytes": size, hasher.algorithm: hasher.value()}


def digest_of(data: Any, algorithm: str, read_ahead: ReadAhead | None = None) -> Any:
    """The checksum value of all of `data` (a mapping: the kernel reads it ahead).

    XXH3 segments are hashed on several threads, each bringing its segment in first
    (`read_ahead`); CRC32, one running value, in one pass, segment after segment.
    """
    size = len(data)
    if _known(algorithm) == CRC32:
        hasher = Hasher(CRC32)
        for start in range(0, size, SEGMENT):
            if read_ahead is not None:
                read_ahead(start, SEGMENT)
            hasher.update(memoryview(data)[start:start + SEGMENT])
        return hasher.value()
    starts = range(0, size, SEGMENT)
    workers = _workers()

    def segment(start: int) -> str:
        if read_ahead is not None:  # each worker brings its segment in, in parallel
            read_ahead(start, SEGMENT)
        with memoryview(data) as view:
            return xxhash.xxh3_64_hexdigest(view[start:start + SEGMENT])

    if len(starts) <= 1:
        return [segment(start) for start in starts]
    # threads of this call only: nothing outlives the load (a few per file: microseconds)
    with concurrent.futures.ThreadPoolExecutor(min(workers, len(starts)),
                                               thread_name_prefix="accel-verify") as pool:
        return list(pool.map(segment, starts))


def mismatch(record: Mapping[str, Any], data: Any, read_ahead: ReadAhead | None = None
             ) -> str | None:
    """The name of the first checksum of `record` that `data` does not have (None: all
    match; a record edited to hold several is checked for each)."""
    for algorithm in [name for name in record if name != "bytes"] or [ALGORITHM]:
        if digest_of(data, algorithm, read_ahead) != record.get(algorithm):
            return NAMES[algorithm]
    return None


def _workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cores or 1))
