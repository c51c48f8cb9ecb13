"""Full (unpartitioned) model and optimizer state of a DeepSpeed engine, in torch's format.

Parameters are the fp32 master weights the optimizer holds (not the bf16/fp16 copies
the module computes with); optimizer state is torch's ``{"state", "param_groups"}``
with one entry per parameter, keyed by position (like `Optimizer.state_dict()`) or by
name (like torch.distributed.checkpoint). A full state from any backend loads here,
and the other way round. Every function is a collective: call it on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from accel.errors import InvalidArgumentError

if TYPE_CHECKING:
    from accel.backends.deepspeed.engine import DeepSpeedModel, DeepSpeedOptimizer

#: a parameter -> its key in the optimizer state (None: its position, as torch does).
KeyOf = Callable[[nn.Parameter], Any] | None


def get_full_model_state(model: DeepSpeedModel) -> dict[str, torch.Tensor]:
    """Every parameter (fp32 master weights) and persistent buffer, whole, on the CPU."""
    import deepspeed

    model.build_engine()
    params = dict(model.module.named_parameters(remove_duplicate=False))
    state = {}
    for name, value in model.module.state_dict(keep_vars=True).items():
        param = params.get(name)
        if param is None:
            state[name] = value.detach().cpu().clone()
            continue
        # The master weights live in the optimizer; an inference engine has only the module's.
        full = (deepspeed.utils.safe_get_full_fp32_param(param)
                if model.optimizer is not None else None)
        if full is None:  # a frozen parameter, or an engine without optimizer
            with _gathered([param]):
                full = param.detach().float()
        state[name] = full.detach().cpu().clone()
    return state


def set_full_model_state(model: DeepSpeedModel, state: dict[str, torch.Tensor]) -> None:
    """Load whole tensors into the master weights and the module's computing copies."""

    engine = model.build_engine()
    expected = set(model.module.state_dict(keep_vars=True))
    if set(state) != expected:
        raise InvalidArgumentError(
            f"the state does not fit the model: missing {sorted(expected - set(state))}, "
            f"unexpected {sorted(set(state) - expected)}"
        )
    device = engine.device
    with torch.no_grad():
        for name, param in model.module.named_parameters():
            value = state[name].to(device)
            with _gathered([param], modifier_rank=0):
                param.copy_(value.to(param.dtype).reshape(param.shape))
            if model.optimizer is not None:
                _set_master(param, value.float())
        for name, buffer in model.module.named_buffers():
            if name in state:
                buffer.copy_(state[name])


def get_full_optimizer_state(optimizer: DeepSpeedOptimizer, key_of: KeyOf) -> dict[str, Any]:
    """torch's optimizer state format, one entry per parameter, gathered from all ranks."""
    import deepspeed

    client = optimizer.optimizer
    keys = _key_function(optimizer, key_of)
    state: dict[Any, dict[str, Any]] = {}
    groups = []
    for index, (group, params) in enumerate(zip(client.param_groups, optimizer.group_params,
                                                strict=True)):
        scalars, tensor_keys = _state_layout(client, _flats(optimizer, index))
        for param in params:
            entry = {key: value.clone() for key, value in scalars.items()}
            for key in tensor_keys:
                full = deepspeed.utils.safe_get_full_optimizer_state(param, key)
                if full is not None:
                    entry[key] = full.detach().cpu().reshape(param.ds_shape if hasattr(
                        param, "ds_shape") else param.shape).clone()
            if entry and param.requires_grad:
                state[keys(param)] = entry
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [keys(param) for param in params]})
    return {"state": state, "param_groups": groups}


def set_full_optimizer_state(optimizer: DeepSpeedOptimizer, state_dict: dict[str, Any],
                             key_of: KeyOf) -> None:
    """Load a torch-format optimizer state into the partitions of every rank."""

    client = optimizer.optimizer
    saved_groups = state_dict.get("param_groups", [])
    if len(saved_groups) != len(client.param_groups):
        raise InvalidArgumentError(
            f"the optimizer state has {len(saved_groups)} param groups, this optimizer "
            f"{len(client.param_groups)}; load a state saved from the same optimizer setup"
        )
    _create_missing_state(optimizer, state_dict)
    device = optimizer.model.engine.device
    for index, (group, params, saved) in enumerate(zip(
            client.param_groups, optimizer.group_params, saved_groups, strict=True)):
        if len(saved["params"]) != len(params):
            raise InvalidArgumentError(
                f"a param group of the saved state has {len(saved['params'])} parameters, "
                f"this one {len(params)}; load a state saved from the same model"
            )
        group.update({k: v for k, v in saved.items() if k != "params"})
        flats = _flats(optimizer, index)
        scalars, tensor_keys = _state_layout(client, flats)
        for param, key in zip(params, saved["params"], strict=True):
            entry = state_dict["state"].get(key, {})
            for name, value in entry.items():
                if name in tensor_keys:
                    _set_master(param, value.to(device, torch.float32), name)
                elif name in scalars:  # per flat partition in DeepSpeed (Adam's step)
                    for flat in flats:
                        client.state[flat][name] = torch.as_tensor(value).clone()


