"""accel: distributed PyTorch as composable pure functions over an immutable Context."""

from accel import errors
from accel.accumulation import accumulate_grads, no_sync
from accel.amp import with_amp
from accel.backends.deepspeed.engine import deepspeed_init
from accel.compose import compose
from accel.context import Context, from_process_group, init, shutdown
from accel.data import (
    DistributedLoader,
    distribute_loader,
    gather_for_metrics,
    skip_first_batches,
)
from accel.join import join_uneven_inputs
from accel.local_sgd import LocalSGD, local_sgd
from accel.logging import get_logger
from accel.ops import (
    broadcast,
    broadcast_object,
    concatenate,
    gather,
    gather_object,
    pad_across_processes,
    reduce,
    send_to_device,
)
from accel.optim import (
    AccelOptimizer,
    AccelScheduler,
    backward,
    clip_grad_norm,
    clip_grad_value,
    wrap_optimizer,
    wrap_scheduler,
)
from accel.process import (
    all_ranks,
    any_rank,
    local_main_process_first,
    main_process_first,
    on_last_process,
    on_local_main_process,
    on_main_process,
    on_process,
    print,
    split_between_processes,
    wait_for_everyone,
)
from accel.seeding import set_seed, synchronize_rng_states
from accel.sharding import DDP, FSDP, XLA, DeepSpeed, Single, shard_model, unwrap_model
from accel.world import World, detect_world

__version__ = "0.1.0"

__all__ = [
    "AccelOptimizer",
    "AccelScheduler",
    "Context",
    "DDP",
    "DeepSpeed",
    "DistributedLoader",
    "FSDP",
    "LocalSGD",
    "Single",
    "XLA",
    "World",
    "accumulate_grads",
    "all_ranks",
    "any_rank",
    "backward",
    "broadcast",
    "broadcast_object",
    "clip_grad_norm",
    "clip_grad_value",
    "compose",
    "concatenate",
    "deepspeed_init",
    "detect_world",
    "distribute_loader",
    "errors",
    "from_process_group",
    "gather",
    "gather_for_metrics",
    "gather_object",
    "get_logger",
    "init",
    "join_uneven_inputs",
    "local_main_process_first",
    "local_sgd",
    "main_process_first",
    "no_sync",
    "on_last_process",
    "on_local_main_process",
    "on_main_process",
    "on_process",
    "pad_across_processes",
    "print",
    "reduce",
    "send_to_device",
    "set_seed",
    "shard_model",
    "shutdown",
    "skip_first_batches",
    "split_between_processes",
    "synchronize_rng_states",
    "unwrap_model",
    "wait_for_everyone",
    "with_amp",
    "wrap_optimizer",
    "wrap_scheduler",
]

# Big-model inference: meta init, device maps, CPU/disk offload, streaming loads, estimates.
from accel.inference import (  # noqa: E402
    check_device_map,
    compute_module_sizes,
    dispatch_model,
    dispatch_stats,
    estimate_memory,
    explain_device_map,
    infer_device_map,
    init_empty_weights,
    init_on_device,
    load_checkpoint_and_dispatch,
    remove_dispatch,
)

__all__ += [
    "check_device_map",
    "compute_module_sizes",
    "dispatch_model",
    "dispatch_stats",
    "estimate_memory",
    "explain_device_map",
    "infer_device_map",
    "init_empty_weights",
    "init_on_device",
    "load_checkpoint_and_dispatch",
    "remove_dispatch",
]

# Checkpoints: exact resume, numbered folders, model export.
from accel.checkpoint import (  # noqa: E402
    CheckpointFolder,
    CheckpointInfo,
    load_model,
    load_state,
    save_model,
    save_state,
)

__all__ += ["CheckpointFolder", "CheckpointInfo", "load_model", "load_state", "save_model",
            "save_state"]

# Around training: trackers, plots, progress bars, launch settings, memory, profiling.
from accel.cli.settings import TrainingSettings, training_settings  # noqa: E402
from accel.memory import (  # noqa: E402
    clear_device_cache,
    find_executable_batch_size,
    is_out_of_memory,
    release_memory,
)
from accel.plot import plot_metrics  # noqa: E402
from accel.profiling import profile_steps  # noqa: E402
from accel.progress import progress  # noqa: E402  (the function; the module stays importable)
from accel.tracking import Tracker, Trackers, init_trackers  # noqa: E402

__all__ += [
    "Tracker",
    "Trackers",
    "TrainingSettings",
    "clear_device_cache",
    "find_executable_batch_size",
    "init_trackers",
    "is_out_of_memory",
    "plot_metrics",
    "profile_steps",
    "progress",
    "release_memory",
    "training_settings",
]
