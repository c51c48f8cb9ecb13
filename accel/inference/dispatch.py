"""dispatch_model: run a model whose blocks live on several devices, the CPU and disk.

Blocks on an accelerator stay there; their inputs are moved to them. Offloaded blocks
(on "cpu", or on "disk" as memory-mapped safetensors files) run on the execution device:
with an accelerator, their weights are copied there just in time and dropped after the
block's forward; on a CPU-only map, "cpu" blocks are simply resident and "disk" blocks
are zero-copy views of their files, read in just in time (and, when they do not all fit
in RAM, dropped from the process after use: `release_after_use`). A background thread
loads the next blocks while the current one computes (`prefetch`). Everything hangs off
torch forward hooks that `remove_dispatch` takes away.
"""

from __future__ import annotations

import dataclasses
import os
import re
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from accel.errors import InvalidArgumentError, TransformOrderError
from accel.inference.blocks import all_tensors, iter_blocks, no_split_classes, owner_entry
from accel.inference.device_map import check_device_map
from accel.inference.memory import (
    CPU,
    DISK,
    DeviceLike,
    available_ram,
    device_name,
    is_accelerator,
)
from accel.inference.offload import map_safetensors, write_safetensors
from accel.inference.units import CopyLoader, DispatchStats, MappedLoader, Schedule, Unit
from accel.validation import check_bool, check_int, check_module, check_type

# Disk blocks stay mapped between uses (release_after_use=None) while they all fit in
# this part of the available RAM: the page cache can then hold them from one pass to the
# next, and mapping them again every pass would only cost time.
KEEP_MAPPED_RAM_FRACTION = 0.5


@dataclasses.dataclass(eq=False)
class _Dispatch:
    """What `dispatch_model` attached to a model, so `remove_dispatch` can take it away."""

    device_map: dict[str, str]
    execution_device: torch.device
    schedule: Schedule
    handles: list[RemovableHandle]


#: dispatched model -> a weak reference to its _Dispatch, which the model's own root hook
#: holds (FSDP2 keeps its state so): nothing is set on the model, and this table keeps
#: neither alive (the state may hold the model itself, as a unit).
_DISPATCHED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _state_of(model: nn.Module) -> _Dispatch | None:
    link = _DISPATCHED.get(model)
    return link() if link is not None else None


def dispatch_model(model: nn.Module, device_map: Mapping[str, DeviceLike],
                   offload_dir: str | os.PathLike[str] | None = None, *,
                   main_device: DeviceLike | None = None, prefetch: int = 2,
                   no_split_module_classes: Iterable[str] | None = None,
                   release_after_use: bool | None = None) -> nn.Module:
    """Place `model`'s blocks as `device_map` says and hook them to run there; returns it.

    (in place) The model is modified, not copied, as FSDP2's `fully_shard` modifies it:
    its tensors move, its modules get forward hooks (`remove_dispatch` takes them away),
    and the parameters of blocks mapped to "disk" are written to `offload_dir` as
    safetensors files and replaced by memory-mapped views of them, which frees their memory.

    Args:
        device_map: module (or tensor) name -> 0 / "cuda:1" / "cpu" / "disk"; the output
            of `infer_device_map`, or your own. "" maps the whole model.
        offload_dir: folder for the files of "disk" blocks; needed when there are any.
        main_device: where offloaded blocks run; default: the first accelerator of the
            map, else the CPU.
        prefetch: offloaded blocks loaded ahead on a background thread while the current
            one computes; 0 loads each block on the calling thread when it is needed.
        no_split_module_classes: the blocks offloaded weights move in (default: the
            model's `_no_split_modules`, else each leaf module).
        release_after_use: drop a disk block's pages from this process after each use,
            so its memory stays near one block (True); or leave them mapped, as the
            kernel's page cache that it reclaims under memory pressure, which saves
            mapping them again for every forward (False). None: keep them while all disk
            blocks fit in half the available RAM, else drop them.

    Raises:
        TransformOrderError: the model is already dispatched (call `remove_dispatch`).
        InvalidArgumentError: the map misses tensors, splits tied ones, or names unknown
            modules; a "disk" block without `offload_dir`; weights still on meta.

    >>> model = accel.dispatch_model(model, {"transformer.h.0": "cpu", "": "disk"},
    ...                              offload_dir="offload")
    >>> logits = model(input_ids).logits
    """
    check_module("dispatch_model", "model", model)
    check_dispatch_options("dispatch_model", offload_dir, prefetch, release_after_use)
    entries = _validated(model, device_map, prefetch)
    execution = execution_device_for(entries, main_device)
    require_materialized(model)
    mapped = _offload_to_disk(model, entries, offload_dir)
    move_resident(model, entries, execution)
    return attach_dispatch(model, entries, execution, mapped, prefetch=prefetch,
                           no_split_module_classes=no_split_module_classes,
                           release_after_use=release_after_use)


