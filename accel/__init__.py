"""accel: distributed PyTorch as composable pure functions over an immutable Context."""

from accel import errors
from accel.context import Context, from_process_group, init, shutdown
from accel.random import set_seed, synchronize_rng_states
from accel.world import World, detect_world

__version__ = "0.1.0"

__all__ = [
    "Context",
    "World",
    "detect_world",
    "errors",
    "from_process_group",
    "init",
    "set_seed",
    "shutdown",
    "synchronize_rng_states",
]
