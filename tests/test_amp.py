"""with_amp: the forward really runs in the lower precision, and fp8 really swaps Linears."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from torch import nn

import accel
from accel.errors import (
    IncompatibleOptionsError,
    MissingDependencyError,
    TransformOrderError,
    UnsupportedError,
)
from accel.testing import fake_world

LOW = {"fp16": torch.float16, "bf16": torch.bfloat16}


def make_mlp(width: int = 8) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))


def record_output_dtypes(module: nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    module.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_forward_runs_in_low_precision_and_returns_fp32(dtype):
    model, ctx = accel.with_amp(make_mlp(), accel.Context(), dtype=dtype)
    inner = record_output_dtypes(model[0])
    out = model(torch.randn(3, 4))
    assert inner == [LOW[dtype]]
    assert out.dtype == torch.float32
    assert ctx.precision == dtype and ctx.applied == (f"with_amp({dtype})",)
    # the parameters stay the fp32 master copy
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # outside the model, autocast is off again
    assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.float32


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_fp32_outputs_false_keeps_low_precision_outputs(dtype):
    model, _ = accel.with_amp(make_mlp(), accel.Context(), dtype=dtype, fp32_outputs=False)
    assert model(torch.randn(3, 4)).dtype == LOW[dtype]


Pair = namedtuple("Pair", ["logits", "count"])


class StructuredOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        y = self.linear(x)
        return {"list": [y, y.long()], "pair": Pair(y, 3), "tuple": (y,)}


def test_fp32_outputs_converts_nested_outputs_and_leaves_the_rest():
    model, _ = accel.with_amp(StructuredOutputs(), accel.Context(), dtype="bf16")
    out = model(torch.randn(2, 4))
    assert out["list"][0].dtype == torch.float32 and out["list"][1].dtype == torch.int64
    assert isinstance(out["pair"], Pair) and out["pair"].logits.dtype == torch.float32
    assert out["pair"].count == 3 and isinstance(out["tuple"], tuple)


def test_fp16_scaler_is_live_on_cpu():
    model, ctx = accel.with_amp(make_mlp(), accel.Context(), dtype="fp16")
    optimizer, ctx = accel.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), ctx)
    scale = optimizer.scaler.get_scale()
    accel.backward(model(torch.randn(3, 4)).sum() * float("inf"), optimizer, ctx)
    optimizer.step()
    assert optimizer.step_was_skipped and optimizer.scaler.get_scale() == scale / 2


def test_with_amp_no_records_fp32():
    model = make_mlp()
    forward = model.forward
    same, ctx = accel.with_amp(model, accel.Context(), dtype="no")
    assert same is model and model.forward == forward
    assert ctx.precision == "no" and ctx.was_applied("with_amp")


def test_deepcopy_of_an_amp_model_runs_on_its_own_parameters():
    model, _ = accel.with_amp(make_mlp(), accel.Context(), dtype="bf16")
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.zero_()
    x = torch.randn(3, 4)
    assert torch.equal(clone(x), torch.zeros(3, 2))
    assert not torch.equal(model(x), torch.zeros(3, 2))
    assert record_output_dtypes(clone[0]) == [] and clone(x).dtype == torch.float32


def test_order_and_option_errors_name_the_fix():
    with pytest.raises(IncompatibleOptionsError, match="dtype must be one of"):
        accel.with_amp(make_mlp(), accel.Context(), dtype="float16")
    model, ctx = accel.with_amp(make_mlp(), accel.Context(), dtype="bf16")
    with pytest.raises(TransformOrderError, match="apply it once"):
        accel.with_amp(model, ctx, dtype="bf16")
    model, ctx = accel.shard_model(make_mlp(), accel.Context())
    with pytest.raises(TransformOrderError, match="before shard_model.*reorder"):
        accel.with_amp(model, ctx)
    optimizer, ctx = accel.wrap_optimizer(torch.optim.SGD(model.parameters()), accel.Context())
    with pytest.raises(TransformOrderError, match="before wrap_optimizer.*reorder"):
        accel.with_amp(model, ctx)


def test_with_amp_after_ddp_is_rejected_on_every_rank():
    for rank in (0, 1):
        with fake_world(rank, 2) as ctx:
            model, ctx = accel.shard_model(make_mlp(), ctx, strategy="ddp")
            with pytest.raises(TransformOrderError, match="before shard_model"):
                accel.with_amp(model, ctx, dtype="bf16")


# ---------------------------------------------------------------- fp8 (torchao)


def fp8_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                         nn.Linear(16, 1))


def test_fp8_swaps_eligible_linears_and_trains():
    float8 = pytest.importorskip("torchao.float8.float8_linear")
    model, ctx = accel.with_amp(fp8_model(), accel.Context(), dtype="fp8")
    assert [type(m) for m in model if not isinstance(m, nn.ReLU)] == [
        float8.Float8Linear, float8.Float8Linear, nn.Linear]  # 16 -> 1 is not eligible
    assert ctx.precision == "fp8"
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), ctx)
    assert optimizer.scaler is None
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=gen)
    y = x[:, :1] * 2
    losses = []
    for _ in range(10):
        loss = nn.functional.mse_loss(model(x), y)
        accel.backward(loss, optimizer, ctx)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2


def test_fp8_on_a_model_that_is_one_linear_returns_the_converted_module():
    float8 = pytest.importorskip("torchao.float8.float8_linear")
    model, ctx = accel.with_amp(nn.Linear(32, 16), accel.Context(), dtype="fp8")
    assert isinstance(model, float8.Float8Linear) and ctx.precision == "fp8"
    assert model(torch.randn(4, 32)).dtype == torch.float32


def test_fp8_without_an_eligible_linear_says_use_bf16():
    pytest.importorskip("torchao.float8")
    model = make_mlp(width=5)
    with pytest.raises(UnsupportedError, match="multiples of 16.*use bf16"):
        accel.with_amp(model, accel.Context(), dtype="fp8")
    assert type(model[0]) is nn.Linear  # nothing was half-converted


def test_fp8_without_torchao_names_the_extra():
    script = textwrap.dedent("""
        import sys
        sys.modules["torchao"] = None  # as if torchao were not installed
        import torch, accel
        try:
            accel.with_amp(torch.nn.Linear(16, 16), accel.Context(), dtype="fp8")
        except accel.errors.MissingDependencyError as exc:
            print("RAISED", exc.package, exc.extra, exc)
    """)
    repo = str(Path(accel.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True, env=env)
    assert "RAISED torchao fp8" in done.stdout, done.stderr
    assert "pip install 'accel[fp8]'" in done.stdout
    assert issubclass(MissingDependencyError, ImportError)
