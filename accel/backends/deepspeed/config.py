"""The DeepSpeed config accel writes: one source of truth for each setting it owns.

Precision, gradient accumulation, batch size, clipping, ZeRO stage and offload come from
the Context and the transforms. A user config adds anything else; where it sets one of
those to a different value, `IncompatibleOptionsError` names both. "auto" (or leaving
the key out) lets accel fill it in.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import attrs

from accel.backends import COLLECTIVE_BACKWARD, ENGINE_HOLDS_WEIGHTS, BuiltinStrategy
from accel.errors import IncompatibleOptionsError, InvalidOptionError, UnsupportedError
from accel.launch_settings import Setting
from accel.validation import check_bool, check_type, option_validator, shown

AUTO = "auto"


@attrs.frozen
class Facts:
    """What accel knows when the engine is built, each with where it comes from."""

    precision: str
    grad_accum_steps: int
    world_size: int
    device_type: str
    #: per-rank micro-batch size from the linked loader, and where it comes from.
    micro_batch_size: int | None = None
    micro_batch_source: str = ""
    #: the first forward's batch size: used only where neither loader nor config says.
    micro_batch_guess: int | None = None
    #: the torch.amp.GradScaler of wrap_optimizer (fp16), whose settings DeepSpeed follows.
    grad_scaler: Any = None


def load_user_config(config: Mapping[str, Any] | str | os.PathLike[str] | None) -> dict[str, Any]:
    """A private deep copy of the user's config (a dict, or the JSON file at a path)."""
    if config is None:
        return {}
    if isinstance(config, (str, os.PathLike)):
        try:
            with open(config) as file:
                config = json.load(file)
        except (OSError, json.JSONDecodeError) as exc:
            raise IncompatibleOptionsError(
                f"cannot read the DeepSpeed config {str(config)!r}: {exc}; pass a dict or "
                "the path of a JSON file"
            ) from exc
    if not isinstance(config, Mapping):
        raise IncompatibleOptionsError(
            f"a DeepSpeed config is a dict or a JSON file path, got {type(config).__name__}"
        )
    config = copy.deepcopy(dict(config))
    if "bfloat16" in config and "bf16" not in config:  # DeepSpeed's older name
        config["bf16"] = config.pop("bfloat16")
    return config


def settle(config: dict[str, Any], path: str, value: Any, source: str) -> None:
    """Write `value` at the dotted `path` unless the config already holds it.

    A missing key or "auto" is filled in; an equal value is kept; a different one raises.
    """
    *parents, key = path.split(".")
    node = config
    for name in parents:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise IncompatibleOptionsError(f"the DeepSpeed config's {name!r} must be a dict")
    current = node.get(key, AUTO)
    if current == AUTO:
        node[key] = value
    elif current != value:
        raise IncompatibleOptionsError(
            f"the DeepSpeed config sets {path}={current!r}, but {source} says {value!r}; "
            f"remove {path} from the config (accel fills it in) or change {source}"
        )


def static_config(user: Mapping[str, Any], strategy: Any, precision: str,
                  device_type: str) -> dict[str, Any]:
    """The config with what is known at shard_model: stage, offload, precision."""
    config = copy.deepcopy(dict(user))
    _reject_sections(config)
    stage = strategy.stage
    if stage is None:
        stage = config.get("zero_optimization", {}).get("stage", AUTO)
        stage = 2 if stage == AUTO else stage
    settle(config, "zero_optimization.stage", stage, f"accel.DeepSpeed(stage={stage})")
    _settle_offload(config, strategy, stage, device_type)
    _settle_precision(config, precision)
    # The user's torch optimizer is DeepSpeed's "client optimizer", offloaded or not;
    # accel does not silently swap in DeepSpeedCPUAdam (other numbers, a JIT-built op).
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    settle(config, "torch_autocast.enabled", False, "accel.with_amp (autocast of the forward)")
    return config


def engine_config(user: Mapping[str, Any], strategy: Any, facts: Facts) -> dict[str, Any]:
    """The whole config `deepspeed.initialize` receives."""
    config = static_config(user, strategy, facts.precision, facts.device_type)
    steps = facts.grad_accum_steps
    settle(config, "gradient_accumulation_steps", steps,
           "accumulate_grads (the Context's grad_accum_steps)")
    micro = _settle_micro_batch(config, facts)
    settle(config, "train_batch_size", micro * steps * facts.world_size,
           f"micro-batch x accumulation x world size ({micro} x {steps} x {facts.world_size})")
    # Clipping is set by accel.clip_grad_norm in the loop; 0 (off) until then.
    if config.get("gradient_clipping", AUTO) == AUTO:
        config["gradient_clipping"] = 0.0
    if facts.precision == "fp16":
        _settle_loss_scaling(config, facts.grad_scaler)
    return config


