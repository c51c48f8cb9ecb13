"""wrap_optimizer, wrap_scheduler, backward and gradient clipping on one process.

On DDP (optimizer built before or after shard_model, clipping norms): tests/test_sharding.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import accel
from accel.errors import IncompatibleOptionsError, TransformOrderError

LR = 0.1


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def make_batch(seed: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 4, generator=gen)
    return x, x.sum(dim=1, keepdim=True) * 0.5


def loss_of(model: nn.Module, seed: int, size: int = 8) -> torch.Tensor:
    x, y = make_batch(seed, size)
    return nn.functional.mse_loss(model(x), y)


def prepared(precision: str = "no", *, accumulation: int = 1, optimizer_cls=torch.optim.SGD,
             scaler=None, **optimizer_kwargs):
    """A model, wrapped optimizer and Context on one process."""
    model = make_model()
    model, ctx = accel.with_amp(model, accel.Context(), dtype=precision)
    model, ctx = accel.shard_model(model, ctx)
    optimizer = optimizer_cls(model.parameters(), lr=LR, **optimizer_kwargs)
    optimizer, ctx = accel.wrap_optimizer(optimizer, ctx, scaler=scaler)
    if accumulation > 1:
        model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx, steps=accumulation)
    return model, optimizer, ctx


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def decay(step: int) -> float:
    return 0.5**step


# ---------------------------------------------------------------- schedulers


def test_scheduler_steps_once_per_real_step_with_accumulation():
    model, optimizer, ctx = prepared(accumulation=2)
    scheduler, ctx = accel.wrap_scheduler(
        torch.optim.lr_scheduler.LambdaLR(optimizer, decay), ctx, optimizer)
    reference_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR)
    reference = torch.optim.lr_scheduler.LambdaLR(reference_opt, decay)
    for micro_step in range(7):
        accel.backward(loss_of(model, micro_step), optimizer, ctx)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if micro_step % 2 == 1:  # the reference steps once per real optimizer step
            reference_opt.step()
            reference.step()
        assert scheduler.get_last_lr() == reference.get_last_lr(), micro_step
        assert optimizer.param_groups[0]["lr"] == reference_opt.param_groups[0]["lr"]
    assert optimizer.real_steps == 3 and scheduler.last_epoch == 3


def test_scheduler_called_twice_after_one_step_advances_once():
    model, optimizer, ctx = prepared()
    scheduler, ctx = accel.wrap_scheduler(
        torch.optim.lr_scheduler.LambdaLR(optimizer, decay), ctx, optimizer)
    accel.backward(loss_of(model, 0), optimizer, ctx)
    optimizer.step()
    scheduler.step()
    scheduler.step()
    assert scheduler.last_epoch == 1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR * 0.5)


def test_scheduler_built_on_inner_or_wrapped_optimizer_works_without_torch_warnings():
    for build_on_wrapped in (True, False):
        model = make_model()
        inner = torch.optim.SGD(model.parameters(), lr=LR)
        optimizer, ctx = accel.wrap_optimizer(inner, accel.Context())
        target = optimizer if build_on_wrapped else inner
        scheduler, ctx = accel.wrap_scheduler(
            torch.optim.lr_scheduler.LambdaLR(target, decay), ctx, optimizer)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(3):
                accel.backward(loss_of(model, step), optimizer, ctx)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
        # torch warns when it believes scheduler.step() ran before optimizer.step()
        assert not [w for w in caught if "lr_scheduler" in str(w.message)]
        assert inner.param_groups[0]["lr"] == pytest.approx(LR * 0.5**3)
        assert ctx.applied[-1] == "wrap_scheduler(LambdaLR)"


def test_scheduler_state_dict_round_trip():
    model, optimizer, ctx = prepared()
    scheduler, ctx = accel.wrap_scheduler(
        torch.optim.lr_scheduler.LambdaLR(optimizer, decay), ctx, optimizer)
    for step in range(2):
        accel.backward(loss_of(model, step), optimizer, ctx)
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    model2, optimizer2, ctx2 = prepared()
    scheduler2, _ = accel.wrap_scheduler(
        torch.optim.lr_scheduler.LambdaLR(optimizer2, decay), ctx2, optimizer2)
    scheduler2.load_state_dict(state)
    assert scheduler2.last_epoch == 2
    scheduler2.step()  # no optimizer step since loading: must not advance
    assert scheduler2.last_epoch == 2


# ---------------------------------------------------------------- fp16 loss scaling


def test_fp16_overflow_skips_step_halves_scale_and_holds_schedule():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    model, optimizer, ctx = prepared("fp16", scaler=scaler)
    scheduler, ctx = accel.wrap_scheduler(
        torch.optim.lr_scheduler.LambdaLR(optimizer, decay), ctx, optimizer)
    before = snapshot(model)

    accel.backward(loss_of(model, 0) * float("inf"), optimizer, ctx)
    assert optimizer.step() is None
    scheduler.step()
    assert optimizer.step_was_skipped and optimizer.real_steps == 0
    assert optimizer.scaler.get_scale() == 2.0**7
    assert scheduler.get_last_lr() == [LR]
    assert same(before, snapshot(model))

    optimizer.zero_grad()
    accel.backward(loss_of(model, 1), optimizer, ctx)
    optimizer.step()
    scheduler.step()
    assert not optimizer.step_was_skipped and optimizer.real_steps == 1
    assert optimizer.scaler.get_scale() == 2.0**7
    assert scheduler.get_last_lr() == [LR * 0.5]
    assert not same(before, snapshot(model))


def test_fp16_backward_scales_the_loss():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    model, optimizer, ctx = prepared("fp16", scaler=scaler)
    reference = make_model()
    accel.backward(loss_of(model, 0), optimizer, ctx)
    loss_of(reference, 0).backward()
    for got, want in zip(grads(model), grads(reference), strict=True):
        torch.testing.assert_close(got / 2.0**6, want, rtol=2e-2, atol=1e-3)


def test_wrap_optimizer_records_and_builds_scaler_only_for_fp16():
    _, fp32, ctx = prepared()
    assert fp32.scaler is None and ctx.applied[-1] == "wrap_optimizer(SGD)"
    _, fp16, _ = prepared("fp16")
    assert isinstance(fp16.scaler, torch.amp.GradScaler) and fp16.scaler.is_enabled()
    _, bf16, _ = prepared("bf16")
    assert bf16.scaler is None
    assert isinstance(fp16, torch.optim.Optimizer)
    assert repr(fp16) == "AccelOptimizer(SGD, fp16 scaler)"


# ---------------------------------------------------------------- closures, return values


def test_lbfgs_closure_returns_the_closure_loss():
    model, optimizer, ctx = prepared(optimizer_cls=torch.optim.LBFGS, max_iter=5)
    with torch.no_grad():
        initial = loss_of(model, 0).item()

    def closure():
        optimizer.zero_grad()
        loss = loss_of(model, 0)
        accel.backward(loss, optimizer, ctx)
        return loss

    result = optimizer.step(closure)
    assert result.item() == pytest.approx(initial)  # LBFGS returns the first evaluation
    with torch.no_grad():
        assert loss_of(model, 0).item() < initial / 2


def test_closure_under_fp16_raises_a_clear_error():
    model, optimizer, ctx = prepared("fp16", optimizer_cls=torch.optim.LBFGS)
    with pytest.raises(IncompatibleOptionsError, match="closure.*use bf16 or fp32"):
        optimizer.step(lambda: loss_of(model, 0))


class CountingSGD(torch.optim.SGD):
    """A real SGD whose step returns how many steps it has taken."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.calls = 0

    def step(self, closure=None):
        super().step(closure)
        self.calls += 1
        return self.calls


