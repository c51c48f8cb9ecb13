# ruff: noqa: F401  (the TYPE_CHECKING imports are what type checkers see of the lazy table)
"""accel: distributed PyTorch as composable pure functions over an immutable Context.

The public face: every name below is defined in the module the table names and loaded on
first use, so `import accel` costs little more than `import torch`, and an engine,
DTensor, checkpointing, inference or tracking code loads only when a program uses it.
See docs/architecture.md for the layers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: module -> the public names it defines (a module named alone is itself public).
_PUBLIC: dict[str, tuple[str, ...]] = {
    # core
    "accel.context": ("Context", "from_process_group", "init", "shutdown"),
    "accel.world": ("World", "detect_world"),
    "accel.runtime.ops": ("broadcast", "broadcast_object", "concatenate", "gather",
                          "gather_object", "pad_across_processes", "reduce", "send_to_device"),
    "accel.runtime.process": ("all_ranks", "any_rank", "local_main_process_first",
                              "main_process_first", "on_last_process",
                              "on_local_main_process", "on_main_process", "on_process",
                              "print", "split_between_processes", "wait_for_everyone"),
    "accel.runtime.seeding": ("set_seed", "synchronize_rng_states"),
    "accel.runtime.logging": ("get_logger",),
    "accel.runtime.memory": ("clear_device_cache", "find_executable_batch_size",
                             "is_out_of_memory", "release_memory"),
    "accel.runtime.profiling": ("profile_steps",),
    "accel.runtime.notebook": ("notebook_launch",),
    # engines
    "accel.backends": ("Strategy",),
    "accel.backends.single": ("Single",),
    "accel.backends.ddp": ("DDP",),
    "accel.backends.fsdp": ("FSDP",),
    "accel.backends.deepspeed.config": ("DeepSpeed",),
    "accel.backends.deepspeed.engine": ("deepspeed_init",),
    "accel.backends.xla": ("XLA",),
    "accel.backends.custom": ("Custom",),
    # transforms
    "accel.transforms.amp": ("with_amp",),
    "accel.transforms.compile": ("compile_model",),
    "accel.transforms.activation_checkpointing": ("checkpoint_activations",),
    "accel.transforms.sharding": ("shard_model", "unwrap_model"),
    "accel.transforms.tensor_parallel": ("loss_parallel", "tensor_parallel"),
    "accel.transforms.pipeline": ("Pipeline", "pipeline_parallel"),
    "accel.transforms.context_parallel": ("context_parallel",),
    "accel.transforms.optim": ("AccelOptimizer", "AccelScheduler", "backward",
                               "clip_grad_norm", "clip_grad_value", "wrap_optimizer",
                               "wrap_scheduler"),
    "accel.transforms.accumulation": ("accumulate_grads", "no_sync"),
    "accel.transforms.local_sgd": ("LocalSGD", "local_sgd"),
    "accel.transforms.join": ("join_uneven_inputs",),
    "accel.transforms.compose": ("compose",),
    "accel.transforms.settings": ("TrainingSettings", "training_settings"),
    "accel.data": ("DistributedLoader", "distribute_loader", "gather_for_metrics",
                   "skip_first_batches"),
    # services
    "accel.checkpoint": ("CheckpointFolder", "CheckpointInfo", "load_model", "load_state",
                         "save_model", "save_state"),
    "accel.checkpoint.pretrained": ("load_pretrained",),
    "accel.inference": ("check_device_map", "compute_module_sizes", "dispatch_model",
                        "dispatch_stats", "estimate_memory", "explain_device_map",
                        "infer_device_map", "init_empty_weights", "init_on_device",
                        "load_checkpoint_and_dispatch", "remove_dispatch"),
    "accel.tracking": ("Tracker", "Trackers", "init_trackers"),
    "accel.tracking.plot": ("plot_metrics",),
    "accel.tracking.progress": ("progress",),
}
_SUBMODULES = ("backends", "checkpoint", "cli", "context", "data", "errors", "inference",
               "mesh", "runtime", "testing", "tracking", "transforms", "world")
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = sorted([*_HOME, "errors"])


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is not None:
        value = getattr(importlib.import_module(home), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'accel' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME, *_SUBMODULES})


if TYPE_CHECKING:  # what type checkers and IDEs see; the table above is what runs
    from accel import errors
    from accel.backends import Strategy
    from accel.backends.custom import Custom
    from accel.backends.ddp import DDP
    from accel.backends.deepspeed.config import DeepSpeed
    from accel.backends.deepspeed.engine import deepspeed_init
    from accel.backends.fsdp import FSDP
    from accel.backends.single import Single
    from accel.backends.xla import XLA
    from accel.checkpoint import (
        CheckpointFolder,
        CheckpointInfo,
        load_model,
        load_state,
        save_model,
        save_state,
    )
    from accel.checkpoint.pretrained import load_pretrained
    from accel.context import Context, from_process_group, init, shutdown
    from accel.data import (
        DistributedLoader,
        distribute_loader,
        gather_for_metrics,
        skip_first_batches,
    )
    from accel.runtime.notebook import notebook_launch
    from accel.transforms.accumulation import accumulate_grads, no_sync
    from accel.transforms.activation_checkpointing import checkpoint_activations
    from accel.transforms.amp import with_amp
    from accel.transforms.compile import compile_model
    from accel.transforms.compose import compose
    from accel.transforms.optim import (
        AccelOptimizer,
        AccelScheduler,
        backward,
        clip_grad_norm,
        clip_grad_value,
        wrap_optimizer,
        wrap_scheduler,
    )
    from accel.transforms.pipeline import Pipeline, pipeline_parallel
    from accel.transforms.sharding import shard_model, unwrap_model
    from accel.transforms.tensor_parallel import loss_parallel, tensor_parallel
    from accel.world import World, detect_world
