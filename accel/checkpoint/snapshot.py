"""What a save writes, taken at one moment: every object's state, split into parts.

`take` asks the engine for each model's (and its optimizer's) state, full on rank 0 or
sharded on every rank, applies `select`, drops tied aliases, and adds this rank's RNG
and loader positions and rank 0's step, schedulers and extras. For a save in the
background, `stage` copies every tensor that is still the model's or optimizer's own
memory (or on a GPU: into pinned host memory) so that training may go on at once;
tensors the engine already gathered into fresh CPU memory are not copied again. The
host copies are kept for the next background save of the same tensors (as torch DCP's
caching stager does): copying into memory already mapped runs at memory speed, where
fresh memory first takes a page fault per page. They cost one copy of the staged state
in host memory for as long as the process saves in the background.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext as _nothing
from typing import Any

import attrs
import torch
from torch.distributed.tensor import DTensor

from accel.backends import backend_for
from accel.checkpoint.export import unwrap_for_export
from accel.checkpoint.nodes import local_shards
from accel.checkpoint.objects import Objects, put, slot
from accel.checkpoint.parts import rng_state
from accel.checkpoint.ties import drop_aliases, tied_aliases
from accel.checkpoint.validate import inner_optimizer, optimizer_class, scheduler_class
from accel.context import Context
from accel.errors import CheckpointSaveError, InvalidArgumentError
from accel.transforms.optim import AccelOptimizer

Select = Callable[[str], bool]
#: host copies of the last background save, by their place in the snapshot (see above).
_staged: dict[tuple[Any, ...], torch.Tensor] = {}


@attrs.define
class Snapshot:
    """The trees one rank writes: parts by name (full on rank 0, sharded on every rank),
    its own per-rank tree, rank 0's main state, and what accel.json records."""

    full: dict[str, Any]
    sharded: dict[str, Any]
    per_rank: dict[str, Any]
    #: rank 0's main state, or the function that takes it when it is written (the
    #: extras' state_dict() is called as late as before: after the model's files)
    main: dict[str, Any] | Callable[[], dict[str, Any]] | None
    saved: dict[str, Any]
    step: int | None

    def main_state(self) -> dict[str, Any] | None:
        return self.main() if callable(self.main) else self.main


def take(ctx: Context, objects: Objects, *, rng: bool, step: int | None,
         extra: Mapping[str, Any], select: Select | None, layout: str,
         writer: bool) -> Snapshot:
    """Every object's state now (a collective: engines gather or list their shards).

    `layout`: "full" (rank 0 writes whole tensors), "sharded" (every rank's shards through
    torch DCP) or "per-rank" (every rank writes its own shards as plain tensors, see
    `accel.checkpoint.nodes`); `writer`: this rank writes the main state (step, ...).
    """
    sharded = layout != "full"
    backend = backend_for(ctx)
    full_parts: dict[str, Any] = {}
    sharded_parts: dict[str, Any] = {}
    models_saved: dict[str, Any] = {}
    for name, model in objects.models.items():
        optimizer = objects.optimizers.get(name)
        module = unwrap_for_export(model, ctx)
        kept = _selected(module, select, name)
        model_state, optimizer_state = backend.get_state_dict(model, optimizer, full=not sharded)
        if kept is not None:
            model_state = {key: value for key, value in model_state.items() if key in kept}
            optimizer_state = _select_optimizer(optimizer_state, kept)
        # Optimizer state needs no such step: a tied parameter is one parameter, one entry.
        model_state, tied = drop_aliases(model_state, tied_aliases(module))
        models_saved[name] = {"part": objects.part("model", name), "tied": tied,
                              "selected": kept is not None}
        if layout == "per-rank":
            full_parts[f"{objects.part('model', name)}/rank{ctx.rank}"] = local_shards(
                model_state)
            if optimizer is not None:
                full_parts[f"{objects.part('optimizer', name)}/rank{ctx.rank}"] = (
                    local_shards(optimizer_state))
        elif sharded or ctx.is_main_process:
            target = sharded_parts if sharded else full_parts
            target[objects.part("model", name)] = model_state
            if optimizer is not None:
                target[objects.part("optimizer", name)] = optimizer_state
    per_rank: dict[str, Any] = {"rng": rng_state()} if rng else {}
    for name, loader in objects.loaders.items():
        put(per_rank, slot("loader", name, objects.single), loader.state_dict())
    if step is None:
        step = next((optimizer.real_steps for optimizer in objects.optimizers.values()
                     if isinstance(optimizer, AccelOptimizer)), None)
    main = (lambda: _main_state(objects, step, extra)) if writer else None
    return Snapshot(full=full_parts, sharded=sharded_parts, per_rank=per_rank, main=main,
                    saved=_saved(objects, models_saved, rng, extra), step=step)


