"""accumulate_grads and no_sync: gradients are exchanged exactly where they should be.

One world of 2 real ranks (DDP) runs every scenario; the parent process computes each
reference with plain autograd on one process.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import accel
from accel.data import distribute_loader
from accel.errors import IncompatibleOptionsError, TransformOrderError
from accel.testing import fake_world, run_world

WORLD, K, LR = 2, 2, 0.1


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 2)


def micro_batch(rank: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s micro-batch number `index` (4 samples)."""
    gen = torch.Generator().manual_seed(1000 * rank + index)
    x = torch.randn(4, 4, generator=gen)
    return x, x[:, :2] * 3 - 1


def loss_on(model: nn.Module, rank: int, index: int) -> torch.Tensor:
    x, y = micro_batch(rank, index)
    return nn.functional.mse_loss(model(x), y)


def prepare(ctx: accel.Context, steps: int = K, **options):
    model, ctx = accel.shard_model(make_model(), ctx, strategy="ddp")
    optimizer, ctx = accel.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=LR), ctx)
    if steps:
        model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx, steps=steps,
                                                       **options)
    return model, optimizer, ctx


def grads_of(model: nn.Module) -> list[torch.Tensor] | None:
    if any(p.grad is None for p in model.parameters()):
        return None
    return [p.grad.detach().clone() for p in model.parameters()]


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------- what each rank runs


def accumulation_cycle(ctx: accel.Context, sync_each_batch: bool = False) -> list[dict]:
    """Two cycles of K micro-steps; what the loop can observe at each one."""
    model, optimizer, ctx = prepare(ctx, sync_each_batch=sync_each_batch)
    records = []
    for index in range(2 * K):
        record = {}
        accel.backward(loss_on(model, ctx.rank, index), optimizer, ctx)
        record["sync_gradients"] = optimizer.sync_gradients  # decided at the forward
        record["grads"] = grads_of(model)
        record["step_result"] = optimizer.step()
        record["skipped"] = optimizer.step_was_skipped
        record["params"] = params_of(model)
        optimizer.zero_grad()
        record["grads_after_zero"] = grads_of(model)
        records.append(record)
    return records


def extra_forward_under_no_sync(ctx: accel.Context, steps: int) -> dict:
    """A second forward under no_sync, then one backward of both losses (synced once)."""
    model, optimizer, ctx = prepare(ctx, steps=steps)
    if steps > 1:  # a first, non-boundary micro-step; the extra forward is in the boundary one
        accel.backward(loss_on(model, ctx.rank, 0), optimizer, ctx)
        optimizer.step()
        optimizer.zero_grad()
    flags = []
    with accel.no_sync(model, ctx):
        extra = loss_on(model, ctx.rank, 7)
        with accel.no_sync(model, ctx):
            pass
        flags.append(model.require_backward_grad_sync)  # still off after the inner block
    flags.append(model.require_backward_grad_sync)
    main = loss_on(model, ctx.rank, 8)
    accel.backward(extra + main, optimizer, ctx)
    return {"grads": grads_of(model), "flags": flags}


def epoch_with_loader(ctx: accel.Context) -> dict:
    """The loader's last batch ends a cycle early (5 batches per rank, K = 2)."""
    model, ctx = accel.shard_model(make_model(), ctx, strategy="ddp")
    optimizer, ctx = accel.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=LR), ctx)
    loader, ctx = distribute_loader(DataLoader(loader_data(), batch_size=2), ctx)
    model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx, steps=K, loader=loader)
    return {"epochs": train_on_loader(model, optimizer, loader, ctx), "params": params_of(model),
            "trail": ctx.applied}


def loader_data() -> TensorDataset:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(20, 4, generator=gen)
    return TensorDataset(x, x[:, :2] * 2)


def train_on_loader(model, optimizer, loader, ctx) -> list[dict]:
    epochs = []
    for _ in range(2):
        sync, last_grads = [], None
        for x, y in loader:
            accel.backward(nn.functional.mse_loss(model(x), y), optimizer, ctx)
            sync.append(optimizer.sync_gradients)
            last_grads = grads_of(model)
            optimizer.step()
            optimizer.zero_grad()
        epochs.append({"sync": sync, "real_steps": optimizer.real_steps,
                       "last_grads": last_grads})
    return epochs


def every_scenario(ctx: accel.Context) -> dict:
    return {
        "cycle": accumulation_cycle(ctx),
        "sync_each_batch": accumulation_cycle(ctx, sync_each_batch=True),
        "no_sync_plain": extra_forward_under_no_sync(ctx, steps=0),
        "no_sync_accumulating": extra_forward_under_no_sync(ctx, steps=K),
        "loader": epoch_with_loader(ctx),
    }