def _create_missing_state(optimizer: DeepSpeedOptimizer, state_dict: dict[str, Any]) -> None:
    """Give every flat partition the entries `state_dict` has, where none exist yet.

    torch optimizers create their state at the first step; before it there is nothing to
    load into. The entries are what the optimizer would create: zeros, and the scalars.
    """
    client = optimizer.optimizer
    template = next(iter(state_dict.get("state", {}).values()), None)
    flats = [flat for index in range(len(client.param_groups))
             for flat in _flats(optimizer, index)]
    if template is None or all(flat in client.state for flat in flats):
        return
    for flat in flats:
        client.state[flat] = {
            key: (torch.zeros_like(flat, dtype=torch.float32) if torch.is_tensor(value)
                  and value.dim() > 0 else torch.as_tensor(value).clone())
            for key, value in template.items()}
    zero = optimizer.model.engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1/2 link state views
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _flats(optimizer: DeepSpeedOptimizer, group_index: int) -> list[torch.Tensor]:
    """The flat fp32 partitions the torch optimizer steps for one of the user's groups."""
    zero = optimizer.model.engine.optimizer
    if hasattr(zero, "sub_group_to_group_id"):  # ZeRO-3: one flat tensor per sub-group
        return [zero.fp32_partitioned_groups_flat[sub]
                for sub, group in sorted(zero.sub_group_to_group_id.items())
                if group == group_index]
    return list(optimizer.optimizer.param_groups[group_index]["params"])


def _state_layout(client: torch.optim.Optimizer,
                  flats: list[torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(scalar entries shared by the group's partitions, names of per-element entries)."""
    scalars: dict[str, torch.Tensor] = {}
    tensor_keys: list[str] = []
    for flat in flats:
        for key, value in client.state.get(flat, {}).items():
            if torch.is_tensor(value) and value.dim() > 0:
                if key not in tensor_keys:
                    tensor_keys.append(key)
            else:
                scalars.setdefault(key, torch.as_tensor(value))
    return scalars, tensor_keys


def _key_function(optimizer: DeepSpeedOptimizer, key_of: KeyOf) -> Callable[[Any], Any]:
    if key_of is not None:
        return key_of
    positions = {id(p): i for i, p in enumerate(p for ps in optimizer.group_params for p in ps)}
    return lambda param: positions[id(param)]


def _set_master(param: nn.Parameter, value: torch.Tensor, state_key: str | None = None) -> None:
    """Write this rank's part of a whole fp32 tensor into the master weights (or state)."""
    import deepspeed

    if not hasattr(param, "ds_id"):  # ZeRO 1/2
        if state_key is None:
            deepspeed.utils.safe_set_full_fp32_param(param, value)
        else:
            deepspeed.utils.safe_set_full_optimizer_state(param, value, state_key)
        return
    # ZeRO-3 pads the last partition; DeepSpeed 0.19's full setter slices past the end
    # of an unpadded value, so the local part is cut out here.
    size = param.ds_tensor.numel()
    padded = value.new_zeros(size * dist.get_world_size())
    padded[:value.numel()] = value.flatten()
    local = padded.narrow(0, size * dist.get_rank(), size)
    if state_key is None:
        deepspeed.utils.safe_set_local_fp32_param(param, local)
    else:
        deepspeed.utils.safe_set_local_optimizer_state(param, local, state_key)


def _gathered(params: list[nn.Parameter], modifier_rank: int | None = None) -> Any:
    """ZeRO-3's GatheredParameters (whole parameters inside the block); a no-op otherwise."""
    import deepspeed

    # modifier_rank: the rank whose changes are partitioned back on exit (None: none).
    enabled = any(hasattr(p, "ds_id") for p in params)
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank,
                                             enabled=enabled)
