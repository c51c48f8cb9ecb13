"""compose: a pipeline gives what the transforms give by hand, and says what is wrong."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import accel
from accel.data import distribute_loader
from accel.errors import IncompatibleOptionsError
from accel.testing import fake_world


def make_objects():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9**step)
    return model, optimizer, scheduler


def make_loader() -> DataLoader:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(12, 4, generator=gen)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=2)


PIPELINE = (
    partial(accel.with_amp, dtype="bf16"),
    accel.shard_model,
    accel.wrap_optimizer,
    partial(accel.accumulate_grads, steps=2),
    accel.wrap_scheduler,
)


def by_hand(ctx: accel.Context):
    model, optimizer, scheduler = make_objects()
    model, ctx = accel.with_amp(model, ctx, dtype="bf16")
    model, ctx = accel.shard_model(model, ctx)
    optimizer, ctx = accel.wrap_optimizer(optimizer, ctx)
    model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx, steps=2)
    scheduler, ctx = accel.wrap_scheduler(scheduler, ctx, optimizer)
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler}, ctx


def train(objs: dict, ctx: accel.Context) -> list[torch.Tensor]:
    model, optimizer, scheduler = objs["model"], objs["optimizer"], objs["scheduler"]
    gen = torch.Generator().manual_seed(4)
    for _ in range(6):
        x = torch.randn(4, 4, generator=gen)
        accel.backward(nn.functional.mse_loss(model(x), x[:, :1]), optimizer, ctx)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def test_pipeline_gives_what_the_transforms_give_by_hand():
    model, optimizer, scheduler = make_objects()
    objs, ctx = accel.compose(*PIPELINE)(accel.Context(), model=model, optimizer=optimizer,
                                         scheduler=scheduler)
    hand_objs, hand_ctx = by_hand(accel.Context())
    assert ctx == hand_ctx and repr(ctx) == repr(hand_ctx)
    assert ctx.applied == ("with_amp(bf16)", "shard_model(single)", "wrap_optimizer(AdamW)",
                           "accumulate_grads(steps=2)", "wrap_scheduler(LambdaLR)")
    assert objs["model"] is model and objs["optimizer"].optimizer is optimizer
    assert objs["scheduler"].scheduler is scheduler
    # the scheduler link is the wrapped optimizer of this pipeline
    assert objs["scheduler"].optimizer is objs["optimizer"]
    assert objs["optimizer"].accumulation.model is model
    assert ctx.precision == "bf16" and ctx.grad_accum_steps == 2
    for got, want in zip(train(objs, ctx), train(hand_objs, hand_ctx), strict=True):
        assert torch.equal(got, want)
    assert objs["scheduler"].last_epoch == 3


def test_loader_link_reaches_accumulate_grads():
    model, optimizer, _ = make_objects()
    prepare = accel.compose(accel.wrap_optimizer, distribute_loader,
                            partial(accel.accumulate_grads, steps=4))
    objs, ctx = prepare(accel.Context(), model=model, optimizer=optimizer, loader=make_loader())
    assert objs["optimizer"].accumulation.loader is objs["loader"]
    sync = []
    for x, y in objs["loader"]:  # 6 batches, steps=4: the last one ends the second cycle
        accel.backward(nn.functional.mse_loss(model(x), y), objs["optimizer"], ctx)
        sync.append(objs["optimizer"].sync_gradients)
        objs["optimizer"].step()
    assert sync == [False, False, False, True, False, True]
    assert ctx.applied[1].startswith("distribute_loader")


def test_a_link_bound_with_partial_keeps_its_value():
    model, optimizer, _ = make_objects()
    own, _ = distribute_loader(make_loader(), accel.Context())
    other, _ = distribute_loader(make_loader(), accel.Context())
    prepare = accel.compose(accel.wrap_optimizer,
                            partial(accel.accumulate_grads, steps=2, loader=own))
    objs, _ = prepare(accel.Context(), model=model, optimizer=optimizer, loader=other)
    assert objs["optimizer"].accumulation.loader is own


def test_pipeline_builds_ddp_in_a_fake_world():
    model, optimizer, _ = make_objects()
    with fake_world(1, 2) as ctx:
        prepare = accel.compose(partial(accel.shard_model, strategy=accel.DDP(comm_hook="fp16")),
                                accel.wrap_optimizer)
        objs, out = prepare(ctx, model=model, optimizer=optimizer)
        assert isinstance(objs["model"], DistributedDataParallel)
        assert accel.unwrap_model(objs["model"], out) is model
        assert out.backend == "ddp" and out.rank == 1
        assert out.applied == ("shard_model(ddp, comm_hook='fp16')", "wrap_optimizer(AdamW)")


def test_objects_no_transform_touches_are_returned_as_given():
    model, optimizer, scheduler = make_objects()
    objs, ctx = accel.compose(accel.shard_model)(accel.Context(), model=model,
                                                 optimizer=optimizer, scheduler=scheduler)
    assert objs == {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    assert ctx.was_applied("shard_model") and not ctx.was_applied("wrap_optimizer")


def test_trail_is_shown_in_order():
    model, optimizer, _ = make_objects()
    _, ctx = accel.compose(accel.shard_model, accel.wrap_optimizer)(
        accel.Context(), model=model, optimizer=optimizer)
    assert repr(ctx).endswith("applied: shard_model(single) -> wrap_optimizer(AdamW))")
    assert "applied: nothing" in repr(accel.Context())
    assert not ctx.was_applied("shard") and not ctx.was_applied("with_amp")


# ---------------------------------------------------------------- errors


def not_a_transform(model):
    return model


def wrong_role(model, tokenizer, ctx):
    return model, tokenizer, ctx


def returns_too_little(model, ctx):
    return ctx


def returns_no_context(model, ctx):
    return model, "ctx"


def test_compose_rejects_what_is_not_a_transform():
    with pytest.raises(IncompatibleOptionsError, match="not_a_transform has no 'ctx'"):
        accel.compose(accel.shard_model, not_a_transform)
    with pytest.raises(IncompatibleOptionsError, match=r"\['tokenizer'\] before ctx"):
        accel.compose(wrong_role)
    model, _, _ = make_objects()
    with pytest.raises(IncompatibleOptionsError, match="not accel.with_amp"):
        accel.compose(accel.with_amp(model, accel.Context()))


def test_pipeline_reports_missing_and_unknown_objects():
    model, optimizer, scheduler = make_objects()
    prepare = accel.compose(accel.shard_model, accel.wrap_optimizer)
    with pytest.raises(IncompatibleOptionsError, match=r"wrap_optimizer needs \['optimizer'\]"):
        prepare(accel.Context(), model=model)
    with pytest.raises(IncompatibleOptionsError, match=r"unknown objects \['modle'\]"):
        prepare(accel.Context(), modle=model, optimizer=optimizer)
    with_scheduler = accel.compose(accel.wrap_scheduler)
    with pytest.raises(IncompatibleOptionsError, match=r"wrap_scheduler needs \['optimizer'\]"):
        with_scheduler(accel.Context(), scheduler=scheduler)


def test_pipeline_checks_what_a_transform_returns():
    model, _, _ = make_objects()
    for transform in (returns_too_little, returns_no_context):
        with pytest.raises(IncompatibleOptionsError, match="must return \\(model, ctx\\)"):
            accel.compose(transform)(accel.Context(), model=model)


def test_transform_errors_pass_through_the_pipeline():
    model, optimizer, _ = make_objects()
    wrong_order = accel.compose(accel.wrap_optimizer, partial(accel.with_amp, dtype="bf16"))
    with pytest.raises(accel.errors.TransformOrderError, match="before wrap_optimizer"):
        wrong_order(accel.Context(), model=model, optimizer=optimizer)