@pytest.fixture(scope="module")
def ranks():
    return run_world(every_scenario, WORLD)


# ---------------------------------------------------------------- references (one process)


def reference_grads(params: list[torch.Tensor], batches: list[tuple[int, int]],
                    scale: float = 1.0) -> list[torch.Tensor]:
    """Gradient of scale * sum of the losses of `batches`, averaged over the ranks."""
    model = make_model()
    with torch.no_grad():
        for p, value in zip(model.parameters(), params, strict=True):
            p.copy_(value)
    total = sum(loss_on(model, rank, index) for rank, index in batches)
    (total * scale / WORLD).backward()
    return [p.grad for p in model.parameters()]


def assert_all_close(got, want, atol=1e-6):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-5)


def differs(got, want) -> bool:
    return any((g - w).abs().max() > 1e-4 for g, w in zip(got, want, strict=True))


# ---------------------------------------------------------------- tests


@pytest.mark.spawned
def test_non_boundary_micro_steps_keep_local_gradients(ranks):
    init = params_of(make_model())
    synced_partial = reference_grads(init, [(r, 0) for r in range(WORLD)], 1 / K)
    for rank, result in enumerate(ranks):
        first = result["cycle"][0]
        local = reference_grads(init, [(rank, 0)], WORLD / K)  # this rank's own, not averaged
        assert first["sync_gradients"] is False
        assert_all_close(first["grads"], local)
        assert differs(first["grads"], synced_partial)


@pytest.mark.spawned
def test_boundary_micro_steps_match_the_full_batch(ranks):
    params = params_of(make_model())
    for cycle in range(2):
        batches = [(r, i) for r in range(WORLD) for i in range(cycle * K, (cycle + 1) * K)]
        full = reference_grads(params, batches, 1 / K)
        expected_params = [p - LR * g for p, g in zip(params, full, strict=True)]
        for result in ranks:
            boundary = result["cycle"][cycle * K + K - 1]
            assert boundary["sync_gradients"] is True
            assert_all_close(boundary["grads"], full)
            assert_all_close(boundary["params"], expected_params)
        params = expected_params


@pytest.mark.spawned
def test_step_and_zero_grad_act_only_at_boundaries(ranks):
    init = params_of(make_model())
    for result in ranks:
        records = result["cycle"]
        assert [r["skipped"] for r in records] == [True, False, True, False]
        assert [r["step_result"] for r in records] == [None] * 4  # SGD returns None
        assert [r["sync_gradients"] for r in records] == [False, True, False, True]
        # mid-cycle: parameters untouched, gradients kept through zero_grad
        assert_all_close(records[0]["params"], init, atol=0)
        assert_all_close(records[0]["grads_after_zero"], records[0]["grads"], atol=0)
        assert records[1]["grads_after_zero"] is None
        assert records[3]["grads_after_zero"] is None


@pytest.mark.spawned
def test_sync_each_batch_synchronises_every_micro_step(ranks):
    init = params_of(make_model())
    synced_partial = reference_grads(init, [(r, 0) for r in range(WORLD)], 1 / K)
    for result in ranks:
        first = result["sync_each_batch"][0]
        assert first["sync_gradients"] is False and first["skipped"]  # still no update
        assert_all_close(first["grads"], synced_partial)
    # both modes reach the same parameters
    for plain, each in zip(ranks[0]["cycle"], ranks[0]["sync_each_batch"], strict=True):
        assert_all_close(each["params"], plain["params"])


@pytest.mark.spawned
@pytest.mark.parametrize("scenario", ["no_sync_plain", "no_sync_accumulating"])
def test_extra_forward_under_no_sync_is_covered_by_the_next_all_reduce(ranks, scenario):
    init = params_of(make_model())
    batches = [(r, i) for r in range(WORLD) for i in (7, 8)]
    if scenario == "no_sync_plain":
        expected = reference_grads(init, batches)
    else:  # micro-step 0 (local, kept) + the boundary one, all divided by K
        expected = reference_grads(init, batches + [(r, 0) for r in range(WORLD)], 1 / K)
    for result in ranks:
        assert_all_close(result[scenario]["grads"], expected)
        assert result[scenario]["flags"] == [False, True]


