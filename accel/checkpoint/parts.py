"""The pieces of a checkpoint: a "part" is a JSON skeleton plus its tensors.

A full part is ``NAME.json`` + ``NAME.safetensors``; a sharded part is ``NAME.json`` +
``NAME/``, a torch.distributed.checkpoint directory written with its safetensors
storage (one ``shard-*.safetensors`` per writing rank, offsets in each file's header),
which DCP reads back on any number of processes. Neither holds pickled data; a plain
DCP folder (pickled ``.metadata``) is read only when the caller passes trust_pickle=True.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

from accel.checkpoint.files import Record, read_json, write_json
from accel.checkpoint.folder import METADATA
from accel.checkpoint.tree import flatten, keep_tensors, tensor_keys, unflatten
from accel.checkpoint.weights import names_in, read_tensors, write_tensors
from accel.context import Context
from accel.errors import (
    CorruptCheckpointError,
    IncompatibleOptionsError,
    InvalidArgumentError,
    UntrustedCheckpointError,
)
from accel.runtime import ops

Records = Mapping[str, Record]


def write_part(root: Path, name: str, tree: Any) -> dict[str, Record]:
    """Write a full part as ``root/name.json`` + ``.safetensors``; their records by path.

    `name` may hold a folder (``ranks/rank0``); the records' keys are relative to `root`.
    """
    skeleton, tensors = flatten(tree)
    return {f"{name}.json": write_json(root / f"{name}.json", skeleton),
            f"{name}.safetensors": write_tensors(root / f"{name}.safetensors", tensors)}


def read_part(root: Path, name: str, records: Records | None = None) -> Any:
    """Read a full part, each file once, checked against `records` (None: unchecked)."""
    skeleton = read_json(root / f"{name}.json", _record(records, root, f"{name}.json"))
    path = root / f"{name}.safetensors"
    tensors = read_tensors(path, _record(records, root, f"{name}.safetensors"))
    return unflatten(skeleton, tensors, source=str(path))


def _record(records: Records | None, root: Path, name: str) -> Record | None:
    if records is None or name in records:
        return None if records is None else records[name]
    raise CorruptCheckpointError(
        f"{root / name} is not listed in {root / METADATA}: the checkpoint is mixed up")


def write_sharded_part(root: Path, name: str, tree: Any, ctx: Context) -> dict[str, Record]:
    """Every rank writes its shards of `tree` (DTensors) into ``root/name/``: collective.

    Returns the record of the JSON skeleton (rank 0; {} elsewhere); torch writes the
    shard files, whose records are computed afterwards.
    """
    skeleton, tensors = flatten(tree)
    if ctx.pp_size > 1:  # pipeline stages hold different tensors: rank 0 writes them all
        from accel.transforms.pipeline_state import merge_trees

        skeleton = merge_trees(ops.gather_object([skeleton], ctx, ranks="all"))
    records = {f"{name}.json": write_json(root / f"{name}.json", skeleton)} if (
        ctx.is_main_process) else {}
    writer = dcp.HuggingFaceStorageWriter(str(root / name), save_distributed=True)
    dcp.save(tensors, storage_writer=writer, process_group=ctx.group,
             no_dist=not ctx.is_distributed)
    return records


def read_sharded_part(root: Path, name: str, target: Any, ctx: Context, *,
                      partial: bool = False) -> Any:
    """Fill `target` (this process's tensors, sharded or whole) from a sharded part.

    Works on any world size: DCP reads each process's pieces from whatever shards
    hold them. Verify the part's files first: DCP reads them piecewise, and may write
    into the model's own tensors. Returns the saved tree with `target`'s tensors, now
    loaded. `partial`: the part may hold only some of `target`'s tensors (the others
    are not read).
    """
    skeleton = read_json(root / f"{name}.json")
    _, tensors = flatten(target)
    if ctx.pp_size > 1:  # a pipeline stage reads the tensors it holds, not the others'
        skeleton = keep_tensors(skeleton, set(tensors))
    saved = set(tensor_keys(skeleton))
    if partial:
        tensors = {key: value for key, value in tensors.items() if key in saved}
    _check_same_keys(saved, set(tensors), root / name)
    reader = dcp.HuggingFaceStorageReader(str(root / name))
    dcp.load(tensors, storage_reader=reader, process_group=ctx.group,
             no_dist=not ctx.is_distributed)
    return unflatten(skeleton, tensors, source=str(root / name))


def sharded_skeleton(root: Path, name: str) -> Any:
    """The tree a sharded part holds, with meta tensors (shape and dtype, no data) for its
    tensors: read from the headers only.

    Raises:
        CorruptCheckpointError: a shard file's header does not fit its data.
    """
    tensors = {key: torch.empty(shape, dtype=dtype, device="meta")
               for key, (shape, dtype) in sharded_tensor_specs(root / name).items()}
    return unflatten(read_json(root / f"{name}.json"), tensors, source=str(root / name))


def sharded_tensor_specs(directory: str | Path, *, trust_pickle: bool = False
                         ) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """{key: (shape, dtype)} of every tensor in a sharded part (from its metadata only).

    Args:
        trust_pickle: as in `load_sharded_tensors`.

    Raises:
        UntrustedCheckpointError: a plain DCP folder, without trust_pickle=True.
        CorruptCheckpointError: a shard file's header does not fit its data.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for file in sorted(Path(directory).glob("*.safetensors")):
        names_in(file)  # the header fits the data: safe_open checks it, naming the file
    entries = _reader(directory, trust_pickle).read_metadata().state_dict_metadata
    return {key: (meta.size, meta.properties.dtype) for key, meta in entries.items()
            if isinstance(meta, TensorStorageMetadata)}


