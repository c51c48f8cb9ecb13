"""save_model / load_model: a model's full weights as Hugging Face-style safetensors.

`save_model` writes what `transformers`' `from_pretrained` reads: one `model.safetensors`,
or `model-0000k-of-0000n.safetensors` shards plus `model.safetensors.index.json`. Rank 0
writes tensor by tensor: an FSDP2 parameter is gathered (`DTensor.full_tensor`, every rank
takes part), copied to the CPU, written and dropped before the next one is gathered, so
no process ever holds more than one full tensor on top of its own shards.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from accel.backends import ENGINE_HOLDS_WEIGHTS, backend_for, has_capability
from accel.checkpoint.files import output_folder, replacing
from accel.checkpoint.ties import alias_groups, identity, kept_names
from accel.checkpoint.validate import raise_if_different, shape_of
from accel.checkpoint.weights import (
    INDEX_NAME,
    WEIGHTS_NAME,
    TensorSpec,
    WeightFiles,
    spec_of,
    write_safetensors_shards,
    write_text,
)
from accel.context import Context
from accel.errors import AccelError, InvalidArgumentError
from accel.inference.memory import parse_size
from accel.runtime.process import any_rank
from accel.validation import check_bool, check_context, check_module, check_type, fail

__all__ = ["INDEX_NAME", "WEIGHTS_NAME", "LoadResult", "load_model", "save_model"]


class LoadResult(NamedTuple):
    """Tensor names `load_model(strict=False)` skipped."""

    missing: list[str]
    unexpected: list[str]


# --------------------------------------------------------------------------- save


def save_model(model: nn.Module, directory: str | os.PathLike[str], ctx: Context, *,
               max_shard_size: int | str = "5GB") -> Path:
    """Write the model's full weights into `directory` as (sharded) safetensors; a collective.

    Unwraps DDP, FSDP2, DeepSpeed and torch.compile. Tied weights are written once, under
    the name transformers keeps (its `_tied_weights_keys` are dropped); a transformers
    model's config.json is written beside them. Rank 0 writes each file under a temporary
    name and renames it into place, the index last, then removes the weight files of an
    earlier save that this one did not rewrite; every other file in `directory` (a
    tokenizer, a README, subfolders) stays. Every rank returns once the files are in place.

    Args:
        directory: the folder to write into, created if absent ("." works).
        max_shard_size: largest shard file, bytes or "5GB"/"500MiB" (a larger tensor
            gets a file of its own); everything in one `model.safetensors` when it fits.

    Returns:
        The folder written.

    Raises:
        InvalidArgumentError: `directory` (or a folder above it) is a file, or
            max_shard_size is not positive.

    >>> accel.save_model(model, "export/", ctx, max_shard_size="2GB")
    >>> GPT2LMHeadModel.from_pretrained("export/")
    """
    _check_arguments("save_model", model, "directory", directory, ctx)
    max_bytes = _shard_bytes(max_shard_size)
    module = unwrap_for_export(model, ctx)
    specs, fetch = _full_state_source(model, module, ctx)
    target = Path(directory)
    folder, error = None, None  # folder: where this process writes (rank 0 only)
    if ctx.is_main_process:
        try:
            folder = output_folder(target)
            _write_config(module, folder)  # first: the weights' index is the last file written
        except (OSError, AccelError) as exc:  # rank 0 still takes part in the gathers below
            folder, error = None, exc
    try:
        write_safetensors_shards(specs, fetch, folder, max_shard_size=max_bytes)
    except (OSError, AccelError) as exc:
        error = error or exc
    # Instead of a bare barrier: the other ranks learn that rank 0 failed, and fail too.
    failed = any_rank(error is not None, ctx)
    if error is not None:
        raise error
    if failed:
        raise AccelError(f"rank 0 could not write {target}: see its error")
    return target


def unwrap_for_export(model: nn.Module, ctx: Context) -> nn.Module:
    """The user's module inside DDP / FSDP2 / DeepSpeed / torch.compile wrappers."""
    module = getattr(model, "_orig_mod", model)  # torch.compile around the engine's wrapper
    module = backend_for(ctx).unwrap_model(module)
    module = module.module if isinstance(module, DistributedDataParallel) else module
    return getattr(module, "_orig_mod", module)


def _full_state_source(model: nn.Module, module: nn.Module, ctx: Context
                       ) -> tuple[list[TensorSpec], Callable[[str], torch.Tensor | None]]:
    """The tensors to write, and how to get each one whole (None on ranks that do not write)."""
    live = module.state_dict(keep_vars=True)
    kept = kept_names(module, live)
    if has_capability(ctx, ENGINE_HOLDS_WEIGHTS):
        # ZeRO's master weights are flat partitions: the backend gathers them (rank 0 keeps
        # one full copy; the others receive nothing).
        full, _ = backend_for(ctx).get_state_dict(model, None, full=True)
        specs = [spec_of(name, full[name]) for name in kept if name in full]
        return specs, full.get
    for name in kept:
        if live[name].is_meta:
            raise InvalidArgumentError(
                f"{name} is on the meta device (no data): load or initialise the weights "
                "before save_model"
            )
    writer = ctx.is_main_process
    return [spec_of(name, live[name]) for name in kept], lambda name: _whole(live[name], writer)


