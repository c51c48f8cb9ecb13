"""State dicts of a pipelined model, keyed by the unsplit model's names.

Every rank's model keeps the whole structure with other stages' blocks on the meta
device, so names are the unsplit model's: a checkpoint saved with 2 stages loads with 4,
or with none, and DCP reshards by name. A rank's own state is its real tensors (DTensor
shards under FSDP2); whole state (export, a full checkpoint) is gathered stage by stage
on rank 0 and sent back the same way, over the pipeline ranks of data-parallel row 0,
then within each stage's data-parallel group.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from accel.backends._state import _torch_optimizer


def get_state_dict(pipe: Any, optimizer: Any, *, full: bool
                   ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """This rank's stages (full=False), or every stage whole on rank 0 (full=True)."""
    model_state = own_tensors(pipe.module)
    optimizer_state = None
    if optimizer is not None:
        # torch keys optimizer state by name; its first call on a fresh optimizer gives the
        # state zero tensors (lr 0), so that a checkpoint has tensors to load into.
        optimizer_state = get_optimizer_state_dict(
            pipe.module, _torch_optimizer(optimizer),
            options=StateDictOptions(full_state_dict=full, cpu_offload=False))
    if not full:
        return model_state, optimizer_state
    model_state = {name: _whole(tensor) for name, tensor in model_state.items()}
    gathered = _to_rank0((model_state, _on_cpu(optimizer_state)), pipe)
    if gathered is None:
        return {}, None if optimizer is None else {}
    order = list(pipe.module.state_dict(keep_vars=True))
    models = merge_trees([stage_model for stage_model, _ in gathered])
    model_state = {name: models[name] for name in order if name in models}
    if optimizer is None:
        return model_state, None
    return model_state, merge_trees([stage_optimizer for _, stage_optimizer in gathered])


def set_state_dict(pipe: Any, optimizer: Any, model_state: Mapping[str, Any],
                   optimizer_state: Mapping[str, Any] | None, *, full: bool) -> None:
    """Load state in the form get_state_dict returns; with full=True, rank 0's is read."""
    if full:
        model_state, optimizer_state = _from_rank0(pipe, model_state, optimizer_state)
    live = own_tensors(pipe.module)
    with torch.no_grad():
        for name, target in live.items():
            if name in model_state:
                _copy_into(target, model_state[name])
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(
            pipe.module, _torch_optimizer(optimizer), dict(optimizer_state),
            options=StateDictOptions(full_state_dict=full, broadcast_from_rank0=False))


def own_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state this rank holds: every entry not on the meta device."""
    return {name: tensor for name, tensor in module.state_dict().items() if not tensor.is_meta}


def merge_trees(trees: list[Any]) -> Any:
    """One state tree from each stage's: dicts united, lists of names united in order,
    equal lists merged item by item; otherwise the first stage's value."""
    merged = trees[0]
    for tree in trees[1:]:
        merged = _merge(merged, tree)
    return merged


def _merge(first: Any, other: Any) -> Any:
    if isinstance(first, dict) and isinstance(other, dict):
        united = dict(first)
        for key, value in other.items():
            united[key] = _merge(united[key], value) if key in united else value
        return united
    if isinstance(first, list) and isinstance(other, list):
        if all(isinstance(item, str) for item in (*first, *other)):  # param group names
            return first + [item for item in other if item not in first]
        if len(first) == len(other):
            return [_merge(a, b) for a, b in zip(first, other, strict=True)]
    return first


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()


def _on_cpu(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {key: _on_cpu(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_on_cpu(value) for value in tree]
    return _whole(tree) if isinstance(tree, torch.Tensor) else tree


def _to_rank0(local: Any, pipe: Any) -> list[Any] | None:
    """Each stage's `local` on rank 0 (data-parallel row 0 sends; peers hold copies)."""
    if pipe.dp_rank != 0:
        return None
    gathered: list[Any] | None = [None] * pipe.pp_size if pipe.rank == 0 else None
    dist.gather_object(local, gathered, group=pipe.pp_group, group_dst=0)
    return gathered


def _from_rank0(pipe: Any, model_state: Mapping[str, Any],
                optimizer_state: Mapping[str, Any] | None) -> tuple[dict[str, Any], Any]:
    """This rank's part of the whole state rank 0 holds: stage leaders, then their peers."""
    piece: list[Any] = [None]
    if pipe.dp_rank == 0:
        names = [None] * pipe.pp_size if pipe.rank == 0 else None
        dist.gather_object(sorted(own_tensors(pipe.module)), names, group=pipe.pp_group,
                           group_dst=0)
        pieces = None
        if pipe.rank == 0:
            pieces = [_part_of(model_state, optimizer_state, set(own)) for own in names]
        dist.scatter_object_list(piece, pieces, group=pipe.pp_group, group_src=0)
    if pipe.dp_size > 1:
        dist.broadcast_object_list(piece, group=pipe.dp_group, group_src=0)
    return piece[0]


def _part_of(model_state: Mapping[str, Any], optimizer_state: Mapping[str, Any] | None,
             names: set[str]) -> tuple[dict[str, Any], Any]:
    model_part = {name: value for name, value in model_state.items() if name in names}
    if optimizer_state is None:
        return model_part, None
    # Optimizer state is keyed by parameter name; param groups list every name (torch
    # loads a rank's own from them).
    state = {name: value for name, value in optimizer_state.get("state", {}).items()
             if name in names}
    return model_part, {**optimizer_state, "state": state}


def _copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    if isinstance(target, DTensor) and not isinstance(source, DTensor):
        # A whole tensor: this rank keeps its own slice, nothing is sent.
        source = distribute_tensor(source.to(target.device, target.dtype), target.device_mesh,
                                   target.placements, src_data_rank=None)
    if isinstance(target, DTensor):
        target, source = target.to_local(), source.to_local()
    if target.data_ptr() != source.data_ptr():  # DCP loads into the tensors themselves
        target.copy_(source)