def load_sharded_tensors(directory: str | Path, keys: Iterable[str] | None = None, *,
                         trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a sharded part, whole, on the CPU of this one process (no process group).

    For tools (`accel merge-weights`): `directory` is e.g. ``CKPT/model`` (keys are then
    parameter names), or a torch.distributed.checkpoint folder.

    Args:
        keys: only these (default: all); only their bytes are read.
        trust_pickle: also read a plain torch.distributed.checkpoint folder, whose
            ``.metadata`` is a pickle: unpickling runs whatever code its author put
            there, so pass True only for folders whose author you trust. accel's own
            checkpoints (safetensors shards) never need it.

    Raises:
        UntrustedCheckpointError: a folder with ``.metadata`` and no safetensors shards,
            without trust_pickle=True.
        InvalidArgumentError: a key the folder does not hold.

    >>> weights = load_sharded_tensors("runs/exp1/checkpoint_000003/model")
    """
    specs = sharded_tensor_specs(directory, trust_pickle=trust_pickle)
    wanted = list(specs) if keys is None else list(keys)
    absent = [key for key in wanted if key not in specs]
    if absent:
        raise InvalidArgumentError(f"{directory} holds no tensors named {absent[:5]}")
    tensors = {key: torch.empty(specs[key][0], dtype=specs[key][1]) for key in wanted}
    dcp.load(tensors, storage_reader=_reader(directory, trust_pickle), no_dist=True)
    return tensors


def _reader(directory: str | Path, trust_pickle: bool) -> dcp.StorageReader:
    # accel's layout keeps the metadata in its safetensors shards' headers (no pickle); a
    # plain DCP folder keeps it in .metadata, a pickle, which can run code when loaded.
    folder = Path(directory)
    if any(folder.glob("*.safetensors")) or not (folder / ".metadata").is_file():
        return dcp.HuggingFaceStorageReader(str(folder))
    if trust_pickle:
        return dcp.FileSystemReader(str(folder))
    raise UntrustedCheckpointError(
        f"{folder} is a torch.distributed.checkpoint folder whose .metadata is a pickle, "
        "and unpickling runs whatever code its author put in it: accel reads it only "
        "when told to. Pass trust_pickle=True (accel merge-weights --trust-pickle) only if "
        "you trust whoever wrote this folder")


def _check_same_keys(saved: set[str], wanted: set[str], where: Path) -> None:
    if saved == wanted:
        return
    raise IncompatibleOptionsError(
        f"the sharded checkpoint {where} does not fit this model/optimizer: it lacks "
        f"{sorted(wanted - saved)[:5]} and has {sorted(saved - wanted)[:5]} that this one "
        "lacks; load it into the same model and optimizer setup that saved it")


# ---------------------------------------------------------------- random number generators

def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch CPU and (if used) CUDA generator states."""
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {**numpy_state, "state": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"])}},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {"key": numpy_state["state"]["key"].numpy().astype(np.uint32),
                            "pos": numpy_state["state"]["pos"]}
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

