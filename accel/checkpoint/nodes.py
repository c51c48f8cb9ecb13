"""Checkpoints on node-local disks: `save_state(..., save_on_each_node=True)`.

For clusters without a shared filesystem: `path` names a folder on each node's own
disk, and each node writes what its ranks will need to load, under the same name:

- the local rank 0 of each node makes, commits and rotates that node's folder, and
  writes rank 0's state (step, schedulers, extras) and accel.json, which lists the
  node's own files (``nodes`` records the layout);
- each rank writes its RNG and loader state to its node;
- a full checkpoint's model and optimizer (DDP, one process, DeepSpeed) go to node 0
  only: rank 0 reads them and the engine broadcasts them on load;
- a sharded engine's state (FSDP2, TP) is written by every rank as its own shards
  (``model/rank{r}``), plain local tensors, to its own node.

Limits: such a checkpoint loads on the same layout only (the same number of nodes, of
processes per node and, for sharded engines, the same sharding); it does not reshard
and does not move to another engine. A `CheckpointFolder` gets the same number on
every node (the highest any node proposes). Copy the node folders together (node 0's
and the others') to move such a checkpoint elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from accel.backends import backend_for
from accel.checkpoint.common import agree, attempt, describe_error, on_main, raise_failures
from accel.checkpoint.ties import drop_aliases
from accel.checkpoint.tree import flatten, unflatten
from accel.context import Context
from accel.errors import CheckpointMismatchError, IncompatibleOptionsError, UnsupportedError
from accel.runtime import ops


def is_writer(ctx: Context, node_local: bool) -> bool:
    """Whether this rank makes and commits the folder its files go to."""
    return ctx.is_local_main_process if node_local else ctx.is_main_process


def on_writers(ctx: Context, fn: Callable[[], Any], what: str, node_local: bool) -> Any:
    """Run `fn` on each folder's writer; every rank returns its own writer's result.

    Raises:
        AccelError: a writer failed (on every rank: its error).
    """
    if not node_local:
        return on_main(ctx, fn, what)
    result, error = attempt(fn, ctx.is_local_main_process)
    reports = ops.gather_object({"node": ctx.node_rank, "writer": ctx.is_local_main_process,
                                 "result": result, "error": describe_error(error)},
                                ctx, ranks="all")
    raise_failures(error, reports, what)
    return next(report["result"] for report in reports
                if report["writer"] and report["node"] == ctx.node_rank)


def layout(ctx: Context) -> dict[str, int]:
    """What accel.json records of a node-local checkpoint's layout."""
    return {"num_nodes": ctx.num_nodes, "local_world_size": ctx.local_world_size,
            "node": ctx.node_rank}


def check_same_layout(metadata: dict[str, Any], ctx: Context, final: Any) -> None:
    """A node-local checkpoint loads on the node layout that saved it only.

    Raises:
        IncompatibleOptionsError: another number of nodes or of processes per node.
    """
    nodes = metadata.get("nodes")
    if nodes is None:
        return
    here = layout(ctx)
    if (nodes["num_nodes"], nodes["local_world_size"], metadata["world_size"]) != (
            here["num_nodes"], here["local_world_size"], ctx.world_size):
        raise IncompatibleOptionsError(
            f"{final} was saved with save_on_each_node=True by {nodes['num_nodes']} nodes of "
            f"{nodes['local_world_size']} processes; this world has {here['num_nodes']} of "
            f"{here['local_world_size']}: each node holds only its own ranks' files, so it "
            "loads on the same layout only. Load it there and save it to a shared "
            "filesystem (save_on_each_node=False) to move it")


# ---------------------------------------------------------------- a rank's own shards