def explicit_clipping(user: Mapping[str, Any]) -> float | None:
    """The gradient_clipping the user's config sets itself (None: absent or "auto")."""
    value = user.get("gradient_clipping", AUTO)
    return None if value == AUTO else float(value)


def _reject_sections(config: Mapping[str, Any]) -> None:
    for section, instead in (("optimizer", "build the torch optimizer and pass it to "
                              "accel.wrap_optimizer"),
                             ("scheduler", "build a torch LR scheduler and pass it to "
                              "accel.wrap_scheduler")):
        if section in config:
            raise IncompatibleOptionsError(
                f"the DeepSpeed config has a {section!r} section, but under accel the loop "
                f"steps PyTorch objects: {instead}, and remove {section!r} from the config"
            )


def _settle_offload(config: dict[str, Any], strategy: Any, stage: int, device_type: str) -> None:
    pin = device_type == "cuda"  # pinned memory needs an accelerator
    for option, key in (("offload_optimizer", "offload_optimizer"),
                        ("offload_params", "offload_param")):
        wanted = getattr(strategy, option)
        if wanted is None:
            continue
        source = f"accel.DeepSpeed({option}={wanted})"
        settle(config, f"zero_optimization.{key}.device", "cpu" if wanted else "none", source)
        if wanted:
            config["zero_optimization"][key].setdefault("pin_memory", pin)
    param_device = config.get("zero_optimization", {}).get("offload_param", {}).get("device")
    if param_device not in (None, "none") and stage != 3:
        raise IncompatibleOptionsError(
            f"offloading parameters needs ZeRO stage 3 (it partitions parameters), but the "
            f"stage is {stage}; use accel.DeepSpeed(stage=3, offload_params=True)"
        )


def _settle_precision(config: dict[str, Any], precision: str) -> None:
    if precision == "fp8":
        raise UnsupportedError(
            "fp8 training is not available with the DeepSpeed backend in accel; use "
            "with_amp(dtype='bf16') with DeepSpeed, or fp8 with DDP or FSDP"
        )
    source = f"the Context's precision ({precision!r}, from with_amp)"
    settle(config, "bf16.enabled", precision == "bf16", source)
    settle(config, "fp16.enabled", precision == "fp16", source)


def _settle_micro_batch(config: dict[str, Any], facts: Facts) -> int:
    if facts.micro_batch_size is not None:
        settle(config, "train_micro_batch_size_per_gpu", facts.micro_batch_size,
               facts.micro_batch_source)
    micro = config.get("train_micro_batch_size_per_gpu", AUTO)
    if micro == AUTO:
        # Only DeepSpeed's sample counters and logs read it. An engine built before any
        # forward (to load a checkpoint) starts with 1; its first forward sets the size.
        micro = config["train_micro_batch_size_per_gpu"] = facts.micro_batch_guess or 1
    return int(micro)


def micro_batch_pending(user: Mapping[str, Any], facts: Facts) -> bool:
    """Whether the engine's micro-batch size is a stand-in, to be set at the first forward."""
    return (facts.micro_batch_size is None and facts.micro_batch_guess is None
            and user.get("train_micro_batch_size_per_gpu", AUTO) == AUTO)


def _settle_loss_scaling(config: dict[str, Any], scaler: Any) -> None:
    """DeepSpeed scales fp16 losses itself, following the GradScaler's settings."""
    if scaler is None:
        return
    init_scale = scaler.get_scale()
    power = math.log2(init_scale)
    if not power.is_integer():
        raise UnsupportedError(
            f"DeepSpeed's loss scale starts at a power of two; the GradScaler's init_scale "
            f"is {init_scale}: use e.g. torch.amp.GradScaler(init_scale=2.0**16)"
        )
    if scaler.get_growth_factor() != 2.0 or scaler.get_backoff_factor() != 0.5:
        raise UnsupportedError(
            "DeepSpeed doubles and halves its loss scale; the GradScaler has growth_factor="
            f"{scaler.get_growth_factor()} and backoff_factor={scaler.get_backoff_factor()}: "
            "use the defaults 2.0 and 0.5"
        )
    source = "the GradScaler of wrap_optimizer"
    settle(config, "fp16.loss_scale", 0, f"{source} (dynamic scaling)")
    settle(config, "fp16.initial_scale_power", int(power), f"{source} (init_scale={init_scale})")
    settle(config, "fp16.loss_scale_window", scaler.get_growth_interval(),
           f"{source} (growth_interval={scaler.get_growth_interval()})")
    # torch halves the scale at the first overflow; DeepSpeed's default waits for two.
    settle(config, "fp16.hysteresis", 1, f"{source} (halves the scale at every overflow)")


