"""load_checkpoint_and_dispatch: stream a safetensors checkpoint into a (meta) model,
tensor by tensor, straight to each block's device, then dispatch it.

Host memory stays near what remains on the CPU plus 64 MiB: every checkpoint file is
memory-mapped, each tensor is copied (and converted) to its device in 64 MiB pieces,
whose pages are dropped as soon as they are copied. Disk blocks whose dtype already
matches are not copied at all: their parameters become views of the checkpoint file
itself (so keep the checkpoint while the model is in use).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from accel.checkpoint.files import index_files
from accel.context import Context
from accel.errors import InvalidArgumentError
from accel.inference.blocks import owner_entry
from accel.inference.device_map import check_device_map, infer_device_map
from accel.inference.dispatch import (
    attach_dispatch,
    check_dispatch_options,
    execution_device_for,
    move_resident,
    raise_if_dispatched,
    require_materialized,
)
from accel.inference.empty import to_dtype
from accel.inference.memory import DISK, DeviceLike, device_name, is_accelerator, memory_budgets
from accel.inference.offload import (
    map_safetensors,
    read_safetensors_header,
    release,
    write_safetensors,
)
from accel.validation import check_bool, check_context, check_mapping, check_module, check_type

INDEX_FILE = "model.safetensors.index.json"
# Tensors are copied out of the mapped checkpoint in pieces of this size (see _copy_out).
COPY_CHUNK_BYTES = 64 * 2**20


def load_checkpoint_and_dispatch(
    model: nn.Module, checkpoint: str | os.PathLike[str],
    device_map: str | Mapping[str, DeviceLike] = "auto", *,
    max_memory: Mapping[DeviceLike, Any] | None = None,
    no_split_module_classes: Iterable[str] | None = None,
    dtype: str | torch.dtype | None = None,
    offload_dir: str | os.PathLike[str] | None = None,
    main_device: DeviceLike | None = None, prefetch: int = 2, strict: bool = True,
    release_after_use: bool | None = None, ctx: Context | None = None,
) -> nn.Module:
    """Load a safetensors checkpoint into `model` block by block and dispatch it; returns it.

    Args:
        model: usually built under `init_empty_weights` (parameters on meta).
        checkpoint: a .safetensors file, a folder with model.safetensors.index.json
            (sharded), or a folder of .safetensors files.
        device_map: "auto" (balanced over GPUs), "sequential" (fill GPUs in order), one
            device for everything ("cpu", 0, "disk"), or a dict from `infer_device_map`.
        dtype: floating weights are converted to it while loading; None: the dtype each
            parameter was built with.
        offload_dir: where disk blocks are written when they need a dtype conversion
            (otherwise they are read from the checkpoint files in place: keep those files
            while the model is in use).
        strict: fail on checkpoint tensors the model does not have (missing ones always fail).
        main_device, prefetch, release_after_use, max_memory, no_split_module_classes,
            ctx: as in `dispatch_model` and `infer_device_map`.

    Raises:
        InvalidArgumentError: no safetensors files, missing or unexpected tensors, shapes
            that differ, or disk blocks that need writing without `offload_dir`.
        UntrustedCheckpointError: the index names a file outside the checkpoint folder.

    >>> with accel.init_empty_weights():
    ...     model = GPT2LMHeadModel(config)
    >>> model = accel.load_checkpoint_and_dispatch(model, "gpt2-ckpt/", device_map="auto",
    ...                                            dtype="bf16", offload_dir="offload")
    """
    check_module("load_checkpoint_and_dispatch", "model", model)
    check_type("load_checkpoint_and_dispatch", "checkpoint", checkpoint, (str, os.PathLike),
               "the path of a .safetensors file or of a folder holding some")
    check_mapping("load_checkpoint_and_dispatch", "max_memory", max_memory,
                  "a dict from device (0, 'cuda:1', 'cpu') to bytes or '10GiB' (or None)",
                  optional=True)
    check_dispatch_options("load_checkpoint_and_dispatch", offload_dir, prefetch,
                           release_after_use)
    if max_memory is not None:  # read now, also where device_map is given and not inferred
        memory_budgets(max_memory)
    check_bool("load_checkpoint_and_dispatch", "strict", strict)
    check_context("load_checkpoint_and_dispatch", ctx, optional=True)
    raise_if_dispatched(model)
    files = checkpoint_files(checkpoint)
    as_dtype = to_dtype(dtype) if dtype is not None else None
    entries = _resolve_map(model, device_map, max_memory, no_split_module_classes, as_dtype,
                           prefetch, ctx)
    execution = execution_device_for(entries, main_device)
    plan = _match(model, files, strict)
    mapped: set[int] = set()
    for path, names in plan.items():
        mapped |= _load_file(model, path, names, entries, execution, as_dtype, offload_dir)
    require_materialized(model)
    move_resident(model, entries, execution)
    return attach_dispatch(model, entries, execution, mapped, prefetch=prefetch,
                           no_split_module_classes=no_split_module_classes,
                           release_after_use=release_after_use)


def checkpoint_files(checkpoint: str | os.PathLike[str]) -> dict[str, Path]:
    """Where each tensor of a checkpoint lives: tensor name -> safetensors file.

    Raises:
        UntrustedCheckpointError: the index names a file outside the folder.

    >>> checkpoint_files("gpt2-ckpt/")["lm_head.weight"]
    PosixPath('gpt2-ckpt/model-00002-of-00002.safetensors')
    """
    path = Path(checkpoint)
    if path.is_file() and path.suffix == ".safetensors":
        return {name: path for name in read_safetensors_header(path)}
    if path.is_dir() and (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        return index_files(path, weight_map, path / INDEX_FILE)
    shards = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not shards:
        raise InvalidArgumentError(
            f"{checkpoint} is not a .safetensors file nor a folder holding some (with or "
            f"without {INDEX_FILE}); save the model with safetensors (save_pretrained does)"
        )
    return {name: shard for shard in shards for name in read_safetensors_header(shard)}


def _resolve_map(model: nn.Module, device_map: Any, max_memory: Any, no_split: Any,
                 dtype: torch.dtype | None, prefetch: int, ctx: Context | None
                 ) -> dict[str, str]:
    if isinstance(device_map, str) and device_map in ("auto", "balanced", "sequential"):
        inferred = infer_device_map(model, max_memory, no_split, dtype,
                                    balanced=device_map != "sequential", ctx=ctx,
                                    prefetch=prefetch)
        return check_device_map(model, inferred)
    if isinstance(device_map, (str, int, torch.device)):
        try:
            return check_device_map(model, {"": device_name(device_map)})
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(
                f"device_map: {exc}; or 'auto', 'balanced', 'sequential', or a dict") from None
    return check_device_map(model, device_map)


def _match(model: nn.Module, files: Mapping[str, Path], strict: bool
           ) -> dict[Path, list[tuple[str, list[tuple[nn.Module, str, bool]]]]]:
    """Per file, the checkpoint tensors to read and the (module, attribute) slots they fill.

    A tied tensor needs to be in the checkpoint under one of its names only.
    """
    slots_by_tensor: dict[int, list[tuple[str, nn.Module, str, bool]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        persistent = set(module._buffers) - module._non_persistent_buffers_set
        for attr, param in module._parameters.items():
            if param is not None:
                slots_by_tensor.setdefault(id(param), []).append(
                    (prefix + attr, module, attr, True))
        for attr, buffer in module._buffers.items():
            if buffer is not None and attr in persistent:
                slots_by_tensor.setdefault(id(buffer), []).append(
                    (prefix + attr, module, attr, False))
    plan: dict[Path, list] = {}
    missing, used = [], set()
    for slots in slots_by_tensor.values():
        found = next((name for name, *_ in slots if name in files), None)
        if found is None:
            missing.append(slots[0][0])
            continue
        used.update(name for name, *_ in slots)
        plan.setdefault(files[found], []).append(
            (found, [(module, attr, is_param) for _, module, attr, is_param in slots]))
    unexpected = sorted(set(files) - used)
    if missing:
        raise InvalidArgumentError(f"the checkpoint lacks {len(missing)} tensors of the model "
                                   f"(first: {missing[:3]}); is it the checkpoint of this model?")
    if unexpected and strict:
        raise InvalidArgumentError(
            f"the checkpoint has {len(unexpected)} tensors the model does not (first: "
            f"{unexpected[:3]}); pass strict=False to ignore them"
        )
    return plan


def _load_file(model: nn.Module, path: Path, wanted: list, entries: Mapping[str, str],
               execution: torch.device, dtype: torch.dtype | None,
               offload_dir: str | os.PathLike[str] | None) -> set[int]:
    """Load one checkpoint file's tensors; returns the ids of parameters left mapped."""
    header = read_safetensors_header(path)
    wanted = sorted(wanted, key=lambda item: header[item[0]]["data_offsets"][0])  # file order
    to_write: list[tuple[str, list, torch.dtype]] = []
    mapped: set[int] = set()
    with safe_open(os.fspath(path), framework="pt") as file:
        for name, slots in wanted:
            source = file.get_tensor(name)
            _check_shape(name, source, slots)
            target_dtype = _target_dtype(source, slots, dtype)
            device = entries[owner_entry(name, entries)]
            is_param = slots[0][2]
            if device == DISK and is_param and target_dtype != source.dtype:
                to_write.append((name, slots, target_dtype))
                continue
            if device == DISK and is_param:
                mapped.add(id(_fill(slots, source)))
                continue
            run_on = device if is_accelerator(device) else (
                "cpu" if is_param else str(execution))
            _fill(slots, _copy_out(source, torch.device(run_on), target_dtype))
    if to_write:
        mapped |= _write_converted(path, to_write, offload_dir)
    return mapped