def remove_dispatch(model: nn.Module) -> nn.Module:
    """Take away what `dispatch_model` attached: hooks and the prefetch thread.

    Weights stay where they are between forwards: accelerator blocks on their device,
    offloaded blocks on the CPU (disk blocks as views of their files, which stay in the
    offload folder).

    >>> model = accel.remove_dispatch(model)
    """
    check_module("remove_dispatch", "model", model)
    state = _state_of(model)
    if state is None:
        raise TransformOrderError("remove_dispatch: this model was not dispatched "
                                  "(dispatch_model / load_checkpoint_and_dispatch)")
    state.schedule.close()
    for handle in state.handles:
        handle.remove()
    del _DISPATCHED[model]
    return model


def dispatch_stats(model: nn.Module) -> DispatchStats:
    """How offloaded blocks were loaded so far: by the prefetch thread, or inline.

    >>> accel.dispatch_stats(model).prefetched
    48
    """
    check_module("dispatch_stats", "model", model)
    state = _state_of(model)
    if state is None:
        raise TransformOrderError("dispatch_stats: this model was not dispatched")
    return state.schedule.stats


def dispatched_device_map(model: nn.Module) -> dict[str, str] | None:
    """The device map a dispatched model runs with, or None when it is not dispatched."""
    state = _state_of(model)
    return dict(state.device_map) if state is not None else None


# --------------------------------------------------------------------------- placement


def check_dispatch_options(function: str, offload_dir: Any, prefetch: Any,
                           release_after_use: Any) -> None:
    """The options dispatch_model and load_checkpoint_and_dispatch share, checked first."""
    check_type(function, "offload_dir", offload_dir, (str, os.PathLike),
               "a folder path (or None)", optional=True)
    check_int(function, "prefetch", prefetch, minimum=0)
    check_bool(function, "release_after_use", release_after_use, optional=True)


def _validated(model: nn.Module, device_map: Mapping[str, DeviceLike], prefetch: int
               ) -> dict[str, str]:
    raise_if_dispatched(model)
    return check_device_map(model, device_map)


def raise_if_dispatched(model: nn.Module) -> None:
    if _state_of(model) is not None:
        raise TransformOrderError("this model is already dispatched; call "
                                  "accel.remove_dispatch(model) first")


def execution_device_for(entries: Mapping[str, str], main_device: DeviceLike | None
                         ) -> torch.device:
    """Where offloaded blocks run: `main_device`, else the map's first accelerator, else cpu."""
    if main_device is not None:
        try:
            name = device_name(main_device)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"main_device: {exc}") from None
        if name == DISK:
            raise InvalidArgumentError("main_device is where blocks run: a GPU or 'cpu', "
                                       "not 'disk'")
        return torch.device(name)
    accelerators = [d for d in entries.values() if is_accelerator(d)]
    return torch.device(accelerators[0] if accelerators else CPU)


def require_materialized(model: nn.Module) -> None:
    on_meta = [n for n, t in all_tensors(model).items() if t.is_meta]
    if on_meta:
        raise InvalidArgumentError(
            f"{len(on_meta)} tensors are on the meta device (first: {on_meta[0]}); load "
            "their weights with accel.load_checkpoint_and_dispatch instead of dispatch_model"
        )


