"""`save_state`: model, optimizer, scheduler, loader, RNG states, step and extras, atomically.

Sequence (every rank): rank 0 picks the final name and a fresh ``NAME.tmp-ID`` directory;
every rank writes its files there, checksumming them as it writes, and fsyncs them; the
ranks agree that all writes succeeded and pool the files' sizes and checksums (the
files torch wrote for a sharded part are read back for theirs, split over the ranks);
rank 0 writes accel.json, fsyncs the directories, renames the temporary directory to its
final name and fsyncs the parent; the ranks agree once more before returning.
Tied weights are saved under one name (see `accel.checkpoint.ties`). A crash at any
point leaves the previous checkpoints as they were and at most a ``*.tmp-*`` directory,
which every reader ignores and the next save removes.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from torch import nn

from accel.backends import SHARDED_CHECKPOINT, backend_for, has_capability
from accel.checkpoint.common import (
    FORMAT,
    FORMAT_VERSION,
    agree,
    check_extras,
    file_records,
    on_main,
    versions,
)
from accel.checkpoint.export import unwrap_for_export
from accel.checkpoint.files import Record, replace_dir, tmp_path, write_json
from accel.checkpoint.folder import METADATA, CheckpointFolder, remove_partial
from accel.checkpoint.parts import rng_state, write_part, write_sharded_part
from accel.checkpoint.ties import drop_aliases, tied_aliases
from accel.context import Context
from accel.errors import IncompatibleOptionsError, InvalidArgumentError
from accel.transforms.optim import AccelOptimizer


def save_state(
    path: str | Path | CheckpointFolder, ctx: Context, *, model: nn.Module,
    optimizer: Any = None, scheduler: Any = None, loader: Any = None, rng: bool = True,
    step: int | None = None, **extra: Any,
) -> Path:
    """Save everything a run needs to resume exactly; call it on every rank.

    Args:
        path: the checkpoint directory, or a `CheckpointFolder` (the next number in it,
            rotating to its `total_limit`). An existing checkpoint at `path` is replaced.
        model, optimizer, scheduler: as returned by the transforms (any backend).
        loader: a `DistributedLoader`; its position is saved per rank.
        rng: save each rank's python, numpy, torch and CUDA generator states.
        step: the training step to record; default: the wrapped optimizer's real steps.
        extra: more objects with state_dict()/load_state_dict(), saved from rank 0
            under their keyword (load_state restores them by the same keyword).

    Returns:
        The final checkpoint directory (complete and durable on every rank's return).

    Raises:
        IncompatibleOptionsError: called in the middle of a gradient accumulation cycle.
        InvalidArgumentError: an object's state holds a value that is neither a tensor
            nor JSON (accel never pickles); the message names its key.

    >>> folder = accel.CheckpointFolder("runs/exp1", total_limit=3)
    >>> accel.save_state(folder, ctx, model=model, optimizer=optimizer, loader=loader)
    PosixPath('runs/exp1/checkpoint_000001')
    """
    check_extras(extra, "save_state")
    _check_at_boundary(optimizer)
    final, tmp = on_main(ctx, lambda: _begin(path), "preparing the checkpoint directory")
    sharded = has_capability(ctx, SHARDED_CHECKPOINT)
    error, saved, written = None, {}, {}
    try:
        saved, written = _write_all(tmp, ctx, model, optimizer, scheduler, loader, rng, step,
                                    extra, sharded)
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it
        error = exc
    agree(ctx, error, f"writing the checkpoint {final}")
    records = file_records(tmp, written, ctx)
    metadata = _metadata(ctx, saved, records, sharded)
    on_main(ctx, lambda: _commit(tmp, final, metadata, path), f"committing {final}")
    return final


def _check_at_boundary(optimizer: Any) -> None:
    accumulation = getattr(optimizer, "accumulation", None)
    if isinstance(optimizer, AccelOptimizer) and accumulation is not None and (
            accumulation.micro_step != 0):
        raise IncompatibleOptionsError(
            f"save_state in the middle of an accumulation cycle ({accumulation.micro_step} of "
            f"{accumulation.steps} micro-batches taken) would lose their partial gradients; "
            "save right after the optimizer step that ends a cycle (when "
            "optimizer.accumulation.micro_step == 0)")


def _begin(path: str | Path | CheckpointFolder) -> tuple[Path, Path]:
    if isinstance(path, CheckpointFolder):
        path.root.mkdir(parents=True, exist_ok=True)
        remove_partial(path.root)
        final = path.next_path()
    else:
        final = Path(path)
        _check_replaceable(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_partial(final.parent, final.name)
    tmp = tmp_path(final)
    tmp.mkdir()
    return final, tmp


def _check_replaceable(final: Path) -> None:
    if final.exists() and not (final / METADATA).is_file() and (
            not final.is_dir() or any(final.iterdir())):
        raise InvalidArgumentError(
            f"{final} exists and is not an accel checkpoint; save_state replaces only "
            "checkpoints: choose another path or remove it")


def _write_all(tmp: Path, ctx: Context, model: nn.Module, optimizer: Any, scheduler: Any,
               loader: Any, rng: bool, step: int | None, extra: dict[str, Any],
               sharded: bool) -> tuple[dict[str, Any], dict[str, Record]]:
    """Write this rank's files; (what was saved, their records by path)."""
    backend = backend_for(ctx)
    model_state, optimizer_state = backend.get_state_dict(model, optimizer, full=not sharded)
    # Optimizer state needs no such step: a tied parameter is one parameter, one entry.
    model_state, tied = drop_aliases(model_state, tied_aliases(unwrap_for_export(model, ctx)))
    records: dict[str, Record] = {}
    for name, tree in (("model", model_state), ("optimizer", optimizer_state)):
        if tree is None:
            continue
        if sharded:
            records.update(write_sharded_part(tmp, name, tree, ctx))
        elif ctx.is_main_process:
            records.update(write_part(tmp, name, tree))
    per_rank: dict[str, Any] = {}
    if rng:
        per_rank["rng"] = rng_state()
    if loader is not None:
        per_rank["loader"] = loader.state_dict()
    records.update(write_part(tmp, f"ranks/rank{ctx.rank}", per_rank))
    if step is None and isinstance(optimizer, AccelOptimizer):
        step = optimizer.real_steps
    if ctx.is_main_process:
        records.update(write_part(tmp, "state", _main_state(optimizer, scheduler, step, extra)))
    saved = {"model": True, "optimizer": optimizer is not None,
             "scheduler": scheduler is not None, "loader": loader is not None, "rng": rng,
             "extra": sorted(extra), "step": step, "tied": tied}
    return saved, records


def _main_state(optimizer: Any, scheduler: Any, step: int | None,
                extra: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = {"step": step, "extra": {
        name: value.state_dict() for name, value in extra.items()}}
    if isinstance(optimizer, AccelOptimizer):
        wrapper = {"real_steps": optimizer.real_steps}
        if optimizer.scaler is not None:
            wrapper["scaler"] = optimizer.scaler.state_dict()
        if optimizer.accumulation is not None:
            wrapper["accumulation"] = optimizer.accumulation.state_dict()
        state["optimizer_wrapper"] = wrapper
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    return state


def _metadata(ctx: Context, saved: dict[str, Any], records: dict[str, Any],
              sharded: bool) -> dict[str, Any]:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "world_size": ctx.world_size, "backend": ctx.backend,
        "strategy": None if ctx.strategy is None else repr(ctx.strategy)[:500],
        "precision": ctx.precision, "layout": "sharded" if sharded else "full",
        "step": saved.get("step"), "saved": {k: v for k, v in saved.items() if k != "step"},
        "checksum": "crc32", "files": records,
    }


def _commit(tmp: Path, final: Path, metadata: dict[str, Any],
            path: str | Path | CheckpointFolder) -> None:
    write_json(tmp / METADATA, metadata)
    replace_dir(tmp, final)  # a checkpoint already at `final` is swapped out, then deleted
    if isinstance(path, CheckpointFolder):
        path.rotate()
