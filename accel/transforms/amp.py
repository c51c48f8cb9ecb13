"""`with_amp`: mixed precision (bf16, fp16, fp8) for a model's forward pass."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from accel.context import Context
from accel.errors import (
    IncompatibleOptionsError,
    TransformOrderError,
    UnsupportedError,
)
from accel.launch_settings import pick
from accel.validation import check_bool, check_callable, check_context, check_module, fail

PRECISIONS = ("no", "bf16", "fp16", "fp8")
#: what with_amp(params=...) keeps the parameters in.
PARAM_DTYPES = ("fp32", "bf16")
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
    model: nn.Module, ctx: Context, *, dtype: str | None = None, fp32_outputs: bool = True,
    recipe: Any = None, module_filter: Callable[[nn.Module, str], bool] | None = None,
    params: str = "fp32", master_weights: bool = False,
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
            bf16 for the rest), or "no" (fp32). None (the default): the launch's
            `--mixed-precision` (`ctx.precision` from `accel.init`), else "no": fp32,
            like Accelerate's `Accelerator()`. A dtype that contradicts a launch setting
            wins, with a warning naming both.
        fp32_outputs: convert floating outputs back to fp32 (losses computed outside the
            model stay in full precision).
        recipe: fp8 only: torchao's recipe, "tensorwise" (the default; over several
            data-parallel ranks FSDP2 then all-gathers the weights in float8 and the
            optimizer precomputes their scales once per step), "rowwise",
            "rowwise_with_gw_hp", or your own torchao.float8.Float8LinearConfig.
        module_filter: fp8 only: `fn(module, fully_qualified_name) -> bool`, which of the
            eligible nn.Linear layers (both dimensions multiples of 16) become float8
            (e.g. not the LM head).
        params: "fp32" (parameters stay fp32, the master copy), or "bf16" with dtype="bf16":
            "true" bf16, the parameters themselves become bf16 (half the memory of
            weights, gradients and optimizer state; the same objects, in place).
        master_weights: with params="bf16": the optimizer (wrap_optimizer) steps fp32
            copies of the bf16 parameters, kept and checkpointed in its state, and
            rounds them into the model after each step.

    Apply it once, before shard_model and wrap_optimizer. Parameters stay fp32 (the
    master copy) unless params="bf16"; only the forward's computation is lowered.
    fp8 runs one float8 Linear forward and backward on ctx.device first.

    Raises:
        TransformOrderError: with_amp was already applied to this Context or this model
            (a module of it already runs accel's autocast forward), or comes too late.
        UnsupportedError: fp8's float8 matmul (torch._scaled_mm) does not run on
            ctx.device for the recipe, or no Linear is eligible.

    >>> model, ctx = accel.with_amp(model, ctx)                # the launch's precision
    >>> model, ctx = accel.with_amp(model, ctx, dtype="bf16")  # bf16 whatever the launch
    >>> model, ctx = accel.with_amp(model, ctx, dtype="fp8", recipe="rowwise",
    ...                             module_filter=lambda module, name: name != "lm_head")
    >>> model, ctx = accel.with_amp(model, ctx, dtype="bf16", params="bf16",
    ...                             master_weights=True)
    """
    check_module("with_amp", "model", model)
    check_context("with_amp", ctx)
    if dtype is not None and dtype not in PRECISIONS:
        raise IncompatibleOptionsError(f"dtype must be one of {PRECISIONS} or None (the "
                                       f"launch's precision), got {dtype!r}")
    check_bool("with_amp", "fp32_outputs", fp32_outputs)
    _check_low_precision(recipe, module_filter, params, master_weights)
    if ctx.was_applied("with_amp"):
        raise TransformOrderError("with_amp was already applied; apply it once")
    _check_not_autocast(model)
    for later in ("shard_model", "wrap_optimizer"):
        if ctx.was_applied(later):
            raise TransformOrderError(
                f"with_amp must come before {later} (the engine and the gradient scaler "
                "are built for the precision); reorder the transforms"
            )
    dtype = pick(ctx.settings, "mixed_precision", dtype, ctx.precision, "with_amp(dtype=...)",
                 warn=ctx.is_main_process)
    _check_combination(dtype, recipe, module_filter, params, master_weights)
    if dtype == "no":
        return model, ctx.record("with_amp(no)", precision="no")
    _check_supported(dtype, ctx.device)
    if dtype == "fp8":
        model = _convert_to_float8(model, ctx, recipe, module_filter)
    if params != "fp32":
        _lower_parameters(model, _AUTOCAST_DTYPES[params])
    model.forward = AutocastForward(model.forward, ctx.device.type, _AUTOCAST_DTYPES[dtype],
                                    fp32_outputs)
    return model, ctx.record(_describe(dtype, recipe, params, master_weights), precision=dtype)


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


def _convert_to_float8(model: nn.Module, ctx: Context, recipe: Any,
                       module_filter: Any) -> nn.Module:
    from accel.backends import _float8  # on use: `accel.with_amp` loads no engine code

    config = _float8.float8_config(recipe, ctx.dp_size)
    _float8.check_kernels(config, ctx.device, recipe)
    # A model that is itself one Linear is replaced, not modified: use the returned module.
    return _float8.convert(model, config, module_filter)


def _check_low_precision(recipe: Any, module_filter: Any, params: Any,
                         master_weights: Any) -> None:
    check_callable("with_amp", "module_filter", module_filter,
                   "a function (module, fully qualified name) -> bool", optional=True)
    if params not in PARAM_DTYPES:
        fail("with_amp", "params", params, f"one of {PARAM_DTYPES}", wrong_type=False)
    check_bool("with_amp", "master_weights", master_weights)


def _check_combination(dtype: str, recipe: Any, module_filter: Any, params: str,
                       master_weights: bool) -> None:
    if dtype != "fp8" and (recipe is not None or module_filter is not None):
        raise IncompatibleOptionsError(
            f"with_amp: recipe= and module_filter= choose how fp8 trains, but dtype is "
            f"{dtype!r}; pass dtype='fp8' or drop them")
    if params != "fp32" and params != dtype:
        raise IncompatibleOptionsError(
            f"with_amp: params={params!r} keeps the parameters in the dtype the forward "
            f"computes in, dtype={params!r}, but dtype is {dtype!r}")
    if master_weights and params == "fp32":
        raise IncompatibleOptionsError(
            "with_amp: master_weights=True keeps fp32 copies of low-precision parameters, "
            "but params='fp32' already keeps fp32 parameters; pass params='bf16' with it")


def _lower_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """The model's floating parameters (and their gradients) in `dtype`, objects kept:
    an optimizer already built over them stays valid. Buffers keep their dtype (rotary
    frequencies, normalisation statistics): autocast mixes them in as it computes."""
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                grad, param.grad = param.grad, None
                param.data = param.data.to(dtype)
                param.grad = None if grad is None else grad.to(dtype)


def _describe(dtype: str, recipe: Any, params: str, master_weights: bool) -> str:
    parts = [dtype]
    if dtype == "fp8":
        parts.append(recipe if isinstance(recipe, str) else
                     "tensorwise" if recipe is None else type(recipe).__name__)
    if params != "fp32":
        parts.append(f"params={params}")
    if master_weights:
        from accel.backends._master_weights import MARK  # what wrap_optimizer looks for

        parts.append(MARK)
    return f"with_amp({', '.join(parts)})"
