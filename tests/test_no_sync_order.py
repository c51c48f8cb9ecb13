"""no_sync's rule in any order: a backward synchronises iff its graph's forward ran outside.

Forwards collected first and backpropagated later, in the order the issue reported
(forwards 0 and 1 in the block, 2 after it, backwards 0, 1, 2) and its mirror (forward 2
before the block), on 2 real ranks with different data per rank, under DDP and FSDP2.
The parent process computes what the rule promises with plain autograd on one process.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import accel
from accel.errors import GradSyncOrderError
from accel.testing import run_world

WORLD, LR = 2, 0.1

# FSDP2's forward returns a view of its output; nothing here changes it in place.
pytestmark = pytest.mark.filterwarnings("ignore:FSDP2-wrapped module .* returned a view")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def batch(rank: int, index: int) -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(100 * rank + index))


def loss_of(model: nn.Module, rank: int, index: int) -> torch.Tensor:
    return model(batch(rank, index)).pow(2).mean()


def full(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None:
        return None
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def grads_of(model: nn.Module) -> list[torch.Tensor | None]:
    return [full(p.grad) for p in model.parameters()]


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [full(p) for p in model.parameters()]


# ---------------------------------------------------------------- what each rank runs


def collect_then_backprop(ctx, strategy, inside, outside_first, order, **options) -> dict:
    """Forwards of `inside` in the block, the others outside (before it if
    `outside_first`), then the backward passes in `order`, then one optimizer step."""
    model, ctx = accel.shard_model(make_model(), ctx, strategy=strategy(**options))
    optimizer, ctx = accel.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=LR), ctx)
    outside = [i for i in order if i not in inside]
    losses = {i: loss_of(model, ctx.rank, i) for i in outside if outside_first}
    with accel.no_sync(model, ctx):
        losses.update({i: loss_of(model, ctx.rank, i) for i in inside})
    losses.update({i: loss_of(model, ctx.rank, i) for i in outside if not outside_first})
    after = []
    for i in order:
        accel.backward(losses[i], optimizer, ctx)
        after.append(grads_of(model))
    optimizer.step()
    return {"grads": after[-1], "params": params_of(model), "after_each": after}


def refused_order(ctx) -> str:
    """The issue's order under DDP(find_unused_parameters=True), where accel cannot re-arm."""
    try:
        collect_then_backprop(ctx, accel.DDP, [0, 1], False, [0, 1, 2],
                              find_unused_parameters=True)
    except GradSyncOrderError as exc:
        return str(exc)
    return "no error"


def both_engines(ctx, strategy) -> dict:
    return {
        "issue": collect_then_backprop(ctx, strategy, [0, 1], False, [0, 1, 2]),
        "mirror": collect_then_backprop(ctx, strategy, [0, 1], True, [0, 1, 2]),
        "outside_forward_backward_in_block": outside_backward_in_block(ctx, strategy),
    }


def ddp_scenarios(ctx) -> dict:
    ddp = accel.DDP
    return {
        **both_engines(ctx, ddp),
        "synced_first": collect_then_backprop(ctx, ddp, [0, 1], False, [2, 0, 1]),
        "block_only": collect_then_backprop(ctx, ddp, [0, 1], False, [0, 1]),
        "find_unused_in_order": collect_then_backprop(ctx, ddp, [0], True, [1, 0],
                                                      find_unused_parameters=True),
        "find_unused_refused": refused_order(ctx),
    }


def fsdp_scenarios(ctx) -> dict:
    return {
        **both_engines(ctx, accel.FSDP),
        "block_then_synced": collect_then_backprop(ctx, accel.FSDP, [0, 1], True, [0, 1, 3]),
    }


def outside_backward_in_block(ctx, strategy) -> dict:
    """Forward 2 outside, then inside the block forward 0 and the backward passes 0 and 2."""
    model, ctx = accel.shard_model(make_model(), ctx, strategy=strategy())
    optimizer, ctx = accel.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=LR), ctx)
    outside = loss_of(model, ctx.rank, 2)
    with accel.no_sync(model, ctx):
        accel.backward(loss_of(model, ctx.rank, 0), optimizer, ctx)
        accel.backward(outside, optimizer, ctx)
    return {"grads": grads_of(model)}


