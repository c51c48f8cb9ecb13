"""Seeds and random-number-generator state across ranks."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist

from accel.context import Context
from accel.validation import check_bool, check_context, check_int, check_seed, check_type


def set_seed(seed: int, ctx: Context | None = None, *, deterministic: bool = False,
             per_rank: bool = False) -> int:
    """Seed python, numpy, torch (CPU and every CUDA device); return the seed used.

    Args:
        per_rank: add the rank to the seed, so ranks draw different numbers (data
            augmentation); the default gives every rank the same stream (initialisation).
        deterministic: also ask torch for deterministic algorithms (slower; raises on an
            op that has none).

    >>> accel.set_seed(42, ctx)
    """
    check_seed("set_seed", seed)
    check_context("set_seed", ctx, optional=True)
    check_bool("set_seed", "deterministic", deterministic)
    check_bool("set_seed", "per_rank", per_rank)
    if per_rank and ctx is not None:
        seed += ctx.rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    return seed


def synchronize_rng_states(ctx: Context, *, src: int = 0, generator: torch.Generator | None = None,
                           python: bool = True, numpy: bool = True) -> None:
    """Copy rank `src`'s RNG states (torch CPU and CUDA, python, numpy) to every rank.

    Pass `generator` to synchronise that generator too (e.g. a sampler's).
    """
    check_context("synchronize_rng_states", ctx)
    check_int("synchronize_rng_states", "src", src, minimum=0, maximum=ctx.world_size - 1)
    check_type("synchronize_rng_states", "generator", generator, torch.Generator,
               "a torch.Generator (or None)", optional=True)
    check_bool("synchronize_rng_states", "python", python)
    check_bool("synchronize_rng_states", "numpy", numpy)
    if not ctx.is_distributed:
        return
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if ctx.device.type == "cuda" else None,
        "python": random.getstate() if python else None,
        "numpy": np.random.get_state() if numpy else None,
        "generator": generator.get_state() if generator is not None else None,
    }
    box = [state]
    dist.broadcast_object_list(box, src=src, group=ctx.group,
                               device=ctx.device if ctx.device.type == "cuda" else None)
    state = box[0]
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    if python:
        random.setstate(state["python"])
    if numpy:
        np.random.set_state(state["numpy"])
    if generator is not None:
        generator.set_state(state["generator"])
