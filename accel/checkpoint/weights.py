"""Weights files in the layout Hugging Face transformers reads and writes.

Writing: `write_safetensors_shards` lays tensors out in ``model.safetensors`` or
``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``, asking for one
tensor at a time, so the writer never holds more than one; it writes into a folder,
file by file atomically, and removes only its own files of an earlier save.
`write_tensors` streams one file the same way (checkpoint parts). Both checksum the
bytes as they write them.
Reading: `WeightFiles` maps names to files (safetensors, or pickled .bin/.pt through
``torch.load(weights_only=True)``; an index may name only files inside its folder) and
checks every file before anything is read; `read_tensors` reads a checkpoint part's
file once, verifying it on the way.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from accel.checkpoint.files import (
    TMP_MARK,
    ChecksummedWriter,
    CorruptCheckpointError,
    Record,
    fsync_path,
    index_files,
    read_ahead,
    read_verified,
    replacing,
    write_bytes,
)
from accel.errors import AccelError, InvalidArgumentError
from accel.inference.offload import _SAFETENSORS_DTYPES, tensor_to_bytes

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Foreign checkpoints load_model also reads (pickle only through weights_only=True).
TORCH_WEIGHTS_NAMES = ("pytorch_model.bin", "model.bin", "model.pt")
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
# transformers refuses a safetensors file whose metadata does not say "pt".
_METADATA = {"format": "pt"}
_DTYPE_OF = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}
# The files write_safetensors_shards writes, and their temporary names: the only files
# it ever removes from a folder.
_OWN_FILE = re.compile(r"(model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors)"
                       rf"({re.escape(TMP_MARK)}[0-9a-f]{{12}})?")


class TensorSpec(NamedTuple):
    """What a weights file records about one tensor, known before its data is gathered."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.dtype.itemsize


def spec_of(name: str, tensor: torch.Tensor) -> TensorSpec:
    """The spec of a tensor (a DTensor's global shape)."""
    return TensorSpec(name, tuple(tensor.shape), tensor.dtype)


# --------------------------------------------------------------------------- write


