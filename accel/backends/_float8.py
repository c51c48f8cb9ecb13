"""float8 training as torchao means it: recipes, module filters, the kernel check, and
FSDP2's float8 all-gather with the scales precomputed once per optimizer step.

`with_amp(dtype="fp8")` converts; `accel.FSDP` remembers the converted roots it shards
(`remember_fsdp_root`) and has the optimizer precompute their weights' scales after each
step (`precompute_after_steps`), as torchao asks.
"""

from __future__ import annotations

import dataclasses
import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from accel.errors import InvalidArgumentError, MissingDependencyError, UnsupportedError
from accel.validation import shown


def _torchao() -> Any:
    try:
        import torchao.float8 as float8
    except ImportError as exc:
        raise MissingDependencyError("torchao", "fp8", "fp8 training") from exc
    return float8


def recipes() -> tuple[str, ...]:
    """torchao's recipe names: tensorwise, rowwise, rowwise_with_gw_hp."""
    return tuple(name.value for name in _torchao().Float8LinearRecipeName)


def float8_config(recipe: Any, dp_size: int) -> Any:
    """The torchao Float8LinearConfig of `recipe` (a name, a config, or None: tensorwise).

    A tensorwise recipe over several data-parallel ranks all-gathers its weights in
    float8 under FSDP2 (half the bytes of bf16); DDP trains the same weights unchanged.
    """
    float8 = _torchao()
    if isinstance(recipe, float8.Float8LinearConfig):
        return recipe  # the user's: used as it is
    if recipe is None:
        recipe = "tensorwise"
    if recipe not in recipes():
        raise InvalidArgumentError(
            f"accel.with_amp: recipe must be one of {', '.join(map(repr, recipes()))} or a "
            f"torchao.float8.Float8LinearConfig, got {shown(recipe)}")
    config = float8.Float8LinearConfig.from_recipe_name(recipe)
    if recipe == "tensorwise" and dp_size > 1:
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    return config


def _eligible(module: nn.Module, name: str) -> bool:
    # torch._scaled_mm needs both dimensions divisible by 16.
    return (isinstance(module, nn.Linear) and module.in_features % 16 == 0
            and module.out_features % 16 == 0)


def convert(model: nn.Module, config: Any,
            module_filter: Callable[[nn.Module, str], bool] | None) -> nn.Module:
    """Swap the eligible nn.Linear layers (that `module_filter` also accepts) for
    torchao's Float8Linear; a model that is itself one Linear is returned replaced."""
    def chosen(module: nn.Module, name: str) -> bool:
        return _eligible(module, name) and (module_filter is None or module_filter(module, name))

    if not any(chosen(module, name) for name, module in model.named_modules()):
        filtered = " that module_filter accepts" if module_filter is not None else ""
        raise UnsupportedError(
            f"fp8 found no nn.Linear{filtered} whose in_features and out_features are "
            "multiples of 16; fp8 would change nothing in this model: use bf16"
        )
    return _torchao().convert_to_float8_training(model, module_filter_fn=chosen, config=config)


def check_kernels(config: Any, device: torch.device, recipe: Any) -> None:
    """Train one float8 Linear of `config` a step on `device` as with_amp runs it (forward
    under bf16 autocast, backward after it), or raise UnsupportedError saying what failed.

    torchao computes with torch._scaled_mm, whose kernels exist per device, per float8
    dtype and per scale layout (per-tensor, per-row), and some recipes do not run under
    autocast at all: without this check either would surface at the first step.
    """
    if config.emulate:
        return  # torchao's emulation runs float8 casts through ordinary matmuls
    probe = convert(nn.Linear(16, 16, device=device), config, None)
    inputs = torch.randn(16, 16, device=device, requires_grad=True)
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            outputs = probe(inputs)
        outputs.float().sum().backward()
    except (RuntimeError, NotImplementedError) as exc:
        name = recipe if isinstance(recipe, str) else "tensorwise" if recipe is None else (
            f"{config.cast_config_weight.scaling_granularity.value} Float8LinearConfig")
        raise UnsupportedError(
            f"fp8 recipe {name!r} cannot train on {device}: one float8 Linear step under "
            f"bf16 autocast failed in torchao with {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]} (a missing torch._scaled_mm kernel is named "
            "here); use another recipe, or dtype='bf16'"
        ) from exc


# ------------------------------------------------------------------------ FSDP2

#: sharded float8 weight -> weakref to the FSDP root holding it (weak both ways).
_ROOTS: WeakIdKeyDictionary = WeakIdKeyDictionary()
#: torch optimizers that already precompute scales after their steps.
_HOOKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _float8_all_gather_weights(model: nn.Module) -> list[torch.Tensor]:
    # Only a model with_amp converted holds them, and converting imported torchao: a
    # process that has not imported it has none (importing it costs ~2 s of start-up).
    utils = sys.modules.get("torchao.float8.fsdp_utils")
    if utils is None:
        return []
    WeightWithDynamicFloat8CastTensor = utils.WeightWithDynamicFloat8CastTensor  # noqa: N806
    return [param for param in model.parameters()
            if isinstance(getattr(param, "_local_tensor", None), WeightWithDynamicFloat8CastTensor)]


def remember_fsdp_root(model: nn.Module) -> None:
    """Note the FSDP2 root of float8 all-gathered weights, for `precompute_after_steps`."""
    for param in _float8_all_gather_weights(model):
        _ROOTS[param] = weakref.ref(model)


def precompute_after_steps(optimizer: Any) -> None:
    """Have `optimizer` (an AccelOptimizer) precompute the float8 scales of the FSDP2
    roots its parameters belong to after each real step: one all-reduce of all weights'
    amax instead of one per weight at the next all-gather."""
    roots = {id(root): root for group in optimizer.param_groups for param in group["params"]
             if param in _ROOTS and (root := _ROOTS[param]()) is not None}
    inner = optimizer.optimizer
    if not roots or inner in _HOOKED:
        return
    precompute = _torchao().precompute_float8_dynamic_scale_for_fsdp
    handles = [weakref.ref(root) for root in roots.values()]

    def after_step(*_: Any) -> None:
        for handle in handles:
            root = handle()
            if root is not None:
                precompute(root)

    _HOOKED[inner] = inner.register_step_post_hook(after_step)
