"""Tutorial 05: write your own transform and unit-test it with accel.testing.

A transform is a plain function: objects + Context in, objects + new Context out. So it
can be tested like any function, on every rank of any world size, without a cluster.

This file is a pytest module. Run its tests with either of:

    python -m pytest tutorials/05_unit_testing_a_transform.py -q
    python tutorials/05_unit_testing_a_transform.py

Under a launcher it does not run the tests (they start their own worlds): it applies the
transform on the launched processes and checks that every rank agrees:

    accel launch -n 2 tutorials/05_unit_testing_a_transform.py

Two tools from accel.testing:
- fake_world(rank, world_size): this one process believes it is `rank` of `world_size`
  (no numbers move between ranks): for rank-dependent decisions, in milliseconds.
- run_world(fn, world_size): real processes joined by gloo, each running fn(ctx):
  for numbers that cross ranks, in a few seconds.
"""

from __future__ import annotations

import pytest
import torch

import accel
from accel.testing import fake_world, run_world


# --- the transform under test -------------------------------------------------------
def scale_lr_with_world(
    optimizer: torch.optim.Optimizer, ctx: accel.Context, *, base_batch_ranks: int = 1
) -> tuple[torch.optim.Optimizer, accel.Context]:
    """Linear LR scaling: multiply every group's lr by world_size / base_batch_ranks."""
    if ctx.was_applied("scale_lr_with_world"):
        raise accel.errors.TransformOrderError("scale_lr_with_world was already applied")
    factor = ctx.world_size / base_batch_ranks
    for group in optimizer.param_groups:
        group["lr"] *= factor
    return optimizer, ctx.record(f"scale_lr_with_world(x{factor:g})")


def make_optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)


# --- fast tests: every world size, in one process -------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_scales_by_world_size(world_size):
    with fake_world(rank=world_size - 1, world_size=world_size) as ctx:
        optimizer, ctx = scale_lr_with_world(make_optimizer(), ctx)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * world_size)
        assert ctx.applied[-1] == f"scale_lr_with_world(x{world_size})"


def test_refuses_to_apply_twice():
    with fake_world(rank=0, world_size=2) as ctx:
        optimizer, ctx = scale_lr_with_world(make_optimizer(), ctx)
        with pytest.raises(accel.errors.TransformOrderError):
            scale_lr_with_world(optimizer, ctx)


# --- real test: the learning rate agrees on every rank of a real world ----------------
def lr_on_this_rank(ctx: accel.Context) -> float:
    optimizer, ctx = scale_lr_with_world(make_optimizer(), ctx)
    lrs = accel.gather_object([optimizer.param_groups[0]["lr"]], ctx)
    assert len(set(lrs)) == 1, f"ranks disagree: {lrs}"
    return lrs[0]


def test_ranks_agree_in_a_real_world():
    assert run_world(lr_on_this_rank, world_size=2) == [pytest.approx(0.2)] * 2


# --- run as a script ----------------------------------------------------------------
if __name__ == "__main__":
    import os
    import sys

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accel launch -n N: the world is here
        ctx = accel.init()
        lr = lr_on_this_rank(ctx)
        accel.print(f"scale_lr_with_world on {ctx.world_size} launched processes: "
                    f"lr {lr:g} on every rank", ctx=ctx, per_node=False)
        accel.shutdown(ctx)
    else:  # python tutorials/05_...py: this file's tests
        sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
