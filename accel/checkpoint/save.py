"""`save_state`: models, optimizers, schedulers, loaders, RNG states, step and extras, atomically.

Sequence (every rank): rank 0 makes a fresh temporary directory beside the target
(``NAME.tmp-HOST-PID-ID``, see `accel.checkpoint.staging`); the state is taken
(`accel.checkpoint.snapshot`; for a save in the background, copied, and the rest runs
on a thread, see `accel.checkpoint.background`); every rank writes its files there,
checksumming them as it writes, and fsyncs them; the ranks agree that all writes
succeeded and pool the files' sizes and checksums (the files torch wrote for a sharded
part are read back for theirs, split over the ranks); rank 0 writes accel.json, fsyncs
the directories and moves the directory into place: onto the next free number of a
`CheckpointFolder`, or swapped with the checkpoint at a plain path (`staging.swap_in`);
the ranks agree once more before returning. Tied weights are saved under one name (see
`accel.checkpoint.ties`). A crash at any point leaves the previous checkpoints as they
were and at most a temporary directory, which every reader ignores and a later save
removes once it is stale. A save that fails (a full disk) removes its temporary
directory at once and raises `CheckpointSaveError` on every rank. On node-local disks
(save_on_each_node=True) each node's local rank 0 plays rank 0's part for its node's
folder (`accel.checkpoint.nodes`).
"""

from __future__ import annotations

import datetime
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor

from accel.backends import SHARDED_CHECKPOINT, has_capability
from accel.checkpoint.background import (
    AsyncSave,
    background_context,
    release_steps,
    start,
    wait_in_flight,
)
from accel.checkpoint.checksum import ALGORITHM
from accel.checkpoint.common import (
    FORMAT,
    FORMAT_VERSION,
    check_checkpoint_arguments,
    check_extras,
    describe_error,
    file_records,
    raise_failures,
    versions,
)
from accel.checkpoint.export import unwrap_for_export
from accel.checkpoint.files import METADATA, Record, fsync_dirs, write_json
from accel.checkpoint.folder import CheckpointFolder
from accel.checkpoint.nodes import is_writer, on_writers
from accel.checkpoint.nodes import layout as node_layout
from accel.checkpoint.objects import KINDS, Objects, collect
from accel.checkpoint.parts import write_part, write_sharded_part
from accel.checkpoint.snapshot import Deferred, Snapshot, stage, take
from accel.checkpoint.staging import finish, new_staging, remove_stale, swap_in
from accel.context import Context
from accel.errors import CheckpointSaveError, IncompatibleOptionsError, InvalidArgumentError
from accel.inference.memory import format_size
from accel.runtime import ops
from accel.transforms.optim import AccelOptimizer
from accel.validation import check_bool, check_callable, check_int


