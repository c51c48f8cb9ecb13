"""Build models without allocating their weights, and measure what they would weigh."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_parameter_registration_hook,
)

from accel.errors import InvalidArgumentError
from accel.validation import check_bool, check_device, check_module


@contextlib.contextmanager
def init_empty_weights(include_buffers: bool = False) -> Iterator[None]:
    """Build modules with every parameter on the meta device: shapes only, no memory.

    Buffers stay real by default, because many are computed in `__init__` (rotary
    frequencies, causal masks) and are not in checkpoints; `include_buffers=True` puts
    them on meta too. Load weights afterwards with `load_checkpoint_and_dispatch`.

    >>> with accel.init_empty_weights():
    ...     model = GPT2LMHeadModel(config)        # 0 bytes of parameters
    >>> model.lm_head.weight.device
    device(type='meta')
    """
    check_bool("init_empty_weights", "include_buffers", include_buffers)
    with init_on_device(torch.device("meta"), include_buffers=include_buffers):
        yield


@contextlib.contextmanager
def init_on_device(device: str | torch.device, include_buffers: bool = False) -> Iterator[None]:
    """Build modules with every parameter (and, optionally, buffer) created on `device`.

    Parameters are moved as they are registered (through torch's global registration
    hooks, removed on exit), so a parameter made by `torch.empty` in `__init__` is never
    touched in host memory. With `include_buffers`, every tensor created inside the block
    is created on `device` (torch's device context).

    >>> with accel.init_on_device("cuda:0"):
    ...     model = build_model()                 # straight onto the GPU
    """
    check_device("init_on_device", "device", device)
    check_bool("init_on_device", "include_buffers", include_buffers)
    target = torch.device(device)

    def move_parameter(module: nn.Module, name: str, param: nn.Parameter | None):
        if param is None or param.device == target:
            return None
        # Keep the parameter's class (and its attributes) so subclasses survive the move.
        moved = type(param)(param.to(target), requires_grad=param.requires_grad)
        moved.__dict__.update(param.__dict__)
        return moved

    def move_buffer(module: nn.Module, name: str, buffer: torch.Tensor | None):
        if buffer is None or buffer.device == target:
            return None
        return buffer.to(target)

    with contextlib.ExitStack() as stack:
        stack.callback(register_module_parameter_registration_hook(move_parameter).remove)
        if include_buffers:
            stack.callback(register_module_buffer_registration_hook(move_buffer).remove)
            stack.enter_context(target)
        yield


def tensor_bytes(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """Bytes `tensor` takes, counting floating tensors at `dtype` when it is given."""
    if dtype is not None and tensor.is_floating_point():
        return tensor.numel() * dtype.itemsize
    return tensor.numel() * tensor.element_size()


def named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of `module` by its first name (a tied one appears once)."""
    yield from module.named_parameters()
    yield from module.named_buffers()


def compute_module_sizes(model: nn.Module, dtype: str | torch.dtype | None = None
                         ) -> dict[str, int]:
    """Bytes of every module and tensor of `model`, by name; "" is the whole model.

    A tied tensor is counted once, under its first name. Floating tensors are counted at
    `dtype` when it is given (integer buffers keep their own size). Works on meta models.

    >>> sizes = accel.compute_module_sizes(model, dtype="bfloat16")
    >>> sizes[""], sizes["transformer.h.0"]
    (248877056, 14160384)
    """
    check_module("compute_module_sizes", "model", model)
    as_dtype = to_dtype(dtype) if dtype is not None else None
    sizes: dict[str, int] = {"": 0}
    for name, tensor in named_tensors(model):
        size = tensor_bytes(tensor, as_dtype)
        parts = name.split(".")
        for depth in range(len(parts)):
            prefix = ".".join(parts[:depth])
            sizes[prefix] = sizes.get(prefix, 0) + size
        sizes[name] = size
    return sizes


_DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp64": torch.float64, "float64": torch.float64,
}


def to_dtype(value: str | torch.dtype) -> torch.dtype:
    """A floating torch dtype from a dtype or a name ("bf16", "float16", "torch.float32")."""
    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise InvalidArgumentError(
                f"dtype must be a floating dtype to convert weights to, got {value}"
            )
        return value
    key = str(value).lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise InvalidArgumentError(
            f"unknown dtype {value!r}; use one of {sorted(_DTYPE_NAMES)} or a torch.dtype"
        )
    return _DTYPE_NAMES[key]