def _check_deepspeed_stage(instance: Any, attribute: Any, value: Any) -> None:
    if value is None or (type(value) is int and value in (1, 2, 3)):  # not True, not 2.0
        return
    raise InvalidOptionError(
        f"accel.DeepSpeed: stage must be 1 (optimizer state partitioned), 2 (+ gradients), "
        f"3 (+ parameters) or None (the config's, else 2), got {shown(value)}"
    )


_offload_flag = option_validator("DeepSpeed", check_bool, optional=True)


@attrs.frozen
class DeepSpeed(BuiltinStrategy):
    """DeepSpeed ZeRO: optimizer state (stage 1), gradients (2) and parameters (3) partitioned.

    `shard_model` wraps the model; `wrap_optimizer` links the optimizer to it; the engine
    (`deepspeed.initialize`) is built at the model's first forward, once accumulation
    and batch size are known. The loop stays the one of every other strategy:
    `accel.backward`, `optimizer.step()`, `optimizer.zero_grad()`, `accel.clip_grad_norm`
    go through the engine.

    One source of truth: precision (with_amp), gradient accumulation (accumulate_grads),
    clipping (clip_grad_norm), batch size (the loader linked to accumulate_grads, else the
    first forward's batch) and fp16 loss scaling (the GradScaler of wrap_optimizer) are
    written into the DeepSpeed config. `config` adds everything else; where it sets one
    of those to another value an error names both ("auto" is filled in).

    Args:
        stage: ZeRO stage 1, 2 or 3; None: the config's, else 2.
        offload_optimizer: keep optimizer state and fp32 master weights on the CPU.
        offload_params: keep partitioned parameters on the CPU (stage 3 only).
        config: a DeepSpeed config dict or JSON file path (zero_optimization tuning,
            communication settings, ...). None: accel's settings alone.

    >>> model, ctx = accel.shard_model(model, ctx, strategy=accel.DeepSpeed(stage=3))
    """

    capabilities = frozenset({COLLECTIVE_BACKWARD, ENGINE_HOLDS_WEIGHTS})
    #: the options `accel config` asks and `accel launch` passes (`[deepspeed]` in a file).
    settings = (
        Setting("deepspeed_stage", int, None, "ZeRO stage 1, 2 or 3", training=True,
                choices=(1, 2, 3), section="deepspeed",
                question="DeepSpeed ZeRO stage (1/2/3)", ask_default=2),
        Setting("deepspeed_offload_optimizer", bool, None, "optimizer state on the CPU",
                training=True, section="deepspeed",
                question="Offload optimizer state to the CPU", ask_default=False),
        Setting("deepspeed_offload_params", bool, None, "parameters on the CPU (stage 3)",
                training=True, section="deepspeed", question="Offload parameters to the CPU",
                ask_default=False, asked_if=lambda answers: answers["deepspeed_stage"] == 3),
    )
    stage: int | None = attrs.field(default=None, validator=_check_deepspeed_stage)
    offload_optimizer: bool | None = attrs.field(default=None, validator=_offload_flag)
    offload_params: bool | None = attrs.field(default=None, validator=_offload_flag)
    # A dict does not hash: compared, but left out of the hash of the frozen config.
    config: Any = attrs.field(default=None, hash=False, validator=option_validator(
        "DeepSpeed", check_type, (Mapping, str, os.PathLike),
        "a DeepSpeed config dict or the path of its JSON file", optional=True))

    @classmethod
    def from_settings(cls, settings: Any) -> DeepSpeed:
        """DeepSpeed with the deepspeed_* options of `accel launch` / `accel config`."""
        return cls(stage=settings.deepspeed_stage,
                   offload_optimizer=settings.deepspeed_offload_optimizer,
                   offload_params=settings.deepspeed_offload_params)