def save_state(
    path: str | Path | CheckpointFolder, ctx: Context, *, model: nn.Module | None = None,
    optimizer: Any = None, scheduler: Any = None, loader: Any = None,
    models: dict[str, nn.Module] | None = None, optimizers: dict[str, Any] | None = None,
    schedulers: dict[str, Any] | None = None, loaders: dict[str, Any] | None = None,
    rng: bool = True, step: int | None = None, select: Callable[[str], bool] | None = None,
    blocking: bool = True, staging: str = "copy", save_on_each_node: bool = False,
    **extra: Any,
) -> Path | AsyncSave:
    """Save everything a run needs to resume exactly; call it on every rank.

    Args:
        path: the checkpoint directory, or a `CheckpointFolder` (the next number in it,
            rotating to its `total_limit`). An existing checkpoint at `path` is replaced.
        model, optimizer, scheduler: as returned by the transforms (any backend).
        loader: a `DistributedLoader`; its position is saved per rank.
        models, optimizers, schedulers, loaders: instead of the four above, any number
            of each by name (``models={"generator": g, "discriminator": d}``); an
            optimizer is named after the model it steps. `load_state` takes them back
            by the same names.
        rng: save each rank's python, numpy, torch and CUDA generator states.
        step: the training step to record; default: the (first) wrapped optimizer's
            real steps.
        select: save only the model tensors whose state name it returns True for (and
            their optimizer state), e.g. a LoRA adapter: ``select=lambda name: "lora_"
            in name``; load such a checkpoint with ``load_state(..., strict=False)``.
        blocking: False returns an `AsyncSave` handle as soon as the state is copied
            (to pinned host memory from a GPU), and writes, checksums and commits it
            in the background; the next save, a load or `accel.shutdown` waits for it
            (so does ``handle.wait()``), and raises its error if it failed.
        staging: with blocking=False, when the state is copied. "copy": all of it
            before save_state returns (the stall: one copy of the state, at memory
            speed). "overlap": only what forward and backward may change (buffers,
            tensors not stepped by a torch optimizer, rng, loader, scheduler) before it
            returns; the parameters and state a torch optimizer steps are copied in
            the background while the next forward and backward run, and the next
            optimizer step (any torch optimizer's) waits until they are. Until then
            change the parameters only through the optimizer: an in-place change is
            detected and fails the save, a write through ``.data`` is not. Single
            process, DDP and FSDP2.
        save_on_each_node: `path` is on each node's own disk (no shared filesystem):
            each node writes what its ranks need to load; such a checkpoint loads on
            the same node layout only (see `accel.checkpoint.nodes` for the limits).
        extra: more objects with state_dict()/load_state_dict(), saved from rank 0
            under their keyword (load_state restores them by the same keyword).

    Returns:
        The final checkpoint directory (complete and durable on every rank's return),
        or with blocking=False an `AsyncSave` whose ``wait()`` returns it.

    Raises:
        IncompatibleOptionsError: called in the middle of a gradient accumulation cycle.
        InvalidArgumentError: an object's state holds a value that is neither a tensor
            nor JSON (accel never pickles); the message names its key.

    >>> folder = accel.CheckpointFolder("runs/exp1", total_limit=3)
    >>> accel.save_state(folder, ctx, model=model, optimizer=optimizer, loader=loader)
    PosixPath('runs/exp1/checkpoint_000001')
    >>> accel.save_state(folder, ctx, models={"g": g, "d": d}, optimizers={"g": opt_g, "d": opt_d})
    PosixPath('runs/exp1/checkpoint_000002')
    """
    objects = _check_arguments(path, ctx, locals(), extra)
    wait_in_flight()  # the previous save still writing in the background (raises its error)
    for each in objects.optimizers.values():
        _check_at_boundary(each)
    node_local = save_on_each_node
    tmp = on_writers(ctx, lambda: _begin(path), "preparing the checkpoint directory",
                     node_local)
    job = _Job(path=path, tmp=tmp, layout=_layout(ctx, node_local), node_local=node_local,
               size=_state_bytes(objects, ctx))
    error, snapshot, deferred = None, None, Deferred()
    try:
        snapshot = take(ctx, objects, rng=rng, step=step, extra=extra, select=select,
                        layout=job.layout, writer=is_writer(ctx, node_local))
        if not blocking:
            snapshot, deferred = stage(snapshot, objects, ctx, overlap=staging == "overlap")
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it
        error = exc
    if blocking:
        return _write_and_commit(ctx, job, snapshot, error)
    try:
        _agree_written(ctx, error, job)
    except BaseException:
        if is_writer(ctx, node_local):
            finish(tmp, remove=True)
        raise
    quiet = background_context(ctx)

    def work() -> Path:
        try:
            deferred.run()
            staged_error = None
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it
            staged_error = exc
        finally:
            release_steps()
        return _write_and_commit(quiet, job, snapshot, staged_error)

    return start(work, holds_steps=bool(deferred.copies))


@attrs.frozen
class _Job:
    """Where a save goes and how it is laid out."""

    path: str | Path | CheckpointFolder
    tmp: Path
    #: "full", "sharded" (torch DCP) or "per-rank" (each rank's shards, node-local disks)
    layout: str
    node_local: bool
    #: this rank's share of the state, in bytes (for the message of a full disk)
    size: int

    @property
    def target(self) -> Path:
        return self.path.root if isinstance(self.path, CheckpointFolder) else Path(self.path)


def _layout(ctx: Context, node_local: bool) -> str:
    if not has_capability(ctx, SHARDED_CHECKPOINT):
        return "full"
    return "per-rank" if node_local else "sharded"


