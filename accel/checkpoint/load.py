"""`load_state`: verify a checkpoint, then restore what `save_state` saved, on every rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from accel.backends import ENGINE_HOLDS_WEIGHTS, has_capability
from accel.checkpoint.background import wait_in_flight
from accel.checkpoint.common import (
    CheckpointInfo,
    agree,
    check_checkpoint_arguments,
    check_extras,
    check_files,
    check_metadata,
)
from accel.checkpoint.export import unwrap_for_export
from accel.checkpoint.files import METADATA, Record, read_json
from accel.checkpoint.folder import CheckpointFolder
from accel.checkpoint.nodes import check_own_shards, check_same_layout, on_writers
from accel.checkpoint.objects import KINDS, Objects, check_names, collect, described, get, slot
from accel.checkpoint.parts import read_part, set_rng_state, sharded_skeleton
from accel.checkpoint.restore import load_model_and_optimizer
from accel.checkpoint.staging import survivors
from accel.checkpoint.ties import restore_aliases
from accel.checkpoint.validate import (
    model_differences,
    optimizer_differences,
    raise_if_different,
    scheduler_differences,
)
from accel.context import Context
from accel.errors import CheckpointNotFoundError, IncompatibleOptionsError
from accel.runtime import ops
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
    path: str | Path | CheckpointFolder, ctx: Context, *, model: nn.Module | None = None,
    optimizer: Any = None, scheduler: Any = None, loader: Any = None,
    models: dict[str, nn.Module] | None = None, optimizers: dict[str, Any] | None = None,
    schedulers: dict[str, Any] | None = None, loaders: dict[str, Any] | None = None,
    rng: bool = True, verify: bool = True, strict: bool = True, **extra: Any,
) -> CheckpointInfo:
    """Restore a checkpoint written by `save_state` into the given objects; call it on every rank.

    Pass the objects you want restored, built and transformed as when saving, in the
    form they were saved in (model=... or models={...} by the same names; a sharded
    checkpoint also loads on another number of processes, or unsharded on one: pass
    rng=False there, since generator states are per rank; a map-style loader's position
    reshards, see `DistributedLoader.load_state_dict`).

    Args:
        path: a checkpoint directory, or a `CheckpointFolder` (its newest checkpoint).
        models, optimizers, schedulers, loaders: the named form (see `save_state`);
            optimizers, schedulers and loaders may be left out as a whole.
        rng: restore this rank's generator states (needs the same world size).
        verify: check every file's size first, and the checksum of every file loaded
            (each file is read once: its checksum is computed on the bytes loaded;
            a sharded part's files, which DCP reads piecewise, are checked first).
        strict: False loads a checkpoint that lacks some of the model's tensors (one
            saved with ``select=``, e.g. a LoRA adapter): those keep their values (and
            their optimizer state); every tensor the checkpoint holds must still fit.
        extra: objects saved as extras, under the same keywords.

    Returns:
        A `CheckpointInfo` (path, step, the saving world's size and backend).

    A plain `path` that holds no checkpoint because a save over it was interrupted
    loads the complete one that save left beside it (logged as a warning;
    `CheckpointInfo.recovered`). A save of this process still writing in the background
    is waited for first.

    Raises:
        CheckpointNotFoundError: no complete checkpoint at `path` (or in the folder).
        CorruptCheckpointError: a file is missing, truncated or corrupted (named).
        CheckpointMismatchError: the checkpoint does not fit the model, optimizer or
            scheduler (every difference listed); checked before anything is loaded, so
            they are left as they were.
        IncompatibleOptionsError: something asked for was not saved (or a name is
            missing or extra), or cannot be restored in this world (say what to pass).

    >>> info = accel.load_state(folder, ctx, model=model, optimizer=optimizer, loader=loader)
    >>> start = info.step
    >>> accel.load_state(folder, ctx, models={"g": g, "d": d}, optimizers={"g": opt_g, "d": opt_d})
    """
    objects = _check_arguments(path, ctx, locals(), extra)
    wait_in_flight()  # this process's save in the background: complete before reading
    final, recovered, metadata = _find(path, ctx)
    if recovered:
        get_logger(__name__, ctx).warning(
            "%s holds no checkpoint: a save over it was interrupted; loading the complete "
            "one it left beside it, %s", path, final)
    saved = described(metadata["saved"])
    check_names(objects, saved, final)
    _check_request(metadata, ctx, final, objects, rng=rng, extra=extra)
    records = metadata["files"] if verify else None
    if records is not None:
        check_files(final, records, _read_piecewise(metadata, saved, objects), ctx,
                    node_local="nodes" in metadata)
    # Everything this rank reads whole is in memory, and verified, before anything changes.
    error, parts = None, {}
    try:
        parts = _read_parts(final, metadata, saved, ctx, records, objects,
                            per_rank=rng or bool(objects.loaders))
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it
        error = exc
    agree(ctx, error, f"reading the checkpoint {final}")
    if metadata["layout"] == "per-rank":
        partial = check_own_shards(final, saved, ctx, parts, objects, strict=strict)
    else:
        partial = _check_fits(final, metadata, saved, ctx, parts, objects, strict=strict)
    for name, each in objects.models.items():
        load_model_and_optimizer(final, metadata, saved, ctx, parts, name=name, model=each,
                                 optimizer=objects.optimizers.get(name),
                                 partial=name in partial)
    _restore_main_state(parts["state"], objects, extra)
    for name, each in objects.loaders.items():
        each.load_state_dict(get(parts["rank"], slot("loader", name, objects.single)))
    if rng:  # last: nothing above may draw from the restored generators
        set_rng_state(parts["rank"]["rng"])
    return CheckpointInfo(path=final, step=metadata.get("step"),
                          world_size=metadata["world_size"], backend=metadata["backend"],
                          metadata=metadata, recovered=recovered)


def _check_arguments(path: Any, ctx: Any, given: dict[str, Any], extra: dict[str, Any]
                     ) -> Objects:
    check_checkpoint_arguments("load_state", path, ctx, rng=given["rng"])
    check_bool("load_state", "verify", given["verify"])
    check_bool("load_state", "strict", given["strict"])
    check_extras(extra, "load_state")
    return collect("load_state", {kind: given[kind] for kind in KINDS},
                   {f"{kind}s": given[f"{kind}s"] for kind in KINDS})


def _find(path: str | Path | CheckpointFolder, ctx: Context
          ) -> tuple[Path, bool, dict[str, Any]]:
    """(the checkpoint, whether it survived an interrupted swap, its metadata).

    Each node's local rank 0 looks (a node-local checkpoint is on each node's disk); a
    checkpoint on a shared filesystem is the one rank 0 found.
    """
    final, recovered = on_writers(ctx, lambda: _resolve(path), "finding the checkpoint",
                                  node_local=True)
    metadata = check_metadata(read_json(final / METADATA), final)
    if ctx.num_nodes > 1 and "nodes" not in metadata:  # shared: rank 0's, whatever raced
        found = ops.broadcast_object((final, recovered), ctx)
        if found[0] != final:
            final, recovered = found
            metadata = check_metadata(read_json(final / METADATA), final)
    check_same_layout(metadata, ctx, final)
    return final, recovered, metadata


def _read_piecewise(metadata: dict[str, Any], saved: dict[str, Any], objects: Objects
                    ) -> list[str]:
    """The files torch.distributed.checkpoint will read piecewise: verified beforehand."""
    if metadata["layout"] != "sharded":
        return []
    parts = [saved["models"][name]["part"] for name in objects.models]
    parts += [saved["optimizers"][name]["part"] for name in objects.optimizers]
    return sorted(name for name in metadata["files"] for part in parts
                  if name == f"{part}.json" or name.startswith(f"{part}/"))


def _read_parts(final: Path, metadata: dict[str, Any], saved: dict[str, Any], ctx: Context,
                records: dict[str, Record] | None, objects: Objects, *,
                per_rank: bool) -> dict[str, Any]:
    """The full parts this rank loads, each file read once (and checked if `records`)."""
    parts = {"state": read_part(final, "state", records)}
    if per_rank:
        # Another world size: only loaders are asked for (rng is refused), and each
        # takes rank 0's position, which it reshards (DistributedLoader.load_state_dict).
        rank = ctx.rank if metadata["world_size"] == ctx.world_size else 0
        parts["rank"] = read_part(final, f"ranks/rank{rank}", records)
    names = [saved["models"][name]["part"] for name in objects.models]
    names += [saved["optimizers"][name]["part"] for name in objects.optimizers]
    if metadata["layout"] == "full" and ctx.is_main_process:
        # read on rank 0 only; the backend broadcasts to the other ranks
        for name in names:
            parts[name] = read_part(final, name, records)
    elif metadata["layout"] == "per-rank":  # each rank its own shards
        for name in names:
            parts[name] = read_part(final, f"{name}/rank{ctx.rank}", records)
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


def _check_request(metadata: dict[str, Any], ctx: Context, final: Path, objects: Objects, *,
                   rng: bool, extra: dict[str, Any]) -> None:
    saved = metadata["saved"]
    if rng and not saved.get("rng"):
        raise IncompatibleOptionsError(
            f"{final} was saved with rng=False; load it with rng=False")
    missing = sorted(set(extra) - set(saved.get("extra", [])))
    if missing:
        raise IncompatibleOptionsError(
            f"{final} holds no extra objects named {missing} (it has "
            f"{saved.get('extra', [])}); pass only extras that were saved")
    if rng and metadata["world_size"] != ctx.world_size:
        raise IncompatibleOptionsError(
            f"{final} was saved by {metadata['world_size']} processes and this world has "
            f"{ctx.world_size}: the per-rank random generator states cannot be restored; "
            "pass rng=False (model, optimizer, scheduler and a map-style loader's position "
            "load on any world size; see DistributedLoader.load_state_dict)")


def _check_fits(final: Path, metadata: dict[str, Any], saved: dict[str, Any], ctx: Context,
                parts: dict[str, Any], objects: Objects, *, strict: bool) -> set[str]:
    """Before anything is loaded: the checkpoint fits the models, optimizers and schedulers.

    Rank 0 compares (it holds the full parts); every rank agrees. Returns the names of
    the models the checkpoint holds only some tensors of (strict=False).

    Raises:
        CheckpointMismatchError: listing every difference.
        CorruptCheckpointError: a sharded part's file header does not fit its data.
    """
    modules = {name: unwrap_for_export(model, ctx) for name, model in objects.models.items()}
    # on every rank: state_dict hooks may be collective
    targets = {name: module.state_dict(keep_vars=True) for name, module in modules.items()}
    engine_holds = has_capability(ctx, ENGINE_HOLDS_WEIGHTS)
    error, found, partial = None, [], set()
    if ctx.is_main_process:
        try:
            for name in objects.models:
                if _compare(final, metadata, saved, parts, objects, name, modules[name],
                            targets[name], found, strict=strict, engine_holds=engine_holds):
                    partial.add(name)
            for name, scheduler in objects.schedulers.items():
                found += scheduler_differences(saved["schedulers"][name].get("class"),
                                               scheduler)
            raise_if_different(found, final, _fix(saved, found))
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it
            error = exc
    agree(ctx, error, f"checking that {final} fits")
    return set(ops.broadcast_object(sorted(partial), ctx))


def _fix(saved: dict[str, Any], found: list[str]) -> str:
    selected = [name for name, model in saved["models"].items() if model.get("selected")]
    if selected and any("the checkpoint lacks" in line for line in found):
        return ("It was saved with save_state(..., select=...) and holds only some tensors "
                f"of {selected}: load it with load_state(..., strict=False). " + MISMATCH_FIX)
    return MISMATCH_FIX


def _compare(final: Path, metadata: dict[str, Any], saved: dict[str, Any],
             parts: dict[str, Any], objects: Objects, name: str, module: nn.Module,
             target: dict[str, Any], found: list[str], *, strict: bool,
             engine_holds: bool) -> bool:
    """Add the differences of model `name` (and its optimizer) to `found`; return whether
    the checkpoint lacks some of its tensors (allowed with strict=False)."""
    entry, optimizer = saved["models"][name], objects.optimizers.get(name)
    optimizer_part = saved["optimizers"][name]["part"] if optimizer is not None else None
    if metadata["layout"] == "full":
        model_state, optimizer_state = parts[entry["part"]], parts.get(optimizer_part)
    else:
        model_state = sharded_skeleton(final, entry["part"])
        optimizer_state = (sharded_skeleton(final, optimizer_part) if optimizer is not None
                           else None)
    model_state = restore_aliases(model_state, entry.get("tied", {}))
    lacking = sorted(set(target) - set(model_state))
    where = "" if objects.single else f"[{name}] "
    # engine_holds: ZeRO's saved weights are its fp32 masters, and it regroups parameters.
    found += [where + line for line in model_differences(
        model_state, target, dtypes=not engine_holds, partial=not strict)]
    if optimizer is not None:
        found += [where + line for line in optimizer_differences(
            optimizer_state, saved["optimizers"][name].get("class"), optimizer, module,
            structure=not engine_holds, partial=not strict)]
    return bool(lacking) and not strict


def _restore_main_state(state: dict[str, Any], objects: Objects, extra: dict[str, Any]) -> None:
    for name, optimizer in objects.optimizers.items():
        wrapper = get(state, slot("optimizer_wrapper", name, objects.single))
        if isinstance(optimizer, AccelOptimizer) and wrapper is not None:
            # Before the schedulers: AccelScheduler counts steps from real_steps.
            optimizer.real_steps = int(wrapper["real_steps"])
            if "scaler" in wrapper and optimizer.scaler is not None:
                optimizer.scaler.load_state_dict(wrapper["scaler"])
            if "accumulation" in wrapper and optimizer.accumulation is not None:
                optimizer.accumulation.load_state_dict(wrapper["accumulation"])
    for name, scheduler in objects.schedulers.items():
        scheduler.load_state_dict(get(state, slot("scheduler", name, objects.single)))
    for name, value in extra.items():
        value.load_state_dict(state["extra"][name])
