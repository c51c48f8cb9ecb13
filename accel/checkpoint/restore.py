"""Put one model's (and its optimizer's) saved state into the engine now training it.

Checkpoints come in two layouts, whatever engine wrote them: full (whole tensors,
written by rank 0: DDP, one process, DeepSpeed ZeRO 1/2/3) and sharded (each rank's
shards through torch.distributed.checkpoint: FSDP2, TP x FSDP). Every engine loads
either one, so a checkpoint moves from any engine to any other:

- full, into any engine: rank 0 hands the whole tensors to the engine, which broadcasts
  and shards them (`set_state_dict(full=True)`);
- sharded, into an engine with a native sharded form (FSDP2, DDP, one process): each rank
  reads the pieces its shards need, on any number of processes;
- sharded, into an engine without one (DeepSpeed keeps flat partitions of its own):
  rank 0 reads the tensors whole, and the engine takes them as from a full checkpoint.

A partial checkpoint (saved with ``select=``, loaded with strict=False) fills in what it
holds; the model's other tensors, and their optimizer state, keep their current values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from accel.backends import backend_for
from accel.checkpoint.files import read_json
from accel.checkpoint.nodes import own_shards
from accel.checkpoint.parts import load_sharded_tensors, read_sharded_part
from accel.checkpoint.ties import drop_aliases, restore_aliases
from accel.checkpoint.tree import unflatten
from accel.context import Context
from accel.errors import UnsupportedError


def load_model_and_optimizer(final: Path, metadata: dict[str, Any], saved: dict[str, Any],
                             ctx: Context, parts: dict[str, Any], *, name: str,
                             model: nn.Module, optimizer: Any, partial: bool) -> None:
    """Load model `name` (and `optimizer`) from the checkpoint `final` (a collective)."""
    backend = backend_for(ctx)
    entry = saved["models"][name]
    # Tied weights were saved under one name: the alias gets the kept name's tensor back.
    tied = entry.get("tied", {})
    model_part = entry["part"]
    optimizer_part = saved["optimizers"][name]["part"] if optimizer is not None else None
    if metadata["layout"] == "full":
        model_state = restore_aliases(parts.get(model_part, {}), tied)
        optimizer_state = parts.get(optimizer_part, {}) if optimizer is not None else None
        _load_full(ctx, model, optimizer, model_state, optimizer_state, partial)
        return
    try:
        model_target, optimizer_target = backend.get_state_dict(model, optimizer, full=False)
    except UnsupportedError:  # no native sharded form: through whole tensors on rank 0
        model_state, optimizer_state = _read_whole(final, model_part, optimizer_part, ctx)
        _load_full(ctx, model, optimizer, restore_aliases(model_state, tied), optimizer_state,
                   partial)
        return

    def read(part: str, target: Any) -> Any:
        if metadata["layout"] == "per-rank":  # this rank's own shards, read already
            return own_shards(parts[part], target)
        return read_sharded_part(final, part, target, ctx, partial=partial)

    kept_target, _ = drop_aliases(model_target, tied)
    model_state = restore_aliases(read(model_part, kept_target), tied)
    optimizer_state = (read(optimizer_part, optimizer_target) if optimizer is not None
                       else None)
    if partial:  # the target holds every tensor, the checkpoint's now loaded into it
        model_state = {**model_target, **model_state}
        optimizer_state = _merge_optimizer(optimizer_target, optimizer_state)
    backend.set_state_dict(model, optimizer, model_state, optimizer_state, full=False)


def _load_full(ctx: Context, model: nn.Module, optimizer: Any, model_state: dict[str, Any],
               optimizer_state: dict[str, Any] | None, partial: bool) -> None:
    """Whole tensors (on rank 0; {} elsewhere) into the engine, which shares them out."""
    backend = backend_for(ctx)
    if partial:  # what the checkpoint lacks comes from the model as it is now
        current_model, current_optimizer = backend.get_state_dict(model, optimizer, full=True)
        if ctx.is_main_process:
            model_state = {**current_model, **model_state}
            optimizer_state = _merge_optimizer(current_optimizer, optimizer_state)
    backend.set_state_dict(model, optimizer, model_state, optimizer_state, full=True)


def _merge_optimizer(current: dict[str, Any] | None, saved: dict[str, Any] | None
                     ) -> dict[str, Any] | None:
    """The saved optimizer state, with the current state of the parameters it lacks."""
    if current is None or saved is None:
        return saved
    return {**saved, "state": {**current.get("state", {}), **saved.get("state", {})}}


def _read_whole(final: Path, model_part: str, optimizer_part: str | None, ctx: Context
                ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Sharded parts as whole tensors on rank 0's CPU ({} on the other ranks)."""
    if not ctx.is_main_process:
        return {}, ({} if optimizer_part is not None else None)

    def whole(part: str) -> Any:
        return unflatten(read_json(final / f"{part}.json"), load_sharded_tensors(final / part),
                         source=str(final / part))

    return whole(model_part), (whole(optimizer_part) if optimizer_part is not None else None)
