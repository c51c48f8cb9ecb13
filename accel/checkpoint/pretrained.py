"""`load_pretrained`: pretrained weights straight into a model that may be on meta and sharded.

The model may come from `torch.device("meta")`, `accel.init_empty_weights` or
`accel.deepspeed_init`, and may already have passed through `tensor_parallel` and
`shard_model` (FSDP2, HSDP, TP x FSDP, DeepSpeed). The order is:

1. check, on every rank, that the checkpoint fits (names, shapes, the buffers to
   recompute, the dtype) and agree: one error listing every difference, before anything
   changes;
2. materialise the meta tensors on ctx.device (FSDP2 modules through their own `_apply`,
   which re-registers the shards; other tensors swapped in place, so tied weights and
   every reference to a parameter stay valid), converting parameters to `dtype`;
3. recompute the buffers that were on meta and are not in the checkpoint (Llama's
   rotary `inv_freq`): transformers' `_init_weights` of the module, else its
   `reset_parameters()`;
4. fill each tensor once (tied ones share it) with the part this rank holds: a DTensor's
   local block (from its placements), a ZeRO-3 partition's flat range, a plain tensor
   whole. Each read opens the file, slices it (`safe_open(...).get_slice`) and closes it,
   so at most one tensor's slice is mapped at a time: peak memory is this rank's shard
   plus about one tensor's slice.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from accel.backends.deepspeed.partition import (
    is_partitioned,
    partition_dtype,
    refuse_built_engine,
    write_partition,
)
from accel.checkpoint.common import agree
from accel.checkpoint.export import _check_fits, _match, unwrap_for_export
from accel.checkpoint.ties import identity
from accel.checkpoint.weights import WeightFiles, few
from accel.context import Context
from accel.errors import (
    CorruptCheckpointError,
    IncompatibleOptionsError,
    UnsupportedError,
)
from accel.inference.empty import to_dtype
from accel.validation import check_context, check_module, check_type

#: a tensor's index per dimension: a range, or the positions of a strided shard.
Index = tuple[slice | torch.Tensor, ...]


class _Plan(NamedTuple):
    files: WeightFiles
    copies: list[tuple[str, str]]  # (the model's name, the checkpoint's), one per tensor
    buffers: list[tuple[nn.Module, nn.Module, list[str]]]  # (initialiser, owner, names)


def load_pretrained(model: nn.Module, ctx: Context, path: str | os.PathLike[str],
                    dtype: str | torch.dtype | None = None) -> tuple[nn.Module, Context]:
    """Fill `model` with pretrained weights, each rank reading only the part it holds.

    (in place) The model's tensors are filled (meta ones allocated first) and the same
    model is returned; the Context records the load. `path` is a transformers folder
    (``model.safetensors`` or a sharded ``model.safetensors.index.json``; pickled
    ``.bin`` through weights_only) or one ``.safetensors`` file. `model` may be on the
    meta device and already sharded (`tensor_parallel`, `shard_model` with FSDP2 / HSDP,
    or built under `accel.deepspeed_init`): meta tensors are allocated on ctx.device and
    filled, buffers the checkpoint lacks (rotary frequencies) recomputed, tied weights
    stay one tensor (where tensor_parallel split a tie, both are filled). A meta model that
    is not sharded is allocated whole on every rank.
    Call it on every rank, after `shard_model` (FSDP: `accel.FSDP(keep_meta=True)` leaves
    a meta model unallocated for it) and before the first forward.

    Args:
        dtype: the dtype floating-point parameters are allocated in (meta) or converted to;
            None keeps the model's. Buffers keep theirs. Checkpoint tensors are converted
            as they are read.

    Raises:
        CheckpointMismatchError: (an InvalidArgumentError) every tensor the checkpoint
            lacks or has in excess, and every shape that differs, before anything changes.
        CorruptCheckpointError, UntrustedCheckpointError: an unreadable file, or an index
            that names a file outside its folder.
        UnsupportedError: a meta buffer that is not in the checkpoint and cannot be
            recomputed (build the model with real buffers: `accel.init_empty_weights()`).

    >>> with torch.device("meta"):
    ...     model = LlamaForCausalLM(LlamaConfig.from_pretrained("llama/"))
    >>> model, ctx = accel.shard_model(model, ctx, strategy=accel.FSDP(keep_meta=True))
    >>> model, ctx = accel.load_pretrained(model, ctx, "llama/", dtype="bf16")
    """
    check_module("load_pretrained", "model", model)
    check_context("load_pretrained", ctx)
    check_type("load_pretrained", "path", path, (str, os.PathLike),
               "a transformers folder or a .safetensors file (str or os.PathLike)")
    as_dtype = to_dtype(dtype) if dtype is not None else None
    module = unwrap_for_export(model, ctx)
    plan, error = None, None
    try:
        refuse_built_engine(model)
        plan = _plan(module, Path(path), as_dtype)
    except Exception as exc:  # noqa: BLE001 - every rank hears of it before any writes
        error = exc
    agree(ctx, error, f"checking that {path} fits the model")
    assert plan is not None
    _materialise(module, ctx.device, as_dtype)
    _recompute_buffers(plan.buffers)
    reader, live = _Reader(plan.files), module.state_dict(keep_vars=True)  # new buffers
    with torch.no_grad():
        for target, name in plan.copies:
            _fill(live[target], reader, name)
    return model, ctx.record(f"load_pretrained({Path(path).name})")


# --------------------------------------------------------------------------- check


def _plan(module: nn.Module, path: Path, dtype: torch.dtype | None) -> _Plan:
    files = WeightFiles(path)
    targets = module.state_dict(keep_vars=True)
    source_of, names = _match(targets, files)
    names = _tied_by_transformers(module, source_of, names)
    _check_fits(files, targets, source_of, names)
    copies, seen = [], set()
    for name, source in source_of.items():
        if identity(targets[name]) not in seen:  # a tied tensor is filled once
            seen.add(identity(targets[name]))
            copies.append((name, source))
    _check_partition_dtype(module, dtype)
    return _Plan(files, copies, _buffers_to_recompute(module))


def _tied_by_transformers(module: nn.Module, source_of: dict[str, str], names: Any) -> Any:
    """Fill a tensor the checkpoint lacks from the one transformers ties it to.

    A tie that tensor_parallel split in two (lm_head sharded by rows, the embedding by
    columns) leaves two tensors, and save_pretrained wrote only the embedding. `names`
    (missing, unexpected) comes back without the names filled this way.
    """
    declared = getattr(module, "all_tied_weights_keys", None) or {}
    for name in names.missing:
        if declared.get(name) in source_of:
            source_of[name] = source_of[declared[name]]
    return names._replace(missing=[name for name in names.missing if name not in source_of])


def _check_partition_dtype(module: nn.Module, dtype: torch.dtype | None) -> None:
    stored = {partition_dtype(p) for p in module.parameters()
              if is_partitioned(p) and p.is_floating_point()}
    if dtype is not None and stored - {dtype}:
        raise IncompatibleOptionsError(
            f"load_pretrained(dtype={dtype}): the model's ZeRO-3 partitions are stored in "
            f"{sorted(map(str, stored))} (deepspeed_init's precision); pass dtype=None")


def _buffers_to_recompute(module: nn.Module) -> list[tuple[nn.Module, nn.Module, list[str]]]:
    """(initialiser, owner, names) of meta buffers no checkpoint holds (non-persistent).

    Raises:
        UnsupportedError: an owner that neither transformers nor torch can initialise.
    """
    found, lacking = [], []
    for prefix, owner in module.named_modules():
        names = [name for name in owner._non_persistent_buffers_set
                 if getattr(owner, name, None) is not None and getattr(owner, name).is_meta]
        if not names:
            continue
        initialiser = _initialiser(module, prefix, owner)
        if initialiser is None:
            lacking += [f"{prefix}.{name}" if prefix else name for name in names]
        found.append((initialiser, owner, sorted(names)))
    if lacking:
        raise UnsupportedError(
            f"the buffers {few(lacking)} are on the meta device and not in the checkpoint "
            "(non-persistent), and their modules have no reset_parameters() to recompute "
            "them; build the model with real buffers (accel.init_empty_weights(), whose "
            "include_buffers is False) and only the parameters on meta")
    return found


def _initialiser(root: nn.Module, prefix: str, owner: nn.Module) -> nn.Module | None:
    """The module that recomputes `owner`'s buffers: the nearest transformers model above
    it (its `_init_weights(owner)`), else `owner` itself (`reset_parameters()`)."""
    parts = prefix.split(".") if prefix else []
    for depth in range(len(parts), -1, -1):
        above = root.get_submodule(".".join(parts[:depth]))
        if callable(getattr(above, "_init_weights", None)):
            return above
    return owner if callable(getattr(owner, "reset_parameters", None)) else None


# --------------------------------------------------------------------------- materialise


def _materialise(module: nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    """Meta tensors allocated on `device`; floating parameters converted to `dtype`."""
    params = {id(p) for p in module.parameters() if not is_partitioned(p)}

    def wanted(tensor: torch.Tensor) -> torch.dtype:
        return (dtype if dtype is not None and id(tensor) in params
                and tensor.is_floating_point() else tensor.dtype)

    def changes(tensor: torch.Tensor) -> bool:
        return tensor.is_meta or tensor.dtype != wanted(tensor)

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_meta:
            return torch.empty_like(tensor, device=device, dtype=wanted(tensor))
        return tensor.to(wanted(tensor))  # itself when nothing changes

    inside_fsdp: set[int] = set()
    for root in _outermost(module, FSDPModule):
        if any(changes(t) for t in (*root.parameters(), *root.buffers())):
            root._apply(convert)  # FSDP2 re-registers its shards after the change
        inside_fsdp.update(id(sub) for sub in root.modules())
    done: set[int] = set()
    for owner in module.modules():
        if id(owner) not in inside_fsdp:
            _swap_in_place(owner, changes, convert, done)


def _outermost(module: nn.Module, kind: type) -> list[nn.Module]:
    found, inside = [], set()
    for sub in module.modules():
        if isinstance(sub, kind) and id(sub) not in inside:
            found.append(sub)
            inside.update(id(m) for m in sub.modules())
    return found


def _swap_in_place(owner: nn.Module, changes: Any, convert: Any, done: set[int]) -> None:
    """Replace the contents of `owner`'s own tensors, keeping the objects: a tied parameter
    stays one, and an optimizer or engine link to it stays valid."""
    for param in owner._parameters.values():
        if param is None or id(param) in done:
            continue
        done.add(id(param))
        if changes(param):
            new = convert(param)
            replacement = nn.Parameter(new, requires_grad=param.requires_grad)
            replacement.__dict__.update(param.__dict__)  # swap_tensors swaps these too
            torch.utils.swap_tensors(param, replacement)
    for name, buffer in owner._buffers.items():
        if buffer is not None and changes(buffer):
            owner._buffers[name] = convert(buffer)


def _recompute_buffers(buffers: list[tuple[nn.Module, nn.Module, list[str]]]) -> None:
    """Recompute buffers that were on meta; raise if one is left as allocated."""
    with torch.no_grad():
        for initialiser, owner, names in buffers:
            for name in names:
                if getattr(owner, name).is_floating_point():
                    getattr(owner, name).fill_(math.nan)  # what an initialiser did not write
            if callable(getattr(initialiser, "_init_weights", None)):
                initialiser._init_weights(owner)  # transformers' own (rotary: inv_freq)
            else:
                owner.reset_parameters()
            left = [name for name in names if getattr(owner, name).is_floating_point()
                    and bool(torch.isnan(getattr(owner, name)).any())]
            if left:
                raise UnsupportedError(
                    f"{type(initialiser).__name__} did not recompute the buffers {left} of "
                    f"{type(owner).__name__} (on the meta device, not in the checkpoint); "
                    "build the model with real buffers: accel.init_empty_weights()")


# --------------------------------------------------------------------------- fill


def _fill(target: torch.Tensor, reader: _Reader, name: str) -> None:
    """Write the part of checkpoint tensor `name` this rank holds into `target`."""
    if is_partitioned(target):
        write_partition(target, lambda start, stop: reader.flat(name, start, stop))
    elif isinstance(target, DTensor):
        index = local_index(target)
        if index is not None:
            target.to_local().copy_(reader.block(name, index))
    else:
        target.copy_(reader.block(name, ()))


def local_index(target: DTensor) -> Index | None:
    """Which elements of the global tensor this rank's local tensor holds, per dimension
    (None: none). Each dimension's positions come from distributing a 1-D arange with
    the placements that act on that dimension, so uneven and strided shards (FSDP over
    tensor parallelism) come out exactly as torch lays them out.
    """
    mesh, index = target.device_mesh, []
    for dim, size in enumerate(target.shape):
        placements = [_on_dimension(placement, dim) for placement in target.placements]
        if all(isinstance(placement, Replicate) for placement in placements):
            index.append(slice(0, size))
            continue
        positions = distribute_tensor(torch.arange(size, device=mesh.device_type), mesh,
                                      placements, src_data_rank=None).to_local().cpu()
        if positions.numel() == 0:
            return None
        first = int(positions[0])
        contiguous = torch.equal(positions, torch.arange(first, first + positions.numel()))
        index.append(slice(first, first + positions.numel()) if contiguous else positions)
    return tuple(index)


def _on_dimension(placement: Any, dim: int) -> Any:
    """`placement` on a 1-D tensor standing for dimension `dim` (others: replicated)."""
    if isinstance(placement, _StridedShard):
        return (_StridedShard(0, split_factor=placement.split_factor)
                if placement.dim == dim else Replicate())
    if isinstance(placement, Shard):
        return Shard(0) if placement.dim == dim else Replicate()
    if isinstance(placement, Replicate):
        return placement
    raise UnsupportedError(f"load_pretrained cannot fill a DTensor placed as {placement}")


class _Reader:
    """Slices of checkpoint tensors, each file opened for one read and closed after it."""

    def __init__(self, files: WeightFiles):
        self.files = files

    def block(self, name: str, index: Index) -> torch.Tensor:
        """The elements of `name` at `index` (missing trailing dimensions: all)."""
        bounds = tuple(part if isinstance(part, slice) else
                       slice(int(part.min()), int(part.max()) + 1) for part in index)
        data = self._read(name, bounds)
        for dim, part in enumerate(index):
            if isinstance(part, torch.Tensor):  # a strided shard: pick its rows
                data = data.index_select(dim, part - int(part.min()))
        return data

    def flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of `name` flattened, reading only the rows they span."""
        shape = self.files.spec(name).shape
        if not shape:
            return self._read(name, ()).reshape(-1)[start:stop]
        row = math.prod(shape[1:])
        first, last = start // row, -(-stop // row)
        rows = self._read(name, (slice(first, last),)).reshape(-1)
        return rows[start - first * row:stop - first * row]

    def _read(self, name: str, bounds: tuple[slice, ...]) -> torch.Tensor:
        file = self.files.file_of[name]
        if file.suffix != ".safetensors":  # a pickled file, memory-mapped by WeightFiles
            return self.files.read(name)[bounds].clone()
        try:
            with safe_open(os.fspath(file), framework="pt") as handle:
                if not self.files.spec(name).shape:
                    return handle.get_tensor(name)
                return handle.get_slice(name)[bounds] if bounds else handle.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise CorruptCheckpointError(f"cannot read {name} from {file}: {exc}") from exc
