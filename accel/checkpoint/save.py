"""`save_state`: model, optimizer, scheduler, loader, RNG states, step and extras, atomically.

Sequence (every rank): rank 0 makes a fresh temporary directory beside the target
(``NAME.tmp-HOST-PID-ID``, see `accel.checkpoint.staging`); every rank writes its files
there, checksumming them as it writes, and fsyncs them; the ranks agree that all writes
succeeded and pool the files' sizes and checksums (the files torch wrote for a sharded
part are read back for theirs, split over the ranks); rank 0 writes accel.json, fsyncs
the directories and moves the directory into place: onto the next free number of a
`CheckpointFolder`, or swapped with the checkpoint at a plain path (`staging.swap_in`);
the ranks agree once more before returning. Tied weights are saved under one name (see
`accel.checkpoint.ties`). A crash at any point leaves the previous checkpoints as they
were and at most a temporary directory, which every reader ignores and a later save
removes once it is stale. A save that fails (a full disk) removes its temporary
directory at once and raises `CheckpointSaveError` on every rank.
"""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor

from accel.backends import SHARDED_CHECKPOINT, backend_for, has_capability
from accel.checkpoint.common import (
    FORMAT,
    FORMAT_VERSION,
    check_checkpoint_arguments,
    check_extras,
    describe_error,
    file_records,
    on_main,
    raise_failures,
    versions,
)
from accel.checkpoint.export import unwrap_for_export
from accel.checkpoint.files import METADATA, Record, fsync_dirs, write_json
from accel.checkpoint.folder import CheckpointFolder
from accel.checkpoint.parts import rng_state, write_part, write_sharded_part
from accel.checkpoint.staging import finish, new_staging, remove_stale, swap_in
from accel.checkpoint.ties import drop_aliases, tied_aliases
from accel.checkpoint.validate import optimizer_class, scheduler_class
from accel.context import Context
from accel.errors import CheckpointSaveError, IncompatibleOptionsError, InvalidArgumentError
from accel.inference.memory import format_size
from accel.runtime import ops
from accel.transforms.optim import AccelOptimizer
from accel.validation import check_int


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
    check_checkpoint_arguments("save_state", path, ctx, model, rng=rng)
    check_int("save_state", "step", step, minimum=0, optional=True)
    check_extras(extra, "save_state")
    _check_at_boundary(optimizer)
    tmp = on_main(ctx, lambda: _begin(path), "preparing the checkpoint directory")
    target = path.root if isinstance(path, CheckpointFolder) else Path(path)
    sharded = has_capability(ctx, SHARDED_CHECKPOINT)
    try:
        error, saved, written = None, {}, {}
        try:
            saved, written = _write_all(tmp, ctx, model, optimizer, scheduler, loader, rng,
                                        step, extra, sharded)
        except (Exception, CheckpointException) as exc:  # every rank must hear of it
            error = exc
        _agree_written(ctx, error, tmp, target, _state_bytes(model, optimizer, ctx), sharded)
        records = file_records(tmp, written, ctx)
        metadata = _metadata(ctx, saved, records, sharded)
        return on_main(ctx, lambda: _commit(tmp, path, metadata), f"committing {target}")
    finally:
        if ctx.is_main_process:  # after a commit nothing is left there
            finish(tmp, remove=True)


def _check_at_boundary(optimizer: Any) -> None:
    accumulation = getattr(optimizer, "accumulation", None)
    if isinstance(optimizer, AccelOptimizer) and accumulation is not None and (
            accumulation.micro_step != 0):
        raise IncompatibleOptionsError(
            f"save_state in the middle of an accumulation cycle ({accumulation.micro_step} of "
            f"{accumulation.steps} micro-batches taken) would lose their partial gradients; "
            "save right after the optimizer step that ends a cycle (when "
            "optimizer.accumulation.micro_step == 0)")


def _begin(path: str | Path | CheckpointFolder) -> Path:
    """Make the temporary directory a save writes into; clear stale ones first."""
    if isinstance(path, CheckpointFolder):
        path.root.mkdir(parents=True, exist_ok=True)
        path.clean()
        return new_staging(path.staging)
    final = Path(path)
    _check_replaceable(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # A complete one may be the only copy left by a save killed mid-swap: kept until
    # this save's checkpoint is in place (see _commit).
    remove_stale(final.parent, final.name.__eq__, keep_complete=True)
    return new_staging(final)


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
             "extra": sorted(extra), "step": step, "tied": tied,
             "optimizer_class": optimizer_class(optimizer),
             "scheduler_class": scheduler_class(scheduler)}
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