def _check_arguments(path: Any, ctx: Any, given: dict[str, Any], extra: dict[str, Any]
                     ) -> Objects:
    check_checkpoint_arguments("save_state", path, ctx, rng=given["rng"])
    check_int("save_state", "step", given["step"], minimum=0, optional=True)
    check_callable("save_state", "select", given["select"],
                   "a function of a state name returning True to save it", optional=True)
    check_bool("save_state", "blocking", given["blocking"])
    _check_staging(given["staging"], given["blocking"], ctx)
    check_bool("save_state", "save_on_each_node", given["save_on_each_node"])
    check_extras(extra, "save_state")
    return collect("save_state", {kind: given[kind] for kind in KINDS},
                   {f"{kind}s": given[f"{kind}s"] for kind in KINDS})


def _check_staging(staging: Any, blocking: bool, ctx: Context) -> None:
    if staging not in ("copy", "overlap"):
        raise InvalidArgumentError(
            f"save_state(staging={staging!r}): pass 'copy' (the whole state copied before "
            "it returns) or 'overlap' (the stepped tensors copied during the next forward "
            "and backward)")
    if staging == "overlap" and blocking:
        raise IncompatibleOptionsError(
            "save_state(staging='overlap') stages a save in the background: pass "
            "blocking=False with it")
    if staging == "overlap" and ctx.backend not in _OVERLAP_ENGINES:
        raise IncompatibleOptionsError(
            f"save_state(staging='overlap') is not available under {ctx.backend!r}, whose "
            "optimizer step changes tensors outside a torch optimizer's step; use "
            f"staging='copy' (engines with it: {', '.join(_OVERLAP_ENGINES)})")


#: engines whose saved tensors change only in a torch optimizer's step (and forward's
#: buffers, which are copied at once)
_OVERLAP_ENGINES = ("single", "ddp", "fsdp")


def _write_and_commit(ctx: Context, job: _Job, snapshot: Snapshot | None,
                      error: BaseException | None) -> Path:
    """Write this rank's files of `snapshot`, agree, and commit (a collective)."""
    try:
        written: dict[str, Record] = {}
        if error is None and snapshot is not None:
            try:
                written = _write(job.tmp, snapshot, ctx)
            except (Exception, CheckpointException) as exc:  # every rank must hear of it
                error = exc
        _agree_written(ctx, error, job)
        records = file_records(job.tmp, written, ctx, node_local=job.node_local)
        metadata = _metadata(ctx, snapshot, records, job)
        number = _agreed_number(ctx, job)
        return on_writers(ctx, lambda: _commit(job.tmp, job.path, metadata, number),
                          f"committing {job.target}", job.node_local)
    finally:
        if is_writer(ctx, job.node_local):  # after a commit nothing is left there
            finish(job.tmp, remove=True)


def _agreed_number(ctx: Context, job: _Job) -> int | None:
    """The number of a node-local save into a CheckpointFolder: the same on every node."""
    if not (job.node_local and isinstance(job.path, CheckpointFolder)):
        return None
    folder = job.path
    proposed = folder.number_of(folder.next_path()) if ctx.is_local_main_process else 0
    return max(ops.gather_object([proposed], ctx, ranks="all"))


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


def _write(tmp: Path, snapshot: Snapshot, ctx: Context) -> dict[str, Record]:
    """Write this rank's files; their records by path (the sharded parts' come later)."""
    records: dict[str, Record] = {}
    for part, tree in sorted(snapshot.sharded.items()):  # collective: the same order
        records.update(write_sharded_part(tmp, part, tree, ctx))
    for part, tree in snapshot.full.items():
        records.update(write_part(tmp, part, tree))
    records.update(write_part(tmp, f"ranks/rank{ctx.rank}", snapshot.per_rank))
    main = snapshot.main_state()
    if main is not None:
        records.update(write_part(tmp, "state", main))
    return records


