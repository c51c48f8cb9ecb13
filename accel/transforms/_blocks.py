"""The repeated blocks of a model (transformer layers), for compile_model and
checkpoint_activations: the same rule FSDP uses for its default shard units."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from accel.backends.fsdp import select_shard_units
from accel.errors import IncompatibleOptionsError
from accel.validation import fail

BlockSpec = type[nn.Module] | tuple[type[nn.Module], ...] | Callable[[nn.Module], bool] | None

_ALLOWED = ("None (the entries of each nn.ModuleList of 2+ modules of one class), a module "
            "class, a tuple of them, or a function module -> bool")


def find_blocks(function: str, model: nn.Module, blocks: BlockSpec) -> list[nn.Module]:
    """The blocks `blocks` names in `model`, in the model's order (outermost only).

    Raises:
        InvalidArgumentTypeError: `blocks` is none of the accepted forms.
        IncompatibleOptionsError: nothing in the model matches.
    """
    spec = _spec(function, blocks)
    try:
        found = select_shard_units(model, spec)
    except IncompatibleOptionsError:  # FSDP's wording names FSDP: say it for this function
        found = []
    if not found:
        raise IncompatibleOptionsError(
            f"accel.{function}: {_described(blocks)} matches no module holding parameters "
            f"below the root of this {type(model).__name__}; pass blocks=YourBlockClass (or "
            "a function module -> bool)")
    inside = {id(sub) for block in found for sub in block.modules() if sub is not block}
    position = {id(module): index for index, module in enumerate(model.modules())}
    return sorted((block for block in found if id(block) not in inside),
                  key=lambda block: position[id(block)])


def _spec(function: str, blocks: Any) -> Any:
    # a module is callable too, but it is no predicate: it would run on every module
    if blocks is None or (callable(blocks) and not isinstance(blocks, (type, nn.Module))):
        return blocks
    classes = blocks if isinstance(blocks, tuple) else (blocks,)
    if classes and all(isinstance(cls, type) and issubclass(cls, nn.Module) for cls in classes):
        return classes
    fail(function, "blocks", blocks, _ALLOWED)


def _described(blocks: Any) -> str:
    if blocks is None:
        return "blocks=None (the repeated blocks: nn.ModuleList entries of one class)"
    return f"blocks={getattr(blocks, '__name__', blocks)!r}"