def _selected(module: torch.nn.Module, select: Select | None, name: str) -> set[str] | None:
    """The state names `select` keeps (None: no selection); the same on every rank."""
    if select is None:
        return None
    names = list(module.state_dict(keep_vars=True))
    kept = {key for key in names if select(key)}
    if not kept:
        raise InvalidArgumentError(
            f"save_state's select kept none of the {len(names)} tensors of model {name!r} "
            f"(e.g. {names[:3]}); it is called with each state name and returns True for "
            "those to save")
    return kept


def _select_optimizer(state: dict[str, Any] | None, kept: set[str]) -> dict[str, Any] | None:
    """The optimizer state of the kept parameters only (its param groups stay whole)."""
    if not state:
        return state
    return {**state, "state": {key: value for key, value in state.get("state", {}).items()
                               if key in kept}}


def _main_state(objects: Objects, step: int | None, extra: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = {"step": step, "extra": {
        name: value.state_dict() for name, value in extra.items()}}
    for name, optimizer in objects.optimizers.items():
        if isinstance(optimizer, AccelOptimizer):
            wrapper = {"real_steps": optimizer.real_steps}
            if optimizer.scaler is not None:
                wrapper["scaler"] = optimizer.scaler.state_dict()
            if optimizer.accumulation is not None:
                wrapper["accumulation"] = optimizer.accumulation.state_dict()
            put(state, slot("optimizer_wrapper", name, objects.single), wrapper)
    for name, scheduler in objects.schedulers.items():
        put(state, slot("scheduler", name, objects.single), scheduler.state_dict())
    return state


def _saved(objects: Objects, models: dict[str, Any], rng: bool,
           extra: Mapping[str, Any]) -> dict[str, Any]:
    """What accel.json lists as saved; the single form as accel's earlier checkpoints."""
    common = {"rng": rng, "extra": sorted(extra)}
    if objects.single:
        model = models["model"]
        optimizer = objects.optimizers.get("model")
        scheduler = objects.schedulers.get("scheduler")
        return {"model": True, "optimizer": optimizer is not None,
                "scheduler": scheduler is not None, "loader": bool(objects.loaders),
                **common, "tied": model["tied"], "selected": model["selected"],
                "optimizer_class": optimizer_class(optimizer),
                "scheduler_class": scheduler_class(scheduler)}
    return {"models": models,
            "optimizers": {name: {"part": objects.part("optimizer", name),
                                  "class": optimizer_class(optimizer)}
                           for name, optimizer in objects.optimizers.items()},
            "schedulers": {name: {"class": scheduler_class(scheduler)}
                           for name, scheduler in objects.schedulers.items()},
            "loaders": sorted(objects.loaders), **common}


# ---------------------------------------------------------------- staging for the background

def stage(snapshot: Snapshot, objects: Objects, ctx: Context, *, overlap: bool = False
          ) -> tuple[Snapshot, Deferred]:
    """A copy of `snapshot` that training can no longer change (see the module doc).

    `overlap`: the tensors only an optimizer step changes (the stepped parameters and the
    optimizer's state) are copied later, by `Deferred.run` in the background, while the
    training's next forward and backward read them; the next optimizer step waits for
    those copies first (`accel.checkpoint.staging_wait`). The rest is copied now.
    """
    global _staged
    live = _live_storage(objects, ctx)
    stepped = _stepped_storage(objects) if overlap else set()
    previous, _staged = _staged, {}
    deferred = Deferred()

    def copy(where: str, tree: Any, everything: bool) -> Any:
        def plan(tensor: torch.Tensor) -> str | None:
            storage = _storage(tensor)
            if storage in stepped:
                return "later"
            return "now" if everything or tensor.is_cuda or storage in live else None
        return _copy_tensors(tree, plan, (where,), previous, deferred)

    staged = Snapshot(
        full={part: copy(part, tree, False) for part, tree in snapshot.full.items()},
        sharded={part: copy(part, tree, False) for part, tree in snapshot.sharded.items()},
        per_rank=copy("per_rank", snapshot.per_rank, True),
        main=copy("main", snapshot.main_state(), True), saved=snapshot.saved,
        step=snapshot.step)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        deferred.after = torch.cuda.Event()
        deferred.after.record()  # the deferred copies read what the GPU has computed so far
        torch.cuda.synchronize()  # the non-blocking copies to pinned memory have landed
    return staged, deferred


@attrs.define
class Deferred:
    """Copies of stepped tensors left for the background (empty unless overlapping)."""

    #: (source, host copy, its place in the snapshot, the source's version at the save)
    copies: list[tuple[torch.Tensor, torch.Tensor, tuple[Any, ...], int]] = attrs.Factory(list)
    after: Any = None

    def run(self) -> None:
        """Make the copies; refuse if a source changed in place since the save began."""
        if not self.copies:
            return
        side = torch.cuda.Stream() if self.after is not None else None
        if side is not None:
            side.wait_event(self.after)
        with torch.cuda.stream(side) if side is not None else _nothing():
            for source, copy, _, _ in self.copies:
                copy.copy_(source, non_blocking=source.is_cuda)
        if side is not None:
            side.synchronize()
        changed = [where for source, _, where, version in self.copies
                   if source._version != version]
        if changed:
            raise CheckpointSaveError(
                f"{len(changed)} tensors (e.g. {'.'.join(map(str, changed[0]))}) changed in "
                "place after save_state(..., staging='overlap') and before the background "
                "copied them: with 'overlap' only an optimizer step may change the saved "
                "parameters until the next step begins; save with staging='copy' (the "
                "default), or change them after the next optimizer step")


def _stepped_storage(objects: Objects) -> set[int]:
    """Storages only a torch optimizer step changes: its parameters and its state."""
    tensors: list[torch.Tensor] = []
    for optimizer in objects.optimizers.values():
        inner = inner_optimizer(optimizer)
        if not isinstance(inner, torch.optim.Optimizer):  # an engine's own: its own step
            continue
        tensors += [param for group in inner.param_groups for param in group["params"]]
        for entry in inner.state.values():
            if isinstance(entry, Mapping):
                tensors += [value for value in entry.values() if isinstance(value, torch.Tensor)
                            and value.dim() > 0]  # a scalar step count: copied now
    return {_storage(tensor) for tensor in tensors}


def _live_storage(objects: Objects, ctx: Context) -> set[int]:
    """The storages of every model's and optimizer's own tensors (their local shards)."""
    tensors: list[torch.Tensor] = []
    for model in objects.models.values():
        tensors += unwrap_for_export(model, ctx).state_dict(keep_vars=True).values()
    for optimizer in objects.optimizers.values():
        for entry in getattr(inner_optimizer(optimizer), "state", {}).values():
            if isinstance(entry, Mapping):
                tensors += [value for value in entry.values() if isinstance(value, torch.Tensor)]
    return {_storage(tensor) for tensor in tensors}


def _storage(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.untyped_storage().data_ptr() if local.numel() else id(local)


def _copy_tensors(tree: Any, plan: Callable[[torch.Tensor], str | None],
                  where: tuple[Any, ...], previous: dict[tuple[Any, ...], torch.Tensor],
                  deferred: Deferred) -> Any:
    if isinstance(tree, torch.Tensor):
        when = plan(tree)
        return tree if when is None else _host_copy(tree, where, previous, deferred
                                                    if when == "later" else None)
    if isinstance(tree, Mapping):
        return {key: _copy_tensors(value, plan, (*where, key), previous, deferred)
                for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_copy_tensors(value, plan, (*where, index), previous, deferred)
                          for index, value in enumerate(tree))
    return tree


def _host_copy(tensor: torch.Tensor, where: tuple[Any, ...],
               previous: dict[tuple[Any, ...], torch.Tensor],
               deferred: Deferred | None) -> torch.Tensor:
    """`tensor` copied to the CPU (pinned memory from a GPU), now or, given `deferred`,
    by `deferred.run()`; a DTensor stays one."""
    if isinstance(tensor, DTensor):
        # the same placement over the same mesh, with a host copy of this rank's shard
        local = _host_copy(tensor.to_local(), where, previous, deferred)
        return DTensor(local, tensor._spec, requires_grad=False)
    copy = previous.get(where)
    if copy is None or copy.shape != tensor.shape or copy.dtype != tensor.dtype or (
            copy.is_pinned() != tensor.is_cuda):
        copy = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                           pin_memory=tensor.is_cuda)
    source = tensor.detach()
    if deferred is None:
        copy.copy_(source, non_blocking=tensor.is_cuda)
    else:
        deferred.copies.append((source, copy, where, source._version))
    _staged[where] = copy
    return copy