def local_shards(tree: Any) -> Any:
    """`tree` with each DTensor replaced by this rank's shard (a plain tensor)."""
    if isinstance(tree, DTensor):
        return tree.to_local()
    if isinstance(tree, dict):
        return {key: local_shards(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(local_shards(value) for value in tree)
    return tree


def shard_differences(saved: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                      where: str, *, partial: bool) -> list[str]:
    """How this rank's saved shards differ from its shards here (names, local shapes)."""
    found = []
    lacking = [] if partial else sorted(set(target) - set(saved))
    if lacking:
        found.append(f"{where}: the checkpoint lacks {', '.join(lacking[:8])}")
    extra = sorted(set(saved) - set(target))
    if extra:
        found.append(f"{where}: the checkpoint has {', '.join(extra[:8])}, which this one lacks")
    for key in sorted(set(saved) & set(target)):
        here = _local(target[key])
        if tuple(saved[key].shape) != tuple(here.shape) or saved[key].dtype != here.dtype:
            found.append(f"{where} {key}: this rank's shard is {list(saved[key].shape)} "
                         f"{saved[key].dtype} in the checkpoint, {list(here.shape)} "
                         f"{here.dtype} here (saved with another sharding)")
    return found


def fill_shards(target: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    """Copy this rank's saved shards into the target's (DTensors' local tensors)."""
    with torch.no_grad():
        for key, value in saved.items():
            _local(target[key]).copy_(value)


def own_shards(saved: Any, target: Any) -> Any:
    """The saved tree with `target`'s tensors, into which this rank's saved shards were
    copied (the per-rank counterpart of `parts.read_sharded_part`)."""
    skeleton, tensors = flatten(saved)
    _, targets = flatten(target)
    fill_shards(targets, tensors)
    return unflatten(skeleton, {key: targets[key] for key in tensors})


def check_own_shards(final: Any, saved: dict[str, Any], ctx: Context, parts: dict[str, Any],
                     objects: Any, *, strict: bool) -> set[str]:
    """Before anything loads: each rank's saved shards fit its shards here (a collective).

    Returns the models the checkpoint holds only some tensors of (strict=False).

    Raises:
        CheckpointMismatchError: on every rank, listing the differences one rank found.
    """
    backend = backend_for(ctx)
    found: list[str] = []
    partial: set[str] = set()
    error = None
    try:
        for name, model in objects.models.items():
            optimizer = objects.optimizers.get(name)
            model_target, optimizer_target = _native_state(backend, model, optimizer, final,
                                                           ctx)
            entry = saved["models"][name]
            kept, _ = drop_aliases(model_target, entry.get("tied", {}))
            mine, there = flatten(parts[entry["part"]])[1], flatten(kept)[1]
            where = "model" if objects.single else f"model {name}"
            found += shard_differences(mine, there, where, partial=not strict)
            if set(there) - set(mine):
                partial.add(name)
            if optimizer is not None:
                found += shard_differences(
                    flatten(parts[saved["optimizers"][name]["part"]])[1],
                    flatten(optimizer_target)[1], where.replace("model", "optimizer"),
                    partial=not strict)
        raise_mismatch(found, final)
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it
        error = exc
    agree(ctx, error, f"checking that {final} fits")
    return partial


def _native_state(backend: Any, model: Any, optimizer: Any, final: Any, ctx: Context) -> Any:
    try:
        return backend.get_state_dict(model, optimizer, full=False)
    except UnsupportedError:
        raise IncompatibleOptionsError(
            f"{final} holds each rank's own shards (a sharded engine saved it with "
            f"save_on_each_node=True), and {ctx.backend} has no sharded form to load them "
            "into: load it under the engine and layout that saved it, then save it to a "
            "shared filesystem (save_on_each_node=False), which any engine loads") from None


def raise_mismatch(found: list[str], final: Any) -> None:
    if found:
        lines = "\n".join(f"  - {line}" for line in found)
        raise CheckpointMismatchError(
            f"{final} does not fit what it is loaded into on this rank; nothing was "
            f"loaded:\n{lines}\nA node-local checkpoint of a sharded model loads on the "
            "same world, mesh and sharding that saved it")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
