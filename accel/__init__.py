"""accel: distributed PyTorch as composable pure functions over an immutable Context."""

from accel import errors
from accel.accumulation import accumulate_grads, no_sync
from accel.amp import with_amp
from accel.compose import compose
from accel.context import Context, from_process_group, init, shutdown
from accel.local_sgd import LocalSGD, local_sgd
from accel.optim import (
    AccelOptimizer,
    AccelScheduler,
    backward,
    clip_grad_norm,
    clip_grad_value,
    wrap_optimizer,
    wrap_scheduler,
)
from accel.seeding import set_seed, synchronize_rng_states
from accel.sharding import DDP, Single, shard_model, unwrap_model
from accel.world import World, detect_world

__version__ = "0.1.0"

__all__ = [
    "DDP",
    "AccelOptimizer",
    "AccelScheduler",
    "Context",
    "Single",
    "World",
    "accumulate_grads",
    "backward",
    "clip_grad_norm",
    "clip_grad_value",
    "compose",
    "detect_world",
    "errors",
    "from_process_group",
    "init",
    "local_sgd",
    "LocalSGD",
    "no_sync",
    "set_seed",
    "shard_model",
    "shutdown",
    "synchronize_rng_states",
    "unwrap_model",
    "with_amp",
    "wrap_optimizer",
    "wrap_scheduler",
]
