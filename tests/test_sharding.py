"""shard_model and the strategy configs: what they build and record, and DDP's options for real."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import accel
from accel.errors import (
    AccelError,
    IncompatibleOptionsError,
    TransformOrderError,
    UnsupportedError,
)
from accel.testing import fake_world, run_world
from accel.world import World


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))


# ---------------------------------------------------------------- fake world: build, record, reject


def test_ddp_options_reach_the_engine_and_the_trail():
    strategy = accel.DDP(find_unused_parameters=True, static_graph=False, bucket_cap_mb=1.0,
                         gradient_as_bucket_view=True, sync_buffers=False, comm_hook="fp16")
    with fake_world(1, 2) as ctx:
        model, ctx = accel.shard_model(make_mlp(), ctx, strategy=strategy)
        assert isinstance(model, DistributedDataParallel)
        assert model.find_unused_parameters and model.gradient_as_bucket_view
        assert model.bucket_bytes_cap == 1024 * 1024
        assert model.forward_sync_buffers is False
        assert ctx.backend == "ddp" and ctx.strategy == strategy
        assert ctx.applied == (
            "shard_model(ddp, find_unused_parameters=True, bucket_cap_mb=1.0, "
            "gradient_as_bucket_view=True, sync_buffers=False, comm_hook='fp16')",)
        assert "applied: shard_model(ddp, find_unused_parameters=True" in repr(ctx)
    assert repr(accel.DDP(comm_hook="bf16")) == (
        "DDP(find_unused_parameters=False, static_graph=False, bucket_cap_mb=None, "
        "gradient_as_bucket_view=False, sync_buffers=True, comm_hook='bf16', comm_state=None)")


def test_default_strategy_follows_the_world_and_keeps_names():
    with fake_world(0, 2) as ctx:
        user_model = make_mlp()
        model, sharded = accel.shard_model(user_model, ctx)
        assert isinstance(model, DistributedDataParallel) and sharded.strategy == accel.DDP()
        assert sharded.applied == ("shard_model(ddp)",)
        assert accel.unwrap_model(model, sharded) is user_model
        assert list(accel.unwrap_model(model, sharded).state_dict()) == ["0.weight", "0.bias",
                                                                        "2.weight", "2.bias"]
    user_model = make_mlp()
    model, ctx = accel.shard_model(user_model, accel.Context())
    assert model is user_model and ctx.backend == "single" and ctx.strategy == accel.Single()
    assert ctx.applied == ("shard_model(single)",)
    named, _ = accel.shard_model(make_mlp(), accel.Context(), strategy="SINGLE")
    assert isinstance(named, nn.Sequential)


def test_compiled_model_is_unwrapped():
    model, ctx = accel.shard_model(make_mlp(), accel.Context())
    compiled = torch.compile(model)
    assert accel.unwrap_model(compiled, ctx) is model


def test_shard_model_errors_name_the_fix():
    model, ctx = accel.shard_model(make_mlp(), accel.Context())
    with pytest.raises(TransformOrderError, match="apply it once"):
        accel.shard_model(model, ctx)
    with pytest.raises(IncompatibleOptionsError, match="unknown strategy 'zero'.*accel.DDP"):
        accel.shard_model(make_mlp(), accel.Context(), strategy="zero")
    with pytest.raises(IncompatibleOptionsError, match="not a strategy"):
        accel.shard_model(make_mlp(), accel.Context(), strategy=object())
    with pytest.raises(IncompatibleOptionsError, match="2 or more ranks.*strategy='single'"):
        accel.shard_model(make_mlp(), accel.Context(), strategy="ddp")
    lonely = accel.Context(world=World(rank=0, world_size=2))  # says 2 ranks, has no group
    with pytest.raises(IncompatibleOptionsError, match="started process group.*accel.init"):
        accel.shard_model(make_mlp(), lonely, strategy=accel.DDP())


def bf16_hook_supported() -> bool:
    """torch's own condition for its bf16 compression hook (a CUDA+NCCL or XPU+XCCL build)."""
    dist = torch.distributed
    cuda = (torch.version.cuda or torch.version.hip) is not None and dist.is_nccl_available()
    xpu = dist.is_xccl_available() and torch.xpu.is_available()
    return bool(cuda and torch.cuda.nccl.version() >= (2, 10)) or xpu


@pytest.mark.skipif(bf16_hook_supported(), reason="this torch build runs the bf16 hook")
def test_bf16_comm_hook_where_torch_cannot_run_it_says_so():
    with fake_world(0, 2) as ctx:
        with pytest.raises(UnsupportedError, match="comm_hook='bf16' cannot run.*'fp16'"):
            accel.shard_model(make_mlp(), ctx, strategy=accel.DDP(comm_hook="bf16"))