def _write_config(module: nn.Module, directory: Path) -> None:
    # A transformers model's config.json, so that from_pretrained(directory) needs nothing else.
    config = getattr(module, "config", None)
    if hasattr(config, "to_json_string"):
        with replacing(directory / "config.json") as tmp:
            write_text(tmp, config.to_json_string())


def _whole(tensor: torch.Tensor, writer: bool) -> torch.Tensor | None:
    """The full tensor on the writer's CPU; DTensors are gathered on every rank."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu() if writer else None


# --------------------------------------------------------------------------- load


def _check_arguments(function: str, model: Any, name: str, path: Any, ctx: Any) -> None:
    check_module(function, "model", model)
    check_type(function, name, path, (str, os.PathLike), "a folder or file path (str or "
               "os.PathLike)")
    check_context(function, ctx)


_SHARD_SIZE = "an int > 0 (bytes) or a size such as '5GB' or '500MiB'"


def _shard_bytes(max_shard_size: Any) -> int:
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, (int, str)):
        fail("save_model", "max_shard_size", max_shard_size, _SHARD_SIZE)
    try:
        max_bytes = parse_size(max_shard_size)
    except InvalidArgumentError:
        max_bytes = 0
    if max_bytes <= 0:
        fail("save_model", "max_shard_size", max_shard_size, _SHARD_SIZE, wrong_type=False)
    return max_bytes


def load_model(model: nn.Module, path: str | os.PathLike[str], ctx: Context, *,
               strict: bool = True) -> LoadResult:
    """Load full weights into `model` (plain, DDP, FSDP2 or DeepSpeed); a collective.

    Reads what `save_model` and `save_pretrained` write: a folder with
    model.safetensors.index.json or model.safetensors, one .safetensors file, or foreign
    .bin/.pt files (through `torch.load(weights_only=True)`). Every file is checked
    before any weight is copied; safetensors weights are then copied into the model's own
    tensors straight from the file's mapping, each tensor's range read in whole first
    (no tensor in between). An FSDP2 rank keeps only its own slice of each tensor.
    For a model on the meta device or already sharded, where each rank should read only
    the slices it holds, use `accel.load_pretrained`.

    Raises:
        CheckpointMismatchError: (an InvalidArgumentError) listing every difference, before
            anything is copied: with strict=True, the missing and unexpected tensors;
            always, tensors whose shapes differ.
        CorruptCheckpointError: a truncated or unreadable file (named).
        UntrustedCheckpointError: the index names a file outside the folder.

    >>> accel.load_model(model, "export/", ctx)
    """
    _check_arguments("load_model", model, "path", path, ctx)
    check_bool("load_model", "strict", strict)
    sources = WeightFiles(path)
    module = unwrap_for_export(model, ctx)
    targets = module.state_dict(keep_vars=True)
    source_of, result = _match(targets, sources)
    _check_fits(sources, targets, source_of, result if strict else None)
    if has_capability(ctx, ENGINE_HOLDS_WEIGHTS):
        full = {name: sources.read(src) for name, src in source_of.items()} if ctx.rank == 0 else {}
        backend_for(ctx).set_state_dict(model, None, full, None, full=True)
        return result
    done = set()
    for name, source in source_of.items():
        target = targets[name]
        if identity(target) not in done:  # a tied tensor is copied once
            done.add(identity(target))
            with torch.no_grad():
                if isinstance(target, DTensor):
                    _copy_into_shard(target, sources.read(source))
                else:
                    sources.copy_into(source, target)
    return result


def _match(targets: dict[str, torch.Tensor], sources: WeightFiles
           ) -> tuple[dict[str, str], LoadResult]:
    """Target name -> source name (a tied tensor may come under any of its names)."""
    available = set(sources.names)
    aliases = {name: group for group in alias_groups(targets) for name in group}
    source_of, missing = {}, []
    for name in targets:
        found = [alias for alias in aliases.get(name, [name]) if alias in available]
        if name in available:
            source_of[name] = name
        elif found:
            source_of[name] = found[0]
        else:
            missing.append(name)
    unexpected = sorted(available - set(targets))
    return source_of, LoadResult(missing, unexpected)


def _check_fits(sources: WeightFiles, targets: dict[str, torch.Tensor],
                source_of: dict[str, str], names: LoadResult | None) -> None:
    """Every difference between the weights and the model (`names`: strict only).

    Raises:
        CheckpointMismatchError: listing them all.
    """
    found = []
    if names is not None and names.missing:
        found.append(f"missing {', '.join(names.missing)} (the model has them, the weights not)")
    if names is not None and names.unexpected:
        found.append(f"unexpected {', '.join(names.unexpected)} (in the weights, not the model)")
    for name, source in source_of.items():
        saved, shape = sources.spec(source).shape, shape_of(targets[name])
        if saved != shape:
            found.append(f"{source} in {sources.file_of[source].name} has shape {list(saved)}, "
                         f"the model's {name} has {list(shape)}")
    raise_if_different(found, sources.path, (
        "Load weights saved from this model, or pass strict=False to load only the tensors "
        "that both hold (their shapes must still match)."))


def _copy_into_shard(target: DTensor, source: torch.Tensor) -> None:
    # Every rank holds the file: it slices its own shard, nothing is sent.
    local = distribute_tensor(source.to(target.device, target.dtype), target.device_mesh,
                              target.placements, src_data_rank=None).to_local()
    target.to_local().copy_(local)