@pytest.fixture(scope="module")
def ddp_ranks():
    return run_world(ddp_scenarios, WORLD)


@pytest.fixture(scope="module")
def fsdp_ranks():
    return run_world(fsdp_scenarios, WORLD)


# ---------------------------------------------------------------- what the rule promises


def promised(synced: list[int], local: list[int], rank: int) -> list[torch.Tensor]:
    """Gradients on `rank`: the mean over ranks of `synced` batches plus its own `local`."""
    model = make_model()
    total = sum(loss_of(model, r, i) for r in range(WORLD) for i in synced) / WORLD
    total = total + sum(loss_of(model, rank, i) for i in local)
    total.backward()
    return [p.grad for p in model.parameters()]


def stepped(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach() - LR * g for p, g in zip(make_model().parameters(), grads, strict=True)]


def assert_close(got, want):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def assert_replicas_equal(ranks, scenario, what):
    for a, b in zip(ranks[0][scenario][what], ranks[1][scenario][what], strict=True):
        assert torch.equal(a, b), f"{scenario}: the replicas' {what} differ"


# ---------------------------------------------------------------- DDP and FSDP2

#: the batches whose backward passes the last, synchronised one reduces, per scenario.
COLLECTED = {"issue": [0, 1, 2], "mirror": [0, 1, 2], "block_then_synced": [0, 1, 3]}


@pytest.mark.spawned
@pytest.mark.parametrize(("engine", "scenario"), [
    ("ddp", "issue"), ("ddp", "mirror"),
    ("fsdp", "issue"), ("fsdp", "mirror"), ("fsdp", "block_then_synced")])
def test_collected_forwards_sync_once_everything_is_backpropagated(request, engine, scenario):
    # The last backward's forward ran outside: it reduces what the others left locally.
    ranks = request.getfixturevalue(f"{engine}_ranks")
    want = promised(COLLECTED[scenario], [], 0)
    assert_replicas_equal(ranks, scenario, "grads")
    assert_replicas_equal(ranks, scenario, "params")
    for result in ranks:
        assert_close(result[scenario]["grads"], want)
        assert_close(result[scenario]["params"], stepped(want))


@pytest.mark.spawned
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_backward_of_an_outside_forward_inside_the_block_is_synced(request, engine):
    # FSDP2 did not before: it reads its switch in backward, and the block had it off.
    for result in request.getfixturevalue(f"{engine}_ranks"):
        assert_close(result["outside_forward_backward_in_block"]["grads"],
                     promised([0, 2], [], 0))


@pytest.mark.spawned
def test_ddp_block_backward_after_the_synced_one_stays_local(ddp_ranks):
    # Backward 2 (forward outside) first, then 0 and 1 (forwards inside): only 2 is
    # reduced, as the rule says; the replicas differ, as under torch's own no_sync.
    for rank, result in enumerate(ddp_ranks):
        assert_close(result["synced_first"]["after_each"][0], promised([2], [], rank))
        assert_close(result["synced_first"]["grads"], promised([2], [0, 1], rank))


@pytest.mark.spawned
def test_ddp_graphs_of_the_block_backpropagated_after_it_stay_local(ddp_ranks):
    for rank, result in enumerate(ddp_ranks):
        assert_close(result["block_only"]["grads"], promised([], [0, 1], rank))


@pytest.mark.spawned
def test_ddp_find_unused_parameters_works_in_order_and_refuses_what_it_cannot_honour(
        ddp_ranks):
    # Backward 1 (forward outside, before the block) first: DDP's own arming serves it.
    for rank, result in enumerate(ddp_ranks):
        assert_close(result["find_unused_in_order"]["grads"], promised([1], [0], rank))
        message = result["find_unused_refused"]
        assert "DDP(find_unused_parameters=True)" in message
        assert "outside accel.no_sync" in message


@pytest.mark.spawned
def test_fsdp_block_graphs_stay_local_until_a_synced_backward(fsdp_ranks):
    # FSDP2 keeps unsynced gradients unsharded and out of `.grad`: none after 0 and 1.
    for result in fsdp_ranks:
        first, second, _ = result["block_then_synced"]["after_each"]
        assert first == [None] * len(first) and second == [None] * len(second)
