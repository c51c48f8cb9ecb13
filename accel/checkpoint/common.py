"""What save and load share: the metadata file, agreement between ranks, split-up checksums.

Layout of a checkpoint directory (format version 2; version 1 differs only in its
checksums, CRC32, which still verify)::

    accel.json              metadata: format, versions, world size, backend, step,
                            layout ("full", "sharded" or "per-rank"), what was saved
                            (with saved.tied: {alias: kept name} of tied weights, stored
                            once under the kept name; saved.optimizer_class /
                            scheduler_class: the classes' names; saved.selected: saved
                            with select=; the named form lists saved.models, .optimizers,
                            .schedulers, .loaders instead), nodes (save_on_each_node:
                            the node layout), and every file's size and checksum
                            (`accel.checkpoint.checksum`, computed while writing);
                            written last: a checkpoint is complete once every file it
                            lists is there with its size
    model.json              the model state's structure (tensors referenced by key)
    model.safetensors       full layout: the whole model state, keys = parameter names
    model/                  sharded layout: torch.distributed.checkpoint directory with
                            safetensors shards (dcp.HuggingFaceStorageReader reads it,
                            on any number of processes; see parts.load_sharded_tensors)
    model/rank{r}.json + .safetensors   per-rank layout (node-local disks, sharded
                            engines): rank r's own shards (see `accel.checkpoint.nodes`)
    optimizer.json + optimizer.safetensors | optimizer/     the same, for the optimizer
    models/NAME..., optimizers/NAME...   the named form (`models={...}`): the same per name
    state.json + state.safetensors   rank 0's step, schedulers, extras, and the wrapped
                            optimizers' loss scale, accumulation micro-step, real steps
    ranks/rank{r}.json + .safetensors   each rank's RNG states and loader positions
                            (with a stream's own state, see `accel.data.stateful`)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

from accel.checkpoint.files import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    Record,
    all_files,
    check_sizes,
    describe,
    verify,
)
from accel.checkpoint.folder import CheckpointFolder
from accel.context import Context
from accel.errors import (
    AccelError,
    CheckpointMismatchError,
    CheckpointSaveError,
    IncompatibleOptionsError,
    InvalidArgumentError,
    UnsupportedError,
)
from accel.runtime import ops
from accel.validation import check_bool, check_context, check_type

FORMAT = "accel-checkpoint"
#: 2: files checksummed with XXH3-64 (records name their algorithm; version 1: CRC32).
FORMAT_VERSION = 2
#: keyword arguments of save_state/load_state that are not extra objects.
RESERVED = frozenset({"step", "verify", "select", "blocking", "strict"})


@attrs.frozen
class CheckpointInfo:
    """What `load_state` loaded: where from, at which step, saved by which world.

    `recovered` is True when the path asked for held no checkpoint and `path` is the
    survivor of a save interrupted while replacing it (a warning says so too).
    """

    path: Path
    step: int | None
    world_size: int
    backend: str
    metadata: dict[str, Any] = attrs.field(eq=False, repr=False)
    recovered: bool = False


def check_checkpoint_arguments(function: str, path: Any, ctx: Any, *, rng: Any) -> None:
    """The arguments save_state and load_state share (the objects: `objects.collect`)."""
    check_type(function, "path", path, (str, os.PathLike, CheckpointFolder),
               "a checkpoint directory (str or os.PathLike) or an accel.CheckpointFolder")
    check_context(function, ctx)
    check_bool(function, "rng", rng)


def check_extras(extra: dict[str, Any], verb: str) -> None:
    for name, value in extra.items():
        if not (callable(getattr(value, "state_dict", None))
                and callable(getattr(value, "load_state_dict", None))):
            raise InvalidArgumentError(
                f"{verb} got {name}={type(value).__name__}, which has no state_dict() and "
                "load_state_dict(); extra keyword arguments are objects to checkpoint (a "
                "sampler, an EMA, a metric), named by the keyword")


def agree(ctx: Context, error: BaseException | None, what: str) -> None:
    """A barrier that fails on every rank if any rank failed (instead of hanging the rest).

    Raises:
        AccelError: the first failed rank's error; the same type on that rank itself.
    """
    reports = ops.gather_object({"error": describe_error(error)}, ctx, ranks="all")
    raise_failures(error, reports, what)


def raise_failures(error: BaseException | None, reports: list[dict[str, Any]],
                   what: str) -> None:
    """Raise this rank's `error`, else the first error the other ranks `reports` hold."""
    if error is not None:
        raise error
    failed = [(rank, report["error"]) for rank, report in enumerate(reports) if report["error"]]
    if failed:
        rank, message = failed[0]
        raise _error_type(message)(f"rank {rank} failed while {what}: {message}")