@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_step_returns_the_inner_optimizers_value(precision):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6) if precision == "fp16" else None
    model, optimizer, ctx = prepared(precision, optimizer_cls=CountingSGD, scaler=scaler,
                                     accumulation=2)
    results = []
    for step in range(4):
        accel.backward(loss_of(model, step), optimizer, ctx)
        results.append(optimizer.step())
        optimizer.zero_grad()
    assert results == [None, 1, None, 2]


# ---------------------------------------------------------------- pass-through, state


class ModalSGD(torch.optim.SGD):
    """A real optimizer with train()/eval() modes, as schedule-free optimizers have."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.training = True

    def train(self):
        self.training = True

    def eval(self):
        self.training = False

    def step(self, closure=None):
        if not self.training:
            raise RuntimeError("step in eval mode")
        return super().step(closure)


def test_train_and_eval_reach_the_inner_optimizer():
    model, optimizer, ctx = prepared(optimizer_cls=ModalSGD)
    optimizer.eval()
    assert optimizer.optimizer.training is False
    with pytest.raises(RuntimeError, match="eval mode"):
        optimizer.step()
    optimizer.train()
    accel.backward(loss_of(model, 0), optimizer, ctx)
    optimizer.step()
    assert optimizer.real_steps == 1


def test_schedule_free_optimizer_train_eval():
    schedulefree = pytest.importorskip("schedulefree")
    model, optimizer, ctx = prepared(optimizer_cls=schedulefree.SGDScheduleFree)
    optimizer.train()
    for step in range(3):
        accel.backward(loss_of(model, step), optimizer, ctx)
        optimizer.step()
        optimizer.zero_grad()
    trained = snapshot(model)
    optimizer.eval()  # swaps in the averaged weights
    assert optimizer.param_groups[0]["train_mode"] is False
    assert not same(trained, snapshot(model))
    optimizer.train()
    for got, want in zip(snapshot(model), trained, strict=True):
        torch.testing.assert_close(got, want)


def test_state_dict_round_trip_keeps_scaler_state(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    model, optimizer, ctx = prepared("fp16", optimizer_cls=torch.optim.Adam, scaler=scaler)
    for step, factor in enumerate((1.0, float("inf"), 1.0)):  # one overflow: scale 256 -> 128
        accel.backward(loss_of(model, step) * factor, optimizer, ctx)
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path / "optimizer.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)

    saved = torch.load(path, weights_only=True)
    assert saved["optimizer"]["accel_scaler"]["scale"] == 2.0**7
    model2, optimizer2, ctx2 = prepared("fp16", optimizer_cls=torch.optim.Adam)
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    assert optimizer2.scaler.get_scale() == 2.0**7
    for run_model, run_opt, run_ctx in ((model, optimizer, ctx), (model2, optimizer2, ctx2)):
        accel.backward(loss_of(run_model, 9), run_opt, run_ctx)
        run_opt.step()
    assert same(snapshot(model), snapshot(model2))


# ---------------------------------------------------------------- clipping


def test_clip_grad_norm_matches_torch():
    model, optimizer, ctx = prepared()
    reference = make_model()
    accel.backward(loss_of(model, 0), optimizer, ctx)
    loss_of(reference, 0).backward()
    norm = accel.clip_grad_norm(model, ctx, 0.01)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01)
    assert torch.equal(norm, expected) and norm > 0.01
    assert same(grads(model), grads(reference))
    inf_norm = accel.clip_grad_norm(model, ctx, 1.0, norm_type=float("inf"))
    assert inf_norm == max(g.abs().max() for g in grads(reference))


def test_clip_grad_norm_under_fp16_unscales_first():
    scale = 2.0**10
    model, optimizer, ctx = prepared("fp16", scaler=torch.amp.GradScaler("cpu", init_scale=scale))
    reference = make_model()
    accel.backward(loss_of(model, 0), optimizer, ctx)
    loss_of(reference, 0).backward()
    norm = accel.clip_grad_norm(model, ctx, 1e9, optimizer=optimizer)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e9)
    torch.testing.assert_close(norm, expected, rtol=2e-2, atol=0)
    # a second clip in the same step must not unscale again (GradScaler would raise)
    accel.clip_grad_value(model, ctx, 1e9, optimizer=optimizer)
    for got, want in zip(grads(model), grads(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-3)
    optimizer.step()
    assert not optimizer.step_was_skipped
    # the next step unscales again
    optimizer.zero_grad()
    accel.backward(loss_of(model, 1), optimizer, ctx)
    assert accel.clip_grad_norm(model, ctx, 1e9, optimizer=optimizer) < 100


def test_clip_without_optimizer_under_fp16_or_accumulation_raises():
    model, _, ctx = prepared("fp16")
    with pytest.raises(IncompatibleOptionsError, match="optimizer=optimizer"):
        accel.clip_grad_norm(model, ctx, 1.0)
    model, _, ctx = prepared(accumulation=2)
    with pytest.raises(IncompatibleOptionsError, match="optimizer=optimizer"):
        accel.clip_grad_value(model, ctx, 1.0)
    model, _, ctx = prepared()
    with pytest.raises(TransformOrderError, match="wrap_optimizer"):
        accel.clip_grad_norm(model, ctx, 1.0, optimizer=torch.optim.SGD(model.parameters()))


def test_clipping_mid_cycle_does_nothing_and_returns_none():
    model, optimizer, ctx = prepared(accumulation=2)
    accel.backward(loss_of(model, 0) * 100, optimizer, ctx)
    partial = grads(model)
    assert not optimizer.sync_gradients
    assert accel.clip_grad_norm(model, ctx, 1e-3, optimizer=optimizer) is None
    accel.clip_grad_value(model, ctx, 1e-3, optimizer=optimizer)
    assert same(partial, grads(model))
    optimizer.step()
    accel.backward(loss_of(model, 1) * 100, optimizer, ctx)
    assert optimizer.sync_gradients
    norm = accel.clip_grad_norm(model, ctx, 1e-3, optimizer=optimizer)
    assert norm > 1e-3
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads(model)]))
    assert total.item() == pytest.approx(1e-3, rel=1e-3)


def test_clip_grad_value_clamps_every_element():
    model, optimizer, ctx = prepared()
    accel.backward(loss_of(model, 0) * 100, optimizer, ctx)
    before = grads(model)
    limit = 0.5 * max(g.abs().max().item() for g in before)
    assert accel.clip_grad_value(model, ctx, limit) is None
    for got, was in zip(grads(model), before, strict=True):
        assert torch.equal(got, was.clamp(-limit, limit))


# ---------------------------------------------------------------- order and misuse


def test_wrap_and_backward_misuse_raise_clear_errors():
    model, optimizer, ctx = prepared()
    with pytest.raises(TransformOrderError, match="already applied"):
        accel.wrap_optimizer(optimizer, ctx)
    with pytest.raises(IncompatibleOptionsError, match="dtype='fp16'"):
        accel.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=LR), ctx,
                             scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(TransformOrderError, match="wrap_optimizer"):
        accel.backward(loss_of(model, 0), torch.optim.SGD(model.parameters()), ctx)


def test_wrap_scheduler_misuse_raises_clear_errors():
    model, optimizer, ctx = prepared()
    raw = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.raises(TransformOrderError, match="apply wrap_optimizer first"):
        accel.wrap_scheduler(torch.optim.lr_scheduler.LambdaLR(raw, decay), ctx, raw)
    with pytest.raises(IncompatibleOptionsError, match="different optimizer"):
        accel.wrap_scheduler(torch.optim.lr_scheduler.LambdaLR(raw, decay), ctx, optimizer)
    scheduler, ctx = accel.wrap_scheduler(
        torch.optim.lr_scheduler.LambdaLR(optimizer, decay), ctx, optimizer)
    with pytest.raises(TransformOrderError, match="already applied"):
        accel.wrap_scheduler(scheduler, ctx, optimizer)


def test_state_dict_carries_the_accumulation_micro_step():
    model = nn.Linear(2, 1)
    ctx = accel.Context()
    optimizer, ctx = accel.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), ctx)
    model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx, steps=4)
    for _ in range(3):
        accel.backward(model(torch.ones(1, 2)).sum(), optimizer, ctx)
        optimizer.step()
    state = optimizer.state_dict()
    assert state["accel_accumulation"] == {"micro_step": 3}
    fresh = nn.Linear(2, 1)
    other, other_ctx = accel.wrap_optimizer(torch.optim.SGD(fresh.parameters(), lr=0.1),
                                            accel.Context())
    fresh, other, _ = accel.accumulate_grads(fresh, other, other_ctx, steps=4)
    other.load_state_dict(state)
    assert other.accumulation.micro_step == 3 and other.sync_gradients
