"""`load_state`: verify a checkpoint, then restore what `save_state` saved, on every rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from accel.backends import ENGINE_HOLDS_WEIGHTS, backend_for, has_capability
from accel.checkpoint.common import (
    CheckpointInfo,
    agree,
    check_checkpoint_arguments,
    check_extras,
    check_files,
    check_metadata,
    on_main,
)
from accel.checkpoint.export import unwrap_for_export
from accel.checkpoint.files import METADATA, Record, read_json
from accel.checkpoint.folder import CheckpointFolder
from accel.checkpoint.parts import (
    read_part,
    read_sharded_part,
    set_rng_state,
    sharded_skeleton,
)
from accel.checkpoint.staging import survivors
from accel.checkpoint.ties import drop_aliases, restore_aliases
from accel.checkpoint.validate import (
    model_differences,
    optimizer_differences,
    raise_if_different,
    scheduler_differences,
)
from accel.context import Context
from accel.errors import CheckpointNotFoundError, IncompatibleOptionsError, UnsupportedError
from accel.runtime.logging import get_logger
from accel.transforms.optim import AccelOptimizer
from accel.validation import check_bool

MISMATCH_FIX = (
    "Load it into the same setup that saved it: the same layers and sizes, optimizer class "
    "and param groups, and scheduler class (an LR scheduler adds initial_lr to the param "
    "groups: build it before loading), or pass optimizer=None / scheduler=None to leave "
    "those out. To load only the weights into another model, export them with save_model "
    "and load them with load_model(..., strict=False).")


def load_state(
    path: str | Path | CheckpointFolder, ctx: Context, *, model: nn.Module,
    optimizer: Any = None, scheduler: Any = None, loader: Any = None, rng: bool = True,
    verify: bool = True, **extra: Any,
) -> CheckpointInfo:
    """Restore a checkpoint written by `save_state` into the given objects; call it on every rank.

    Pass the objects you want restored, built and transformed as when saving (a sharded
    checkpoint also loads on another number of processes, or unsharded on one: pass
    rng=False and no loader there, since those are per rank).

    Args:
        path: a checkpoint directory, or a `CheckpointFolder` (its newest checkpoint).
        rng: restore this rank's generator states (needs the same world size).
        verify: check every file's size first, and the CRC32 of every file loaded
            (each file is read once: its checksum is computed on the bytes loaded;
            a sharded part's files, which DCP reads piecewise, are checked first).
        extra: objects saved as extras, under the same keywords.

    Returns:
        A `CheckpointInfo` (path, step, the saving world's size and backend).

    A plain `path` that holds no checkpoint because a save over it was interrupted
    loads the complete one that save left beside it (logged as a warning;
    `CheckpointInfo.recovered`).

    Raises:
        CheckpointNotFoundError: no complete checkpoint at `path` (or in the folder).
        CorruptCheckpointError: a file is missing, truncated or corrupted (named).
        CheckpointMismatchError: the checkpoint does not fit the model, optimizer or
            scheduler (every difference listed); checked before anything is loaded, so
            they are left as they were.
        IncompatibleOptionsError: something asked for was not saved, or cannot be
            restored in this world (say what to pass instead).

    >>> info = accel.load_state(folder, ctx, model=model, optimizer=optimizer, loader=loader)
    >>> start = info.step
    """
    check_checkpoint_arguments("load_state", path, ctx, model, rng=rng)
    check_bool("load_state", "verify", verify)
    check_extras(extra, "load_state")
    final, recovered = on_main(ctx, lambda: _resolve(path), "finding the checkpoint")
    if recovered:
        get_logger(__name__, ctx).warning(
            "%s holds no checkpoint: a save over it was interrupted; loading the complete "
            "one it left beside it, %s", path, final)
    metadata = check_metadata(read_json(final / METADATA), final)
    _check_request(metadata, ctx, final, optimizer=optimizer, scheduler=scheduler,
                   loader=loader, rng=rng, extra=extra)
    records = metadata["files"] if verify else None
    if records is not None:
        check_files(final, records, _read_piecewise(metadata, optimizer), ctx)
    # Everything this rank reads whole is in memory, and verified, before anything changes.
    error, parts = None, {}
    try:
        parts = _read_parts(final, metadata, ctx, records, optimizer=optimizer,
                            per_rank=rng or loader is not None)
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it
        error = exc
    agree(ctx, error, f"reading the checkpoint {final}")
    _check_fits(final, metadata, ctx, parts, model=model, optimizer=optimizer,
                scheduler=scheduler)
    _load_model_and_optimizer(final, metadata, ctx, model, optimizer, parts)
    _restore_main_state(parts["state"], optimizer, scheduler, extra)
    if loader is not None:
        loader.load_state_dict(parts["rank"]["loader"])
    if rng:  # last: nothing above may draw from the restored generators
        set_rng_state(parts["rank"]["rng"])
    return CheckpointInfo(path=final, step=metadata.get("step"),
                          world_size=metadata["world_size"], backend=metadata["backend"],
                          metadata=metadata, recovered=recovered)


def _read_piecewise(metadata: dict[str, Any], optimizer: Any) -> list[str]:
    """The files torch.distributed.checkpoint will read piecewise: verified beforehand."""
    if metadata["layout"] != "sharded":
        return []
    parts = ("model", "optimizer") if optimizer is not None else ("model",)
    return sorted(name for name in metadata["files"] for part in parts
                  if name == f"{part}.json" or name.startswith(f"{part}/"))


def _read_parts(final: Path, metadata: dict[str, Any], ctx: Context,
                records: dict[str, Record] | None, *, optimizer: Any,
                per_rank: bool) -> dict[str, Any]:
    """The full parts this rank loads, each file read once (and checked if `records`)."""
    parts = {"state": read_part(final, "state", records)}
    if per_rank:
        parts["rank"] = read_part(final, f"ranks/rank{ctx.rank}", records)
    if metadata["layout"] == "full" and ctx.is_main_process:
        # read on rank 0 only; the backend broadcasts to the other ranks
        parts["model"] = read_part(final, "model", records)
        if optimizer is not None:
            parts["optimizer"] = read_part(final, "optimizer", records)
    return parts


def _resolve(path: str | Path | CheckpointFolder) -> tuple[Path, bool]:
    """The checkpoint to load, and whether it is the survivor of an interrupted swap."""
    if isinstance(path, CheckpointFolder):
        latest = path.latest()
        if latest is None:
            raise CheckpointNotFoundError(
                f"{path.root} holds no complete checkpoint yet; check folder.latest() is "
                "not None before loading (a first run starts from scratch)")
        return latest, False
    final = Path(path)
    if (final / METADATA).is_file():
        return final, False
    found = survivors(final)
    if found:
        return found[0], True
    raise CheckpointNotFoundError(
        f"{final} is not a complete accel checkpoint (it has no {METADATA}): the path "
        "is wrong, or the save that was writing it was interrupted")


def _check_request(metadata: dict[str, Any], ctx: Context, final: Path, **asked: Any) -> None:
    saved = metadata["saved"]
    for name in ("optimizer", "scheduler", "loader"):
        if asked[name] is not None and not saved.get(name):
            raise IncompatibleOptionsError(
                f"load_state was given a {name}, but {final} was saved without one; "
                f"pass {name}=None")
    if asked["rng"] and not saved.get("rng"):
        raise IncompatibleOptionsError(
            f"{final} was saved with rng=False; load it with rng=False")
    missing = sorted(set(asked["extra"]) - set(saved.get("extra", [])))
    if missing:
        raise IncompatibleOptionsError(
            f"{final} holds no extra objects named {missing} (it has "
            f"{saved.get('extra', [])}); pass only extras that were saved")
    per_rank = [name for name in ("rng", "loader") if asked[name] not in (None, False)]
    if per_rank and metadata["world_size"] != ctx.world_size:
        raise IncompatibleOptionsError(
            f"{final} was saved by {metadata['world_size']} processes and this world has "
            f"{ctx.world_size}: the per-rank {per_rank} states cannot be restored; pass "
            "rng=False and loader=None (model and optimizer load on any world size from a "
            "sharded checkpoint)")


def _check_fits(final: Path, metadata: dict[str, Any], ctx: Context, parts: dict[str, Any],
                *, model: nn.Module, optimizer: Any, scheduler: Any) -> None:
    """Before anything is loaded: the checkpoint fits the model, optimizer and scheduler.

    Rank 0 compares (it holds the full parts); every rank agrees.

    Raises:
        CheckpointMismatchError: listing every difference.
        CorruptCheckpointError: a sharded part's file header does not fit its data.
    """
    module = unwrap_for_export(model, ctx)
    target = module.state_dict(keep_vars=True)  # on every rank: hooks may be collective
    error = None
    if ctx.is_main_process:
        try:
            _compare(final, metadata, ctx, parts, module, target, optimizer, scheduler)
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it
            error = exc
    agree(ctx, error, f"checking that {final} fits")


def _compare(final: Path, metadata: dict[str, Any], ctx: Context, parts: dict[str, Any],
             module: nn.Module, target: dict[str, Any], optimizer: Any, scheduler: Any) -> None:
    saved = metadata["saved"]
    if metadata["layout"] == "full":
        model_state, optimizer_state = parts["model"], parts.get("optimizer")
    else:
        model_state = sharded_skeleton(final, "model")
        optimizer_state = sharded_skeleton(final, "optimizer") if optimizer is not None else None
    # ZeRO's saved weights are its fp32 masters, and it regroups the parameters.
    engine_holds = has_capability(ctx, ENGINE_HOLDS_WEIGHTS)
    found = model_differences(restore_aliases(model_state, saved.get("tied", {})), target,
                              dtypes=not engine_holds)
    if optimizer is not None:
        found += optimizer_differences(optimizer_state, saved.get("optimizer_class"), optimizer,
                                       module, structure=not engine_holds)
    found += scheduler_differences(saved.get("scheduler_class"), scheduler)
    raise_if_different(found, final, MISMATCH_FIX)


def _load_model_and_optimizer(final: Path, metadata: dict[str, Any], ctx: Context,
                              model: nn.Module, optimizer: Any, parts: dict[str, Any]) -> None:
    backend = backend_for(ctx)
    # Tied weights were saved under one name: the alias gets the kept name's tensor back.
    tied = metadata["saved"].get("tied", {})
    if metadata["layout"] == "full":
        model_state = restore_aliases(parts.get("model", {}), tied)
        optimizer_state = parts.get("optimizer", {}) if optimizer is not None else None
        backend.set_state_dict(model, optimizer, model_state, optimizer_state, full=True)
        return
    try:
        model_target, optimizer_target = backend.get_state_dict(model, optimizer, full=False)
    except UnsupportedError as exc:
        raise UnsupportedError(
            f"{final} is a sharded checkpoint (saved with {metadata['backend']}), which the "
            f"{ctx.backend} backend cannot load piecewise: load it with fsdp, ddp or one "
            f"process, and save it again from there ({exc})") from None
    model_target, _ = drop_aliases(model_target, tied)
    model_state = restore_aliases(read_sharded_part(final, "model", model_target, ctx), tied)
    optimizer_state = (read_sharded_part(final, "optimizer", optimizer_target, ctx)
                       if optimizer is not None else None)
    backend.set_state_dict(model, optimizer, model_state, optimizer_state, full=False)


def _restore_main_state(state: dict[str, Any], optimizer: Any, scheduler: Any,
                        extra: dict[str, Any]) -> None:
    wrapper = state.get("optimizer_wrapper")
    if isinstance(optimizer, AccelOptimizer) and wrapper is not None:
        # Before the scheduler: AccelScheduler counts steps from real_steps.
        optimizer.real_steps = int(wrapper["real_steps"])
        if "scaler" in wrapper and optimizer.scaler is not None:
            optimizer.scaler.load_state_dict(wrapper["scaler"])
        if "accumulation" in wrapper and optimizer.accumulation is not None:
            optimizer.accumulation.load_state_dict(wrapper["accumulation"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    for name, value in extra.items():
        value.load_state_dict(state["extra"][name])