def _write_converted(path: Path, to_write: list, offload_dir: Any) -> set[int]:
    if offload_dir is None:
        raise InvalidArgumentError(
            f"disk blocks need their weights converted to {to_write[0][2]} ({to_write[0][0]} "
            "...): pass offload_dir=<a folder> for the converted files"
        )
    folder = Path(offload_dir)
    folder.mkdir(parents=True, exist_ok=True)
    dtypes = {name: target for name, _, target in to_write}
    with safe_open(os.fspath(path), framework="pt") as file:
        def fetch(name: str) -> torch.Tensor:
            source = file.get_tensor(name)
            converted = source.to(dtypes[name])
            release([source])
            return converted

        specs = [(name, file.get_slice(name).get_shape(), target) for name, target in
                 dtypes.items()]
        written = write_safetensors(folder / path.name, specs, fetch)
    views = map_safetensors(written, [name for name, _, _ in to_write])
    return {id(_fill(slots, views[name])) for name, slots, _ in to_write}


def _copy_out(source: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A copy of a mapped tensor on `device` at `dtype`, made chunk by chunk: each chunk's
    pages are dropped once copied, so host memory grows by the copy only."""
    value = torch.empty(source.shape, dtype=dtype, device=device)
    flat_source, flat_value = source.reshape(-1), value.view(-1)
    step = max(1, COPY_CHUNK_BYTES // source.element_size())
    for start in range(0, flat_source.numel(), step):
        chunk = flat_source[start:start + step]
        flat_value[start:start + step].copy_(chunk)
        release([chunk])
    return value


def _check_shape(name: str, source: torch.Tensor, slots: list) -> None:
    module, attr, is_param = slots[0]
    current = (module._parameters if is_param else module._buffers)[attr]
    if tuple(current.shape) != tuple(source.shape):
        raise InvalidArgumentError(
            f"{name} has shape {tuple(source.shape)} in the checkpoint but "
            f"{tuple(current.shape)} in the model; was the model built with the same config?"
        )


def _target_dtype(source: torch.Tensor, slots: list, dtype: torch.dtype | None) -> torch.dtype:
    module, attr, is_param = slots[0]
    current = (module._parameters if is_param else module._buffers)[attr]
    if not source.is_floating_point():
        return source.dtype
    return dtype if dtype is not None else current.dtype


def _fill(slots: list, value: torch.Tensor) -> torch.Tensor:
    """Put `value` in every slot of one (possibly tied) tensor; returns what was put."""
    module, attr, is_param = slots[0]
    if not is_param:
        for module, attr, _ in slots:
            module._buffers[attr] = value
        return value
    old = module._parameters[attr]
    if not old.is_meta:
        old.data = value
        return old
    # A meta parameter cannot take real data in place: one new Parameter for every owner
    # keeps tied weights tied.
    new = nn.Parameter(value, requires_grad=old.requires_grad)
    for module, attr, _ in slots:
        module._parameters[attr] = new
    return new