def _offload_to_disk(model: nn.Module, entries: Mapping[str, str],
                     offload_dir: str | os.PathLike[str] | None) -> set[int]:
    """Write the parameters of "disk" entries to files and swap in mapped views of them."""
    disk_entries = [name for name, device in entries.items() if device == DISK]
    if not disk_entries:
        return set()
    if offload_dir is None:
        raise InvalidArgumentError(
            f"the device map puts {disk_entries[0]!r} on disk: pass offload_dir=<a folder> "
            "for its files"
        )
    folder = Path(offload_dir)
    folder.mkdir(parents=True, exist_ok=True)
    mapped: set[int] = set()
    for entry in disk_entries:
        params = {name: p for name, p in _entry_params(model, entries, entry)
                  if id(p) not in mapped}
        if not params:
            continue
        specs = [(name, p.shape, p.dtype) for name, p in params.items()]
        path = write_safetensors(folder / f"{_file_stem(entry)}.safetensors", specs,
                                 lambda name, params=params: params[name].data)
        views = map_safetensors(path, params)
        for name, param in params.items():
            param.data = views[name]
            mapped.add(id(param))
    return mapped


def _file_stem(entry: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", entry) or "model"


def _entry_params(model: nn.Module, entries: Mapping[str, str], entry: str
                  ) -> list[tuple[str, nn.Parameter]]:
    """The unique parameters an entry owns (not those of entries nested inside it)."""
    seen: dict[int, tuple[str, nn.Parameter]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if owner_entry(name, entries) == entry and id(param) not in seen:
            seen[id(param)] = (name, param)
    return list(seen.values())


def move_resident(model: nn.Module, entries: Mapping[str, str], execution: torch.device
                  ) -> None:
    """Move every accelerator entry's tensors to it; offloaded "cpu" weights to the CPU;
    buffers of offloaded entries to the execution device (they are never offloaded)."""
    for name, param in model.named_parameters(remove_duplicate=False):
        device = entries[owner_entry(name, entries)]
        if device != DISK:
            param.data = param.data.to(device)
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for buffer_name, buffer in list(module.named_buffers(recurse=False)):
            device = entries[owner_entry(prefix + buffer_name, entries)]
            target = device if is_accelerator(device) else execution
            module._buffers[buffer_name] = buffer.to(target)


# --------------------------------------------------------------------------- hooks


def attach_dispatch(model: nn.Module, entries: dict[str, str], execution: torch.device,
                    mapped: set[int], *, prefetch: int,
                    no_split_module_classes: Iterable[str] | None,
                    release_after_use: bool | None) -> nn.Module:
    """Hook a model whose weights are already placed (the last step of both entry points).

    `mapped` holds the ids of parameters that are memory-mapped views (disk blocks).
    """
    units = _build_units(model, entries, mapped, no_split_classes(model, no_split_module_classes))
    release = _release_pages(units, release_after_use)
    loader = (MappedLoader(release) if execution.type == "cpu"
              else CopyLoader(execution, release))
    schedule = Schedule(units, loader, prefetch)
    run_on = {name: device if is_accelerator(device) else str(execution)
              for name, device in entries.items()}
    move_inputs = len(set(run_on.values())) > 1
    state = _Dispatch(dict(entries), execution, schedule, handles=[])
    handles = state.handles
    handles.extend(_hook_root(model, state, move_inputs))
    modules = dict(model.named_modules(remove_duplicate=False))
    if move_inputs:
        for name, device in run_on.items():
            module = modules[name] if name in modules else modules[name.rpartition(".")[0]]
            handles.append(module.register_forward_pre_hook(
                _mover(torch.device(device)), with_kwargs=True))
    for unit in units:
        handles.append(unit.module.register_forward_pre_hook(
            lambda module, args, kwargs, unit=unit: schedule.enter(unit), with_kwargs=True))
        handles.append(unit.module.register_forward_hook(
            lambda module, args, output, unit=unit: schedule.leave(unit), always_call=True))
    _DISPATCHED[model] = weakref.ref(state)
    return model


def _hook_root(model: nn.Module, state: _Dispatch, move_outputs: bool
               ) -> list[RemovableHandle]:
    # These hooks hold the state: it lives as long as the model keeps them.
    input_devices: list[torch.device | None] = []

    def start(module: nn.Module, args: tuple, kwargs: dict) -> None:
        state.schedule.start_pass()
        input_devices.append(_first_device((args, kwargs)) if move_outputs else None)

    def finish(module: nn.Module, args: tuple, output: Any) -> Any:
        state.schedule.end_pass()
        device = input_devices.pop() if input_devices else None
        return _move(output, device) if device is not None else None

    return [model.register_forward_pre_hook(start, with_kwargs=True),
            model.register_forward_hook(finish, always_call=True)]


def _build_units(model: nn.Module, entries: Mapping[str, str], mapped: set[int],
                 no_split: frozenset[str]) -> list[Unit]:
    """One unit per block of every offloaded entry, in the device map's order."""
    modules = dict(model.named_modules(remove_duplicate=False))
    units: dict[str, Unit] = {}
    offloaded = [name for name, device in entries.items()
                 if device == DISK or (device == CPU and _runs_elsewhere(entries))]
    for entry in offloaded:
        if entry in modules:
            blocks = iter_blocks(modules[entry], entry, no_split)
        else:  # a single tensor: its owner runs it
            owner = entry.rpartition(".")[0]
            blocks = iter([(owner, modules[owner], True)])
        for block_name, module, direct_only in blocks:
            prefix = f"{block_name}." if block_name else ""
            params = [p for n, p in module.named_parameters(
                prefix=prefix.rstrip("."), recurse=not direct_only, remove_duplicate=False)
                if owner_entry(n, entries) == entry]
            if not params:
                continue
            unit = units.setdefault(block_name, Unit(len(units), block_name, module, [], [], []))
            for param in params:
                if all(param is not p for p in unit.params):
                    unit.params.append(param)
                    unit.sources.append(param.data)
                    if id(param) in mapped:
                        unit.mapped.append(param.data)
    return list(units.values())


def _release_pages(units: list[Unit], release_after_use: bool | None) -> bool:
    if release_after_use is not None:
        return bool(release_after_use)
    mapped = {id(t): t.numel() * t.element_size() for unit in units for t in unit.mapped}
    return sum(mapped.values()) > available_ram() * KEEP_MAPPED_RAM_FRACTION


def _runs_elsewhere(entries: Mapping[str, str]) -> bool:
    # "cpu" blocks need loading only when blocks run on an accelerator.
    return any(is_accelerator(device) for device in entries.values())


def _mover(device: torch.device):
    def move_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _move(args, device), _move(kwargs, device)

    return move_inputs


def _move(data: Any, device: torch.device) -> Any:
    """Tensors inside lists, tuples and dicts moved to `device`; other objects untouched
    (a transformers KV cache keeps each layer's tensors on that layer's device)."""
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=data.device.type == "cpu" and data.is_pinned())
    if isinstance(data, (list, tuple)):
        moved = [_move(item, device) for item in data]
        return type(data)(*moved) if hasattr(data, "_fields") else type(data)(moved)
    if isinstance(data, dict):
        moved_items = {key: _move(value, device) for key, value in data.items()}
        try:
            return type(data)(**moved_items) if type(data) is not dict else moved_items
        except TypeError:
            for key, value in moved_items.items():
                data[key] = value
            return data
    return data


def _first_device(data: Any) -> torch.device | None:
    if isinstance(data, torch.Tensor):
        return data.device
    values = data.values() if isinstance(data, dict) else data
    if isinstance(values, (list, tuple)) or isinstance(data, dict):
        for item in values:
            found = _first_device(item)
            if found is not None:
                return found
    return None