@pytest.mark.spawned
def test_last_batch_of_the_loader_ends_the_cycle(ranks):
    for result in ranks:
        first, second = result["loader"]["epochs"]
        assert first["sync"] == [False, True, False, True, True]
        assert second["sync"] == first["sync"]  # a new epoch starts a new cycle
        assert (first["real_steps"], second["real_steps"]) == (3, 6)
        assert "accumulate_grads(steps=2)" in result["loader"]["trail"]
    # the short last cycle was all-reduced: every rank holds the same gradients
    assert_all_close(ranks[0]["loader"]["epochs"][0]["last_grads"],
                     ranks[1]["loader"]["epochs"][0]["last_grads"], atol=0)


@pytest.mark.spawned
def test_loader_cycles_match_one_process(ranks):
    model, optimizer, ctx = prepare_single()
    loader, ctx = distribute_loader(DataLoader(loader_data(), batch_size=2 * WORLD), ctx)
    model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx, steps=K, loader=loader)
    epochs = train_on_loader(model, optimizer, loader, ctx)
    assert epochs[0]["sync"] == [False, True, False, True, True]
    for result in ranks:
        assert_all_close(result["loader"]["params"], params_of(model))


def prepare_single():
    model, ctx = accel.shard_model(make_model(), accel.Context())
    optimizer, ctx = accel.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=LR), ctx)
    return model, optimizer, ctx


# ---------------------------------------------------------------- one process


def test_one_process_counts_micro_steps_and_records():
    model, optimizer, ctx = prepare_single()
    model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx, steps=3)
    assert ctx.grad_accum_steps == 3 and ctx.applied[-1] == "accumulate_grads(steps=3)"
    assert repr(optimizer) == "AccelOptimizer(SGD, accumulation 3)"
    seen = []
    for index in range(6):
        accel.backward(loss_on(model, 0, index), optimizer, ctx)
        seen.append(optimizer.sync_gradients)
        optimizer.step()
        optimizer.zero_grad()
    assert seen == [False, False, True] * 2 and optimizer.real_steps == 2


def test_accumulation_state_round_trip_and_detach():
    model, optimizer, ctx = prepare_single()
    model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx, steps=3)
    accel.backward(loss_on(model, 0, 0), optimizer, ctx)
    optimizer.step()
    state = optimizer.accumulation.state_dict()
    assert state == {"micro_step": 1}
    _, other, _ = accel.accumulate_grads(*prepare_single(), steps=3)
    other.accumulation.load_state_dict(state)
    assert other.accumulation.micro_step == 1 and not other.sync_gradients
    hooks = len(model._forward_pre_hooks)
    optimizer.accumulation.remove()
    assert len(model._forward_pre_hooks) == hooks - 1


def test_no_sync_on_one_process_just_accumulates():
    model, optimizer, ctx = prepare_single()
    with accel.no_sync(model, ctx):
        accel.backward(loss_on(model, 0, 0), optimizer, ctx)
    accel.backward(loss_on(model, 0, 1), optimizer, ctx)
    expected = reference_grads(params_of(make_model()), [(0, 0), (0, 1)], WORLD)
    assert_all_close(grads_of(model), expected)
    assert not model._forward_pre_hooks  # no_sync's hook left with the block


def test_accumulate_grads_errors_name_the_fix():
    model, optimizer, ctx = prepare_single()
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(IncompatibleOptionsError, match="positive integer"):
            accel.accumulate_grads(model, optimizer, ctx, steps=bad)
    raw = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.raises(TransformOrderError, match="apply wrap_optimizer first"):
        accel.accumulate_grads(model, raw, ctx, steps=2)
    with pytest.raises(IncompatibleOptionsError, match="distribute_loader"):
        accel.accumulate_grads(model, optimizer, ctx, steps=2,
                               loader=DataLoader(loader_data(), batch_size=2))
    model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx, steps=2)
    with pytest.raises(TransformOrderError, match="apply it once"):
        accel.accumulate_grads(model, optimizer, ctx, steps=2)


def test_ddp_gradient_sync_is_switched_on_the_wrapped_model_only():
    with fake_world(0, WORLD) as ctx:
        model, optimizer, ctx = prepare(ctx, steps=0)
        inner = accel.unwrap_model(model, ctx)
        with pytest.raises(IncompatibleOptionsError, match="not accel.unwrap_model"):
            with accel.no_sync(inner, ctx):
                pass
        assert not inner._forward_pre_hooks
        with pytest.raises(IncompatibleOptionsError, match="model shard_model returned"):
            accel.accumulate_grads(inner, optimizer, ctx, steps=2)
        assert optimizer.accumulation is None
        with accel.no_sync(model, ctx):
            assert model.require_backward_grad_sync is False
        assert model.require_backward_grad_sync is True
