"""Durable files of a checkpoint: fsynced writes checksummed as they go, verified reads.

Each process fsyncs what it writes; the directory entries are fsynced before a folder is
renamed into place, so a crash never leaves a name pointing at data that is not on disk.
A file's size and checksum (XXH3-64, see `accel.checkpoint.checksum`) are computed over
the bytes as they are written (`ChecksummedWriter`) and checked over the bytes that are
then loaded (`read_verified`): the disk is read once, in large sequential pieces, and
no file is read a second time just for its checksum. File names read from a checkpoint
(an index, accel.json) are checked to stay inside its folder (`inside`).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

# Defined in accel.errors; imported from here by the rest of the package.
from accel.checkpoint.checksum import ALGORITHM, CRC32, Hasher, digest_of, make_record, mismatch
from accel.errors import (
    AccelError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    UntrustedCheckpointError,
)

__all__ = ["CheckpointNotFoundError", "CorruptCheckpointError"]

#: marks a temporary directory (a save in progress, or a replaced one being deleted).
TMP_MARK = ".tmp-"
#: a checkpoint's metadata file, written last: the list of its files, sizes and checksums.
METADATA = "accel.json"
#: what a checksum record holds: {"bytes": int, ALGORITHM: "hex digits"} (see checksum.py).
Record = dict[str, Any]


class ChecksummedWriter:
    """A file opened for writing that counts and checksums every byte written; fsynced on close.

    >>> with ChecksummedWriter(path) as out:
    ...     out.write(b"...")
    >>> out.record()
    {'bytes': 3, 'xxh3_64': '...'}
    """

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in __exit__
        self._size = 0
        self._hasher = Hasher(ALGORITHM)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        written = 0
        while written < view.nbytes:  # an unbuffered write may take only part of it
            written += self._file.write(view[written:])
        self._hasher.update(view)
        self._size += view.nbytes

    def record(self) -> Record:
        return make_record(self._size, self._hasher)

    def __enter__(self) -> ChecksummedWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        try:
            if kind is None:
                self._file.flush()
                os.fsync(self._file.fileno())
        finally:
            self._file.close()


def write_bytes(path: Path, data: bytes) -> Record:
    """Write `data` to `path`, fsynced; return its size and checksum."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with ChecksummedWriter(path) as out:
        out.write(data)
    return out.record()


def write_json(path: Path, value: Any) -> Record:
    """Write `value` as JSON, fsynced; return its size and checksum."""
    return write_bytes(path, json.dumps(value, indent=1, allow_nan=True).encode())


def read_json(path: Path, record: Mapping[str, Any] | None = None) -> Any:
    """Read a JSON file, verified against `record` when one is given."""
    data = read_verified(path, record)[:]
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(
            f"the checkpoint file {path} is not valid JSON ({exc}): it is truncated or "
            "corrupted; load an earlier checkpoint") from None