def test_unknown_comm_hook_is_rejected():
    with fake_world(0, 2) as ctx:
        with pytest.raises(IncompatibleOptionsError, match="unknown DDP comm_hook 'int8'"):
            accel.shard_model(make_mlp(), ctx, strategy=accel.DDP(comm_hook="int8"))


def test_shard_model_after_wrap_optimizer_is_rejected_for_engines():
    with fake_world(0, 2) as ctx:
        model = make_mlp()
        optimizer, ctx = accel.wrap_optimizer(torch.optim.SGD(model.parameters()), ctx)
        with pytest.raises(TransformOrderError, match="before wrap_optimizer"):
            accel.shard_model(model, ctx, strategy="ddp")
    # one process: placement only, the optimizer's parameters stay the model's
    model = make_mlp()
    optimizer, ctx = accel.wrap_optimizer(torch.optim.SGD(model.parameters()), accel.Context())
    placed, ctx = accel.shard_model(model, ctx)
    assert ctx.applied == ("wrap_optimizer(SGD)", "shard_model(single)")


class OwnStrategy:
    """A config for an engine accel does not have, implementing none of the protocol."""

    backend = "megatron"


def test_an_object_without_the_strategy_protocol_is_named_with_what_it_lacks():
    with pytest.raises(AccelError, match="is not a strategy: it lacks.*'wrap_model'"):
        accel.shard_model(make_mlp(), accel.Context(), strategy=OwnStrategy())


# ---------------------------------------------------------------- 2 real ranks: DDP options train

STEPS, PER_RANK = 6, 8


def batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(size, 8, generator=gen)
    return x, torch.sin(x.sum(dim=1, keepdim=True))


def counting_hook(state: list[int], bucket):
    """A user's own torch communication hook: counts buckets, then all-reduces as usual."""
    state.append(bucket.index())
    return default_hooks.allreduce_hook(None, bucket)


class UnusedBranch(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.used = nn.Linear(8, 1)
        self.unused = nn.Linear(8, 1)

    def forward(self, x):
        return self.used(x)


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.norm(x))


def train(model: nn.Module, ctx: accel.Context, strategy, world_size: int, rank: int):
    # rank-dependent data for BatchNorm: batch statistics then differ between ranks
    shift = rank if isinstance(model, WithBatchNorm) else 0
    if strategy is not None:
        model, ctx = accel.shard_model(model, ctx, strategy=strategy)
    optimizer, ctx = accel.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.2), ctx)
    for step in range(STEPS):
        x, y = batch(step, PER_RANK * world_size)
        x = x + shift
        lo = rank * PER_RANK
        loss = nn.functional.mse_loss(model(x[lo:lo + PER_RANK]), y[lo:lo + PER_RANK])
        accel.backward(loss, optimizer, ctx)
        optimizer.step()
        optimizer.zero_grad()
    return model, ctx


def state_of(model: nn.Module, ctx: accel.Context) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in accel.unwrap_model(model, ctx).state_dict().items()}


#: the hook shortcuts this torch build runs (bf16 needs CUDA+NCCL or XPU+XCCL)
HOOKS = ("none", "fp16", "powersgd") + (("bf16",) if bf16_hook_supported() else ())


CLIP = 0.05


def optimizer_order_and_clipping(ctx: accel.Context) -> dict[str, object]:
    """AdamW built before or after shard_model; clip_grad_norm's norms on DDP."""
    out: dict[str, object] = {}
    for order in ("before", "after"):
        model = make_mlp()
        early = torch.optim.AdamW(model.parameters(), lr=0.01) if order == "before" else None
        model, run_ctx = accel.shard_model(model, ctx, strategy="ddp")
        inner = early or torch.optim.AdamW(model.parameters(), lr=0.01)
        optimizer, run_ctx = accel.wrap_optimizer(inner, run_ctx)
        norms = []
        for step in range(STEPS):
            x, y = batch(step, PER_RANK * ctx.world_size)
            lo = ctx.rank * PER_RANK
            loss = nn.functional.mse_loss(model(x[lo:lo + PER_RANK]), y[lo:lo + PER_RANK])
            accel.backward(loss, optimizer, run_ctx)
            norms.append(accel.clip_grad_norm(model, run_ctx, CLIP, optimizer=optimizer))
            optimizer.step()
            optimizer.zero_grad()
        out[order], out[f"norms_{order}"] = state_of(model, run_ctx), torch.stack(norms)
    return out