def describe_error(error: BaseException | None) -> str | None:
    """"Type: message" of `error` for the other ranks (None: no error)."""
    return None if error is None else f"{type(error).__name__}: {error}"


def _error_type(message: str) -> type[AccelError]:
    """The accel error type named at the start of a report from another rank."""
    known = (CorruptCheckpointError, CheckpointNotFoundError, InvalidArgumentError,
             IncompatibleOptionsError, UnsupportedError, CheckpointSaveError,
             CheckpointMismatchError)
    name = message.split(":", 1)[0]
    return next((kind for kind in known if kind.__name__ == name), AccelError)


def attempt(fn: Callable[[], Any], here: bool) -> tuple[Any, BaseException | None]:
    """(fn(), None) where `here`, (None, its error) if it raised; (None, None) elsewhere."""
    if not here:
        return None, None
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - the caller reports it to every rank
        return None, exc


def on_main(ctx: Context, fn: Callable[[], Any], what: str) -> Any:
    """Run `fn` on rank 0 only; every rank returns its result or raises its error."""
    result, error = attempt(fn, ctx.is_main_process)
    outcome = ops.broadcast_object(
        {"result": result, "error": describe_error(error)}, ctx)
    if error is not None:
        raise error
    if outcome["error"] is not None:
        raise _error_type(outcome["error"])(f"rank 0 failed while {what}: {outcome['error']}")
    return outcome["result"]


def file_records(root: Path, written: dict[str, Record], ctx: Context, *,
                 node_local: bool = False) -> dict[str, Record]:
    """Size and checksum of every file under `root`, for accel.json.

    `written`: what this rank wrote and checksummed while writing. The files torch
    wrote (the sharded parts) are read back once, the work split over the ranks that
    write into `root` (all of them on a shared filesystem, the node's with
    `node_local`); they are still in the page cache.
    """
    records: dict[str, Record] = {}
    for part in _mine(ops.gather_object({"node": ctx.node_rank, "records": written}, ctx,
                                        ranks="all"), ctx, node_local):
        records.update(part["records"])
    rest = [name for name in all_files(root) if name not in records]
    index, count = (ctx.local_rank, ctx.local_world_size) if node_local else (
        ctx.rank, ctx.world_size)
    mine = describe(root, rest[index::count])
    for part in _mine(ops.gather_object({"node": ctx.node_rank, "records": mine}, ctx,
                                        ranks="all"), ctx, node_local):
        records.update(part["records"])
    return records


def _mine(reports: list[dict[str, Any]], ctx: Context, node_local: bool) -> list[dict[str, Any]]:
    return [report for report in reports if not node_local or report["node"] == ctx.node_rank]


def check_files(root: Path, records: dict[str, Record], piecewise: list[str],
                ctx: Context, *, node_local: bool = False) -> None:
    """Before anything is read: every file is there with its size, and the files read
    piecewise (`piecewise`, split over the ranks) match their checksums too; the
    others are checked as they are read. All ranks raise if one file is bad.
    `node_local`: each node checks its own folder (see `accel.checkpoint.nodes`).
    """
    error = None
    index, count = (ctx.local_rank, ctx.local_world_size) if node_local else (
        ctx.rank, ctx.world_size)
    try:
        if index == 0:
            check_sizes(root, records)
        verify(root, records, piecewise[index::count])
    except CorruptCheckpointError as exc:
        error = exc
    agree(ctx, error, "verifying the checkpoint")


def versions() -> dict[str, str]:
    import accel

    return {"accel": getattr(accel, "__version__", "unknown"), "torch": torch.__version__}


def check_metadata(metadata: Any, path: Path) -> dict[str, Any]:
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CorruptCheckpointError(
            f"{path / 'accel.json'} is not an accel checkpoint's metadata")
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise AccelError(
            f"the checkpoint {path} has format version {metadata['format_version']}, newer "
            f"than this accel reads ({FORMAT_VERSION}); upgrade accel")
    return metadata