def read_verified(path: Path, record: Mapping[str, Any] | None = None) -> mmap.mmap | bytes:
    """The file's bytes, memory-mapped, its size and checksum checked against `record`.

    The checksum pass is the read: it brings the file into memory once, in large
    sequential pieces read ahead of the hashing, and what is loaded afterwards are those
    very bytes (views of the copy-on-write mapping, no copy). A checkpoint is never
    written again once committed, so the bytes cannot change between the check and use.

    Raises:
        CorruptCheckpointError: the file is missing, has another size (truncated) or
            another checksum (corrupted); the message names it.
    """
    try:
        with open(path, "rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            if record is not None:
                _check_size(path, size, record)
            # mmap cannot map an empty file; a mapping avoids faulting in a fresh buffer,
            # which costs more than the read itself.
            data = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
    except FileNotFoundError:
        raise CorruptCheckpointError(f"the checkpoint file {path} is missing") from None
    if record is not None:
        failed = mismatch(record, data, read_ahead(data) if size else None)
        if failed:
            raise _checksum_mismatch(path, failed)
    return data


#: Linux 5.14's MADV_POPULATE_READ (22; Python 3.11's mmap module does not name it):
#: read a range of the file in large requests and map it, at once. None once a kernel
#: has refused it.
_POPULATE = {"advice": getattr(mmap, "MADV_POPULATE_READ",
                               22 if sys.platform == "linux" else None)}


def read_ahead(data: mmap.mmap) -> Callable[[int, int], None]:
    """Bring a range of the mapping in before it is used: populated (the disk read in
    large requests and every page mapped, so no fault per page follows: measured 1.8x
    faster than faulting evicted pages in, 2.6x warm), else the kernel asked to read it
    and the range after it ahead (WILLNEED). Any range: its start is rounded down to a
    page, as madvise needs."""
    def read_ahead(start: int, length: int) -> None:
        aligned = start - start % mmap.PAGESIZE
        start, length = aligned, min(length + start - aligned, len(data) - aligned)
        if length <= 0 or not hasattr(data, "madvise"):  # Python 3.8+ on Unix
            return
        advice = _POPULATE["advice"]
        if advice is not None:
            try:
                data.madvise(advice, start, length)
                return
            except OSError:  # EINVAL: a kernel before 5.14
                _POPULATE["advice"] = None
        data.madvise(mmap.MADV_WILLNEED, start, min(2 * length, len(data) - start))
    return read_ahead


def file_record(path: Path, algorithm: str = ALGORITHM) -> Record:
    """Size and checksum of a file someone else wrote (read through a mapping, no copy)."""
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        if not size:
            return make_record(0, Hasher(algorithm))
        with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return {"bytes": size, algorithm: digest_of(data, algorithm, read_ahead(data))}


def crc32(path: Path) -> str:
    """A file's CRC32, as checkpoints of accel before XXH3 recorded it."""
    return file_record(path, CRC32)[CRC32]


def fsync_path(path: Path) -> None:
    """fsync a file's data, or a directory's entries (new names, renames)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_dirs(root: Path) -> None:
    """fsync every directory under (and including) `root`, deepest first."""
    for directory, _, _ in sorted(os.walk(root), key=lambda entry: -len(entry[0])):
        fsync_path(Path(directory))


def tmp_path(final: Path) -> Path:
    """A fresh temporary name next to `final`, which checkpoint readers ignore."""
    return final.with_name(f"{final.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def replacing(final: Path) -> Iterator[Path]:
    """A temporary name next to `final` to write (and fsync) a file under; renamed onto
    `final` if the block succeeds, removed if it fails.

    Readers of `final` see the old file or the new one, whole, never a partial write.
    """
    tmp = tmp_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
        fsync_path(final.parent)  # the rename is durable before whatever is written next
    finally:
        tmp.unlink(missing_ok=True)


def output_folder(target: Path) -> Path:
    """`target`, created if absent, for files to be written into it.

    Raises:
        InvalidArgumentError: `target`, or a folder above it, is a file.
    """
    try:
        target.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InvalidArgumentError(
            f"{target} is not a folder and cannot be made one: it, or a folder above it, is "
            "a file; choose another path") from None
    return target


def inside(root: Path, name: Any, source: Path) -> Path:
    """`root / name` for a file name read from `source` (an index, accel.json), checked.

    Such a file comes with the folder; it must not make a loader read anything outside
    it. Symlinks are resolved, except that a Hugging Face cache snapshot's files may
    point into its repository's ``blobs`` folder (the cache is laid out that way).

    Raises:
        UntrustedCheckpointError: `name` is absolute, climbs out with ``..``, goes
            through a symlink that leads elsewhere, or is not a path at all.
    """
    real = _real(root, name)
    if real is not None and any(real != folder and real.is_relative_to(folder)
                                for folder in _roots(root)):
        return root / name
    raise UntrustedCheckpointError(
        f"{source} names the file {name!r}, which is not inside {root}: refusing to read it. "
        "A weights index or accel.json may only name files in its own folder; this one was "
        "edited by hand or comes from someone you should not trust")


def index_files(root: Path, weight_map: Mapping[str, Any], source: Path) -> dict[str, Path]:
    """{tensor name: file} of the `weight_map` of an index (`source`) in `root`.

    Raises:
        UntrustedCheckpointError: a file is not inside `root` (see `inside`).
    """
    checked: dict[str, Path] = {}
    for file in weight_map.values():
        if not isinstance(file, str) or file not in checked:  # each file resolved once
            checked[file] = inside(root, file, source)
    return {name: checked[file] for name, file in weight_map.items()}


def _real(root: Path, name: Any) -> Path | None:
    """`root / name` with its symlinks resolved; None if `name` is no file name at all."""
    if not isinstance(name, str) or not name or "\0" in name:
        return None
    try:
        return (root / name).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return None


def _roots(root: Path) -> list[Path]:
    """The folders the files of `root` may resolve into: itself, and, in a Hugging Face
    cache (``models--org--name/snapshots/REV/``), that repository's ``blobs``."""
    real = root.resolve()
    return [real, *(folder.parent.parent / "blobs" for folder in (real, *real.parents)
                    if folder.parent.name == "snapshots" and folder.parent.parent.name
                    .startswith(("models--", "datasets--", "spaces--")))]


def all_files(root: Path) -> list[str]:
    """Every file under `root`, as sorted paths relative to it."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


def describe(root: Path, names: Iterable[str]) -> dict[str, Record]:
    """{name: record} of files under `root` written by someone else (DCP)."""
    return {name: file_record(root / name) for name in names}


def check_sizes(root: Path, records: Mapping[str, Mapping[str, Any]]) -> None:
    """Every recorded file is there with its recorded size (a stat each, nothing read).

    Raises:
        CorruptCheckpointError: naming the first file missing or of another size.
    """
    for name, record in sorted(records.items()):
        path = inside(root, name, root / METADATA)
        if not path.is_file():
            raise CorruptCheckpointError(f"the checkpoint file {path} is missing")
        _check_size(path, path.stat().st_size, record)


def is_complete(path: Path) -> bool:
    """Whether `path` holds a finished checkpoint: every file its accel.json lists is
    there with its recorded size (a stat each; the checksums are checked on load)."""
    try:
        check_sizes(path, json.loads((path / METADATA).read_bytes())["files"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, AccelError):
        return False
    return True


def verify(root: Path, records: Mapping[str, Mapping[str, Any]], names: Iterable[str]) -> None:
    """Check size, then checksum, of each named file against what the checkpoint recorded.

    For files read piecewise by others (torch.distributed.checkpoint); files read whole
    are checked while they are read (`read_verified`).

    Raises:
        CorruptCheckpointError: naming the first file that is missing, has another size
            (truncated) or another checksum (corrupted).
    """
    for name in names:
        path = inside(root, name, root / METADATA)
        record = records.get(name)
        if record is None:
            raise CorruptCheckpointError(
                f"{path} is not listed in {root / METADATA}: the checkpoint is mixed up")
        if not path.is_file():
            raise CorruptCheckpointError(f"the checkpoint file {path} is missing")
        data = read_verified(path, record)
        if isinstance(data, mmap.mmap):
            data.close()


def _check_size(path: Path, size: int, record: Mapping[str, Any]) -> None:
    if size != record["bytes"]:
        raise CorruptCheckpointError(
            f"the checkpoint file {path} has {size} bytes but {record['bytes']} were "
            "written: it is truncated or was changed; load an earlier checkpoint")


def _checksum_mismatch(path: Path, name: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"the checkpoint file {path} does not match its recorded checksum ({name}): it is "
        "corrupted; load an earlier checkpoint")