def _agree_written(ctx: Context, error: BaseException | None, tmp: Path, target: Path,
                   size: int, sharded: bool) -> None:
    """Every rank learns whether every rank wrote its files; if one did not, rank 0 removes
    `tmp` and every rank raises (`size`: this rank's share of the state, in bytes).

    Raises:
        CheckpointSaveError: a rank could not write (disk full, ...): names the space
            free and needed.
        AccelError: a rank failed otherwise (a state that cannot be saved): its error.
    """
    reports = ops.gather_object({"error": _summary(error, ctx.rank), "bytes": size,
                                 "io": isinstance(error, (OSError, CheckpointException))},
                                ctx, ranks="all")
    failed = [(rank, report) for rank, report in enumerate(reports) if report["error"]]
    if not failed:
        return
    free = on_main(ctx, lambda: _discard(tmp), f"removing {tmp}")
    writes = [(rank, report["error"]) for rank, report in failed if report["io"]]
    if not writes:
        raise_failures(error, reports, f"writing the checkpoint {target}")
    needed = sum(report["bytes"] for report in reports) if sharded else reports[0]["bytes"]
    raise _save_error(target, tmp, writes[0][1], free, needed, error) from error


def _commit(tmp: Path, path: str | Path | CheckpointFolder, metadata: dict[str, Any]) -> Path:
    """Write accel.json and move `tmp` into place; the final path."""
    folder = path if isinstance(path, CheckpointFolder) else None
    final = Path(path) if folder is None else None
    try:
        write_json(tmp / METADATA, metadata)
        fsync_dirs(tmp)
        if folder is not None:
            final = folder.commit(tmp)
        else:
            swap_in(tmp, final)
    except OSError as exc:
        needed = sum(record["bytes"] for record in metadata["files"].values())
        where = folder.root if folder is not None else final
        raise _save_error(where, tmp, _summary(exc, 0), _discard(tmp), needed, exc) from exc
    if folder is not None:
        folder.rotate()
    else:  # now that it is in place, what an interrupted earlier swap left may go
        remove_stale(final.parent, final.name.__eq__, keep_complete=False)
    return final


def _discard(tmp: Path) -> int:
    """Remove a failed save's temporary directory; the bytes then free on its filesystem."""
    shutil.rmtree(tmp, ignore_errors=True)
    return shutil.disk_usage(tmp.parent).free


def _save_error(target: Path, tmp: Path, cause: str, free: int, needed: int,
                error: BaseException | None) -> CheckpointSaveError:
    failure = CheckpointSaveError(
        f"could not save the checkpoint {target}: {cause}. {tmp.parent} has "
        f"{format_size(free)} free and the checkpoint needs about {format_size(needed)}; "
        f"its partial folder {tmp.name} was removed. Free space, save elsewhere, or keep "
        "fewer checkpoints (CheckpointFolder(..., total_limit=N))")
    failure.errno = getattr(error, "errno", None)  # ENOSPC, where this rank saw it
    return failure


def _summary(error: BaseException | None, rank: int) -> str | None:
    """"rank R: Type: message" of `error` (on `rank`); for torch's CheckpointException,
    each failed rank's own error."""
    if error is None:
        return None
    failures = error.failures if isinstance(error, CheckpointException) else {rank: (error,)}
    return "; ".join(f"rank {failed}: {describe_error(failure[0])}"
                     for failed, failure in sorted(failures.items()))


def _state_bytes(model: nn.Module, optimizer: Any, ctx: Context) -> int:
    """About how many bytes this rank's model and optimizer tensors take (a shard's own)."""
    tensors = list(unwrap_for_export(model, ctx).state_dict(keep_vars=True).values())
    for entry in getattr(optimizer, "state", {}).values():
        if isinstance(entry, dict):
            tensors += [value for value in entry.values() if isinstance(value, torch.Tensor)]
    return sum(_local(tensor).numel() * tensor.element_size() for tensor in tensors)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