def _metadata(ctx: Context, snapshot: Snapshot | None, records: dict[str, Any],
              job: _Job) -> dict[str, Any]:
    assert snapshot is not None  # a failed snapshot was raised by _agree_written
    nodes = {"nodes": node_layout(ctx)} if job.node_local else {}
    return {**nodes,
        "format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "world_size": ctx.world_size, "backend": ctx.backend,
        "strategy": None if ctx.strategy is None else repr(ctx.strategy)[:500],
        "precision": ctx.precision, "layout": job.layout,
        "step": snapshot.step, "saved": snapshot.saved,
        "checksum": ALGORITHM, "files": records,
    }


def _agree_written(ctx: Context, error: BaseException | None, job: _Job) -> None:
    """Every rank learns whether every rank wrote its files; if one did not, the writers
    remove the temporary folder and every rank raises.

    Raises:
        CheckpointSaveError: a rank could not write: its error; for a full disk or
            quota, the space free and needed.
        AccelError: a rank failed otherwise (a state that cannot be saved): its error.
    """
    reports = ops.gather_object({"error": _summary(error, ctx.rank), "bytes": job.size,
                                 "io": isinstance(error, (OSError, CheckpointException))},
                                ctx, ranks="all")
    failed = [(rank, report) for rank, report in enumerate(reports) if report["error"]]
    if not failed:
        return
    free = on_writers(ctx, lambda: _discard(job.tmp), f"removing {job.tmp}", job.node_local)
    writes = [(rank, report["error"]) for rank, report in failed if report["io"]]
    if not writes:
        raise_failures(error, reports, f"writing the checkpoint {job.target}")
    needed = (reports[0]["bytes"] if job.layout == "full" else
              sum(report["bytes"] for report in reports))
    raise _save_error(job.target, job.tmp, writes[0][1], free, needed, error) from error


def _commit(tmp: Path, path: str | Path | CheckpointFolder, metadata: dict[str, Any],
            number: int | None = None) -> Path:
    """Write accel.json and move `tmp` into place (a folder's `number`, if given); the
    final path."""
    folder = path if isinstance(path, CheckpointFolder) else None
    final = Path(path) if folder is None else None
    try:
        write_json(tmp / METADATA, metadata)
        fsync_dirs(tmp)
        if folder is not None:
            final = folder.commit(tmp, number=number)
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
    space = (f"{tmp.parent} has {format_size(free)} free and the checkpoint needs about "
             f"{format_size(needed)}; ")
    if _out_of_space(cause, free, needed):
        advice = ("Free space, save elsewhere, or keep fewer checkpoints "
                  "(CheckpointFolder(..., total_limit=N))")
    else:  # permissions, a read-only or vanished filesystem: space is not the cause
        space, advice = "", "Fix the cause above, or save elsewhere"
    failure = CheckpointSaveError(
        f"could not save the checkpoint {target}: {cause}. {space}its partial folder "
        f"{tmp.name} was removed. {advice}")
    failure.errno = getattr(error, "errno", None)  # ENOSPC, where this rank saw it
    return failure


def _out_of_space(cause: str, free: int, needed: int) -> bool:
    """Any rank's error says the disk or quota is full (the cause holds each rank's
    message), or the folder has less room than the checkpoint needs."""
    return (free < needed or os.strerror(errno.ENOSPC) in cause
            or os.strerror(errno.EDQUOT) in cause)


def _summary(error: BaseException | None, rank: int) -> str | None:
    """"rank R: Type: message" of `error` (on `rank`); for torch's CheckpointException,
    each failed rank's own error."""
    if error is None:
        return None
    failures = error.failures if isinstance(error, CheckpointException) else {rank: (error,)}
    return "; ".join(f"rank {failed}: {describe_error(failure[0])}"
                     for failed, failure in sorted(failures.items()))


def _state_bytes(objects: Objects, ctx: Context) -> int:
    """About how many bytes this rank's models and optimizers take (a shard's own)."""
    tensors: list[torch.Tensor] = []
    for model in objects.models.values():
        tensors += unwrap_for_export(model, ctx).state_dict(keep_vars=True).values()
    for optimizer in objects.optimizers.values():
        for entry in getattr(optimizer, "state", {}).values():
            if isinstance(entry, dict):
                tensors += [value for value in entry.values() if isinstance(value, torch.Tensor)]
    return sum(_local(tensor).numel() * tensor.element_size() for tensor in tensors)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
