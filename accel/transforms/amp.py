"""`with_amp`: mixed precision (bf16, fp16, fp8) for a model's forward pass."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from accel.context import Context
from accel.errors import (
    IncompatibleOptionsError,
    MissingDependencyError,
    TransformOrderError,
    UnsupportedError,
)
from accel.validation import check_bool, check_context, check_module

PRECISIONS = ("no", "bf16", "fp16", "fp8")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


class AutocastForward:
    """A forward that runs under `torch.autocast` (set as the module's `forward`)."""

    def __init__(self, forward: Any, device_type: str, dtype: torch.dtype, fp32_outputs: bool):
        functools.update_wrapper(self, forward)
        self.forward = forward
        self.device_type = device_type
        self.dtype = dtype
        self.fp32_outputs = fp32_outputs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            outputs = self.forward(*args, **kwargs)
        return _to_fp32(outputs) if self.fp32_outputs else outputs


def _to_fp32(data: Any) -> Any:
    if isinstance(data, torch.Tensor):
        return data.float() if data.dtype in (torch.float16, torch.bfloat16) else data
    if isinstance(data, dict):
        return type(data)({k: _to_fp32(v) for k, v in data.items()})
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(_to_fp32(v) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(_to_fp32(v) for v in data)
    return data


def with_amp(
    model: nn.Module, ctx: Context, *, dtype: str = "bf16", fp32_outputs: bool = True
) -> tuple[nn.Module, Context]:
    """Run the model's forward in mixed precision (in place); record the precision.

    The model is modified, not copied, as FSDP2's `fully_shard` modifies it: its
    `forward` becomes an `AutocastForward` around the old one (`model.forward =
    model.forward.forward` undoes it), and under fp8 its eligible nn.Linear layers become
    torchao's Float8Linear. The returned model is that same module, except under fp8 for
    a model that is itself one nn.Linear, which is replaced: use the returned model.

    Args:
        dtype: "bf16" or "fp16" (autocast; fp16 gets a real gradient scaler from
            wrap_optimizer), "fp8" (torchao float8 training of the Linear layers, autocast
            bf16 for the rest), or "no" (fp32).
        fp32_outputs: convert floating outputs back to fp32 (losses computed outside the
            model stay in full precision).

    Apply it once, before shard_model and wrap_optimizer. Parameters stay fp32 (the
    master copy); only the forward's computation is lowered.

    Raises:
        TransformOrderError: with_amp was already applied to this Context or this model
            (a module of it already runs accel's autocast forward), or comes too late.

    >>> model, ctx = accel.with_amp(model, ctx, dtype="bf16")
    """
    check_module("with_amp", "model", model)
    check_context("with_amp", ctx)
    if dtype not in PRECISIONS:
        raise IncompatibleOptionsError(f"dtype must be one of {PRECISIONS}, got {dtype!r}")
    check_bool("with_amp", "fp32_outputs", fp32_outputs)
    if ctx.was_applied("with_amp"):
        raise TransformOrderError("with_amp was already applied; apply it once")
    _check_not_autocast(model)
    for later in ("shard_model", "wrap_optimizer"):
        if ctx.was_applied(later):
            raise TransformOrderError(
                f"with_amp must come before {later} (the engine and the gradient scaler "
                "are built for the precision); reorder the transforms"
            )
    if dtype == "no":
        return model, ctx.record("with_amp(no)", precision="no")
    _check_supported(dtype, ctx.device)
    if dtype == "fp8":
        model = _convert_to_float8(model)
    model.forward = AutocastForward(model.forward, ctx.device.type, _AUTOCAST_DTYPES[dtype],
                                    fp32_outputs)
    return model, ctx.record(f"with_amp({dtype})", precision=dtype)


def _check_not_autocast(model: nn.Module) -> None:
    # The Context cannot catch a second with_amp under a fresh Context: the model can.
    for name, module in model.named_modules():
        if isinstance(module.__dict__.get("forward"), AutocastForward):
            where = f"its module {name!r}" if name else "it"
            raise TransformOrderError(
                f"with_amp was already applied to this model ({where} runs accel's "
                "autocast forward, perhaps under another Context); apply it once"
            )


def _check_supported(dtype: str, device: torch.device) -> None:
    if device.type == "cuda" and dtype in ("bf16", "fp8") and not torch.cuda.is_bf16_supported():
        raise UnsupportedError(f"{torch.cuda.get_device_name(device)} has no bf16; use fp16")
    if (device.type == "cuda" and dtype == "fp8"
            and torch.cuda.get_device_capability(device) < (8, 9)):
        raise UnsupportedError(
            f"fp8 training needs an NVIDIA GPU of compute capability 8.9+ (Ada, Hopper); "
            f"{torch.cuda.get_device_name(device)} is {torch.cuda.get_device_capability(device)}"
        )
    if not torch.amp.is_autocast_available(device.type):
        raise UnsupportedError(f"torch.autocast does not support the device {device}")
    if dtype == "fp16" and device.type not in ("cuda", "cpu", "xpu", "mps"):
        raise UnsupportedError(f"fp16 with a gradient scaler is not available on {device}; "
                               "use bf16")


def _convert_to_float8(model: nn.Module) -> nn.Module:
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as exc:
        raise MissingDependencyError("torchao", "fp8", "fp8 training") from exc

    def eligible(module: nn.Module, name: str) -> bool:
        # float8 matmuls need both dimensions divisible by 16.
        return (isinstance(module, nn.Linear) and module.in_features % 16 == 0
                and module.out_features % 16 == 0)

    if not any(eligible(m, n) for n, m in model.named_modules()):
        raise UnsupportedError(
            "fp8 found no nn.Linear whose in_features and out_features are multiples of 16; "
            "fp8 would change nothing in this model: use bf16"
        )
    # A model that is itself one Linear is replaced, not modified: use the returned module.
    return convert_to_float8_training(model, module_filter_fn=eligible)