def plan_shards(specs: Sequence[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors into files of at most `max_bytes`, in order (transformers' rule).

    A tensor larger than `max_bytes` gets a file of its own.
    """
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def write_safetensors_shards(specs: Sequence[TensorSpec],
                             fetch: Callable[[str], torch.Tensor | None],
                             directory: Path | None, *, max_shard_size: int) -> dict[str, Record]:
    """Write `specs` as shard files plus an index into `directory`, one tensor in memory at a time.

    `fetch(name)` is called once per tensor, in the same order on every process (it may be
    a collective); `directory` is None on processes that do not write, where fetch's
    result is ignored. When writing fails (disk full, ...), the remaining tensors are
    still fetched, so that processes gathering them with this one do not wait forever,
    and then the error is raised.

    Each file is written under a temporary name, fsynced and renamed into place; the
    index comes last, then the weight files of an earlier save that this one did not
    rewrite are removed (see `_remove_stale`). Nothing else in `directory` is
    touched. A crash leaves complete files only: the old index with the old shards, or
    (when the new save reuses their names) some of them already new ones; or the new
    index with the new shards.

    Returns:
        {file name: {"bytes", checksum}} of the files written ({} where directory is None).
    """
    _check_dtypes(specs)
    shards = [_aligned(shard) for shard in plan_shards(specs, max_shard_size)]
    files = ([WEIGHTS_NAME] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    fetched: list[str] = []

    def fetch_counted(name: str) -> torch.Tensor | None:
        fetched.append(name)
        return fetch(name)

    records: dict[str, Record] = {}
    try:
        for file_name, shard in zip(files, shards, strict=True):
            if directory is None:
                for spec in shard:
                    fetch_counted(spec.name)
                continue
            with replacing(directory / file_name) as tmp:
                records[file_name] = _write_file(tmp, shard, fetch_counted)
    except (OSError, AccelError):
        for spec in [spec for shard in shards for spec in shard][len(fetched):]:
            fetch(spec.name)
        raise
    if directory is not None:
        if len(shards) > 1:
            records[INDEX_NAME] = _write_index(directory, dict(zip(files, shards, strict=True)))
        _remove_stale(directory, set(records))
    return records


def _write_index(directory: Path, shards: Mapping[str, Sequence[TensorSpec]]) -> Record:
    weight_map = {spec.name: file for file, shard in shards.items() for spec in shard}
    total = sum(spec.nbytes for shard in shards.values() for spec in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with replacing(directory / INDEX_NAME) as tmp:
        return write_text(tmp, json.dumps(index, indent=2, sort_keys=True) + "\n")


def own_weight_file(name: str) -> bool:
    """Whether `write_safetensors_shards` writes files named `name` (or it is a temporary one)."""
    return _OWN_FILE.fullmatch(name) is not None


def _remove_stale(directory: Path, keep: set[str]) -> None:
    """Remove the weight files of an earlier save into `directory` that are not in `keep`.

    Only names `write_safetensors_shards` gives its files (and their temporary names)
    are candidates: a user's tokenizer.json, README.md or subfolders always stay. An
    index goes first, so that it never names a shard already removed.
    """
    stale = [path for path in directory.iterdir() if path.name not in keep
             and own_weight_file(path.name) and path.is_file()]
    for path in sorted(stale, key=lambda path: path.name != INDEX_NAME):
        path.unlink(missing_ok=True)
    if stale:
        fsync_path(directory)


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> Record:
    """Write `tensors` (any device) as one safetensors file, streamed and fsynced.

    Tensors that share memory (tied weights) are each written whole.

    Returns:
        The file's {"bytes", checksum}, computed while writing.
    """
    specs = [spec_of(name, tensor) for name, tensor in tensors.items()]
    _check_dtypes(specs)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_file(path, _aligned(specs), tensors.__getitem__)


def _aligned(specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    # Widest dtypes first: after the 64-byte aligned header, every tensor starts aligned.
    return sorted(specs, key=lambda spec: -spec.dtype.itemsize)


def _check_dtypes(specs: Sequence[TensorSpec]) -> None:
    for spec in specs:
        if spec.dtype not in _SAFETENSORS_DTYPES:
            raise InvalidArgumentError(
                f"safetensors cannot store {spec.name} of dtype {spec.dtype}")


def _write_file(path: Path, specs: Sequence[TensorSpec],
                fetch: Callable[[str], torch.Tensor | None]) -> Record:
    with ChecksummedWriter(path) as out:
        out.write(_header(specs))
        for spec in specs:
            tensor = fetch(spec.name)
            if tensor is None or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                raise AccelError(f"{spec.name} changed while it was being saved: expected "
                                 f"{spec.shape} {spec.dtype}")
            out.write(tensor_to_bytes(tensor))
            del tensor  # the only reference: freed before the next tensor is gathered
    return out.record()


def _header(specs: Sequence[TensorSpec]) -> bytes:
    header: dict[str, Any] = {"__metadata__": _METADATA}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": _SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(len(encoded) + 8) % 64)  # tensor data starts 64-byte aligned
    return len(encoded).to_bytes(8, "little") + encoded


def write_text(path: Path, text: str) -> Record:
    return write_bytes(path, text.encode())


def read_tensors(path: Path, record: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, read once (checked against `record` on the way).

    The tensors are views of the file's (copy-on-write) mapping: nothing is copied.

    Raises:
        CorruptCheckpointError: the file is missing, truncated, corrupted or not safetensors.
    """
    data = read_verified(path, record)
    try:
        return _tensors_in(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(
            f"the checkpoint file {path} cannot be read as safetensors ({exc})") from None


class Placed(NamedTuple):
    """Where a tensor lies in a safetensors file: bytes [start, end) of the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _tensors_in(data: mmap.mmap | bytes) -> dict[str, torch.Tensor]:
    return {name: _view(data, placed) for name, placed in _placements(data).items()}


def _placements(data: mmap.mmap | bytes) -> dict[str, Placed]:
    """Every tensor of a safetensors file's bytes, checked to fit its place."""
    length = int.from_bytes(data[:8], "little")
    if len(data) < 8 or 8 + length > len(data):
        raise ValueError(f"a header of {length} bytes in a file of {len(data)}")
    header = json.loads(bytes(data[8:8 + length]))
    start, placed = 8 + length, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = _DTYPE_OF[entry["dtype"]], tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0 or start + end > len(data):
            raise ValueError(f"{name} does not fit its place in the file")
        placed[name] = Placed(dtype, shape, start + begin, start + end)
    return placed


def _view(data: mmap.mmap | bytes, placed: Placed) -> torch.Tensor:
    """The tensor at `placed`, a view of `data` (no copy)."""
    count = math.prod(placed.shape)
    if not count:
        return torch.empty(placed.shape, dtype=placed.dtype)
    return (torch.frombuffer(data, dtype=placed.dtype, count=count, offset=placed.start)
            .reshape(placed.shape))


# --------------------------------------------------------------------------- read


def few(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class WeightFiles:
    """The tensors of a weights folder or file, read lazily: name -> file, shape, data."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.file_of = _locate(self.path)
        self._torch_files: dict[Path, dict[str, torch.Tensor]] = {}
        self._mapped: dict[Path, tuple[mmap.mmap | bytes, dict[str, Placed]]] = {}
        self._specs: dict[str, TensorSpec] = {}
        for file in dict.fromkeys(self.file_of.values()):
            self._specs.update(self._read_specs(file))
        absent = sorted(name for name in self.file_of if name not in self._specs)
        if absent:
            raise CorruptCheckpointError(
                f"the index of {self.path} maps {few(absent)} to files that do not hold them")

    @property
    def names(self) -> list[str]:
        return list(self.file_of)

    def spec(self, name: str) -> TensorSpec:
        """Shape and dtype of `name`, from the file's header (no data read)."""
        return self._specs[name]

    def read(self, name: str) -> torch.Tensor:
        file = self.file_of[name]
        if file.suffix != ".safetensors":
            return self._torch_files[file][name]
        try:
            with safe_open(os.fspath(file), framework="pt") as handle:
                return handle.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise CorruptCheckpointError(f"cannot read {name} from {file}: {exc}") from exc

    def copy_into(self, name: str, target: torch.Tensor) -> None:
        """Copy `name` into `target` (a tensor of its shape; any dtype, any device).

        A safetensors tensor is copied straight from the file's mapping, its range
        populated first (the disk read in large requests): one copy, and no tensor
        allocated on the way (fresh memory, faulted in page by page, costs more than the
        copy; measured 2.5x the load time).
        """
        file = self.file_of[name]
        if file.suffix != ".safetensors":
            target.copy_(self.read(name))
            return
        if file not in self._mapped:
            self._mapped[file] = self._map(file)
        data, placed = self._mapped[file]
        where = placed[name]
        read_ahead(data)(where.start, where.end - where.start)
        target.copy_(_view(data, where))

    @staticmethod
    def _map(file: Path) -> tuple[mmap.mmap | bytes, dict[str, Placed]]:
        data = read_verified(file)  # the copy-on-write mapping (never written)
        try:
            return data, _placements(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptCheckpointError(f"cannot read {file} ({exc}); save it again") from exc

    def _read_specs(self, file: Path) -> dict[str, TensorSpec]:
        if not file.is_file():
            raise CorruptCheckpointError(f"{file} is missing (named by the index of {self.path})")
        try:
            if file.suffix == ".safetensors":
                # safe_open checks the header and that the data fills the file exactly.
                with safe_open(os.fspath(file), framework="pt") as handle:
                    slices = {name: handle.get_slice(name) for name in handle.keys()}
                    return {name: TensorSpec(name, tuple(part.get_shape()),
                                             _DTYPE_OF[part.get_dtype()])
                            for name, part in slices.items()}
        except SafetensorError as exc:
            raise CorruptCheckpointError(
                f"{file} is truncated or corrupted ({exc}); save it again") from exc
        state = self._torch_files[file] = _load_torch_file(file)
        return {name: spec_of(name, value) for name, value in state.items()
                if isinstance(value, torch.Tensor)}


def _locate(path: Path) -> dict[str, Path]:
    """Tensor name -> file, for a weights file or folder."""
    if path.is_file():
        return {name: path for name in names_in(path)}
    # safetensors before pickled files, as transformers: save_model leaves a folder's
    # older pytorch_model.bin(.index.json) in place.
    for file_name in (INDEX_NAME, WEIGHTS_NAME, TORCH_INDEX_NAME, *TORCH_WEIGHTS_NAMES):
        file = path / file_name
        if file.is_file() and file_name.endswith(".index.json"):
            return index_files(path, _weight_map(file), file)
        if file.is_file():
            return {name: file for name in names_in(file)}
    raise InvalidArgumentError(
        f"{path} holds no weights: expected a .safetensors/.bin/.pt file or a folder with "
        f"{INDEX_NAME}, {WEIGHTS_NAME} or {TORCH_WEIGHTS_NAMES[0]} (save_model writes one)")


def _weight_map(index: Path) -> dict[str, Any]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"{index} is not a weights index ({exc})") from exc
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError(f"{index} is not a weights index (no weight_map object)")
    return weight_map


def names_in(file: Path) -> Iterable[str]:
    if file.suffix == ".safetensors":
        try:
            with safe_open(os.fspath(file), framework="pt") as handle:
                return list(handle.keys())
        except SafetensorError as exc:
            raise CorruptCheckpointError(f"{file} is truncated or corrupted ({exc})") from exc
    if file.suffix in (".bin", ".pt", ".pth"):
        return list(_load_torch_file(file))
    raise InvalidArgumentError(f"{file}: unknown weights format (use .safetensors, .bin or .pt)")


def _load_torch_file(file: Path) -> dict[str, Any]:
    """A pickled state dict, memory-mapped; only tensors and plain containers are unpickled."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise CorruptCheckpointError(f"{file} is truncated or corrupted ({exc})") from exc
    except Exception as exc:  # weights_only refuses arbitrary objects with UnpicklingError
        raise CorruptCheckpointError(
            f"{file} is not a plain state dict torch.load(weights_only=True) can read ({exc})"
        ) from exc
    if not isinstance(state, dict):
        raise InvalidArgumentError(f"{file} holds a {type(state).__name__}, not a state dict")
    return state