def ddp_options(ctx: accel.Context) -> dict[str, object]:
    out: dict[str, object] = {"optimizer_order": optimizer_order_and_clipping(ctx)}
    for name in HOOKS:
        hook = None if name == "none" else name
        model, run_ctx = train(make_mlp(), ctx, accel.DDP(comm_hook=hook), ctx.world_size, ctx.rank)
        out[name] = state_of(model, run_ctx)
    calls: list[int] = []
    strategy = accel.DDP(comm_hook=counting_hook, comm_state=calls)
    model, run_ctx = train(make_mlp(), ctx, strategy, ctx.world_size, ctx.rank)
    out["custom"], out["custom_calls"] = state_of(model, run_ctx), len(calls)
    out["custom_trail"] = run_ctx.applied[0]
    strategy = accel.DDP(find_unused_parameters=True)
    model, run_ctx = train(UnusedBranch(), ctx, strategy, ctx.world_size, ctx.rank)
    out["unused"] = state_of(model, run_ctx)
    out["unused_grad"] = accel.unwrap_model(model, run_ctx).unused.weight.grad
    for sync in (True, False):
        model, run_ctx = train(WithBatchNorm(), ctx, accel.DDP(sync_buffers=sync),
                               ctx.world_size, ctx.rank)
        model.eval()
        with torch.no_grad():  # an evaluation forward: buffers are synced, not updated
            model(torch.randn(2, 8))
        out[f"buffers_{sync}"] = state_of(model, run_ctx)["norm.running_mean"]
    return out


@pytest.fixture(scope="module")
def ddp_results():
    return run_world(ddp_options, 2)


def reference_full_batch(kind: str) -> dict[str, torch.Tensor]:
    model = {"mlp": make_mlp, "unused": UnusedBranch}[kind]()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for step in range(STEPS):
        x, y = batch(step, PER_RANK * 2)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in b)


#: max |parameter difference| after STEPS SGD steps, against the uncompressed run: the
#: hooks round (fp16: 11-bit, bf16: 8-bit mantissa) or approximate (PowerSGD, rank 1 after
#: 2 exact warm-up steps) the averaged gradient.
HOOK_TOLERANCE = {"none": 1e-6, "custom": 1e-6, "fp16": 5e-4, "bf16": 1e-2, "powersgd": 5e-2}


@pytest.mark.spawned
@pytest.mark.parametrize("hook", list(HOOK_TOLERANCE))
def test_comm_hooks_train_close_to_the_uncompressed_run(ddp_results, hook):
    if hook not in ddp_results[0]:
        pytest.skip(f"comm_hook={hook!r} needs CUDA+NCCL or XPU+XCCL")
    expected = reference_full_batch("mlp")
    for rank_result in ddp_results:
        assert max_diff(rank_result[hook], expected) <= HOOK_TOLERANCE[hook]
    assert max_diff(ddp_results[0][hook], ddp_results[1][hook]) == 0


@pytest.mark.spawned
def test_compressing_hooks_really_compress(ddp_results):
    exact = ddp_results[0]["none"]
    for hook in ("fp16", "bf16", "powersgd"):
        if hook not in ddp_results[0]:
            continue
        assert max_diff(ddp_results[0][hook], exact) > 0, f"{hook} changed nothing"


@pytest.mark.spawned
def test_custom_comm_hook_is_called(ddp_results):
    for rank_result in ddp_results:
        assert rank_result["custom_calls"] >= STEPS  # at least one bucket per step
        assert rank_result["custom_trail"].startswith("shard_model(ddp, comm_hook=<function")


@pytest.mark.spawned
def test_find_unused_parameters_trains_a_model_with_an_unused_branch(ddp_results):
    expected = reference_full_batch("unused")
    for rank_result in ddp_results:
        assert max_diff(rank_result["unused"], expected) <= 1e-6
        assert rank_result["unused_grad"] is None


@pytest.mark.spawned
def test_sync_buffers_copies_rank_zero_batchnorm_statistics(ddp_results):
    # With sync, every forward starts from rank 0's running statistics: after an
    # evaluation forward (which updates nothing) the ranks agree.
    assert torch.equal(ddp_results[0]["buffers_True"], ddp_results[1]["buffers_True"])
    # Without, each rank keeps statistics of its own (shifted) data.
    assert not torch.allclose(ddp_results[0]["buffers_False"], ddp_results[1]["buffers_False"])


def reference_clipped_adamw() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    model = make_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    norms = []
    for step in range(STEPS):
        x, y = batch(step, PER_RANK * 2)
        nn.functional.mse_loss(model(x), y).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, torch.stack(norms)


@pytest.mark.spawned
def test_optimizer_built_before_or_after_shard_model_and_clip_norms(ddp_results):
    expected, expected_norms = reference_clipped_adamw()
    assert (expected_norms > CLIP).all()  # every step really clipped
    runs = [result["optimizer_order"] for result in ddp_results]
    for run in runs:
        for order in ("before", "after"):
            assert max_diff(run[order], expected) <= 1e-6
            torch.testing.assert_close(run[f"norms_{order}"], expected_norms,
                                       atol=1e-6, rtol=1e-5)
    for name in expected:
        assert torch.equal(runs[0]["before"][name], runs[1]["before"][name])
        assert torch.equal(runs[0]["before"][name], runs[0]["after"][name])
