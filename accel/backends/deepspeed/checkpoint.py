"""DeepSpeed's own checkpoint directories, and the consolidated fp32 weights export.

`save_checkpoint` / `load_checkpoint` are the engine's: every rank writes and reads its
own partition (ZeRO's sharded form, with the fp32 master weights, optimizer state, loss
scale and step counters). `save_fp32_weights` (live engine) and `checkpoint_to_fp32`
(a checkpoint directory, one process, no engine: DeepSpeed's zero_to_fp32) write the
whole fp32 model as one safetensors file.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from accel.backends.deepspeed.full_state import get_full_model_state
from accel.errors import AccelError

if TYPE_CHECKING:
    from accel.backends.deepspeed.engine import DeepSpeedModel, DeepSpeedOptimizer

_ACCEL_KEY = "accel_optimizer"


def save_checkpoint(model: DeepSpeedModel, optimizer: DeepSpeedOptimizer | None,
                    directory: str | os.PathLike[str], *, tag: str | None = None,
                    client_state: dict[str, Any] | None = None) -> None:
    """Write the engine's checkpoint under `directory`/`tag` (every rank its partition).

    `client_state` (picklable) is stored with it and returned by `load_checkpoint`.
    """
    engine = model.build_engine()
    state = dict(client_state or {})
    if optimizer is not None:
        state[_ACCEL_KEY] = {
            "real_steps": optimizer.real_steps,
            "accumulation": (optimizer.accumulation.state_dict()
                             if optimizer.accumulation is not None else None),
        }
    engine.save_checkpoint(os.fspath(directory), tag=tag, client_state=state)


def load_checkpoint(model: DeepSpeedModel, optimizer: DeepSpeedOptimizer | None,
                    directory: str | os.PathLike[str], *,
                    tag: str | None = None) -> dict[str, Any]:
    """Load what `save_checkpoint` wrote (the latest tag by default); return client_state.

    Without `optimizer` only the model's weights are loaded.
    """
    engine = model.build_engine()
    path, state = engine.load_checkpoint(
        os.fspath(directory), tag=tag, load_optimizer_states=optimizer is not None,
        load_lr_scheduler_states=False, load_module_only=optimizer is None,
    )
    if path is None:
        raise AccelError(
            f"no DeepSpeed checkpoint found in {os.fspath(directory)!r}"
            + (f" with tag {tag!r}" if tag else " (no 'latest' file)")
            + "; pass the directory given to save_checkpoint"
        )
    state = dict(state or {})
    accel_state = state.pop(_ACCEL_KEY, None)
    if optimizer is not None and accel_state is not None:
        optimizer.real_steps = accel_state["real_steps"]
        if optimizer.accumulation is not None and accel_state["accumulation"] is not None:
            optimizer.accumulation.load_state_dict(accel_state["accumulation"])
    return state


def save_fp32_weights(model: DeepSpeedModel, path: str | os.PathLike[str]) -> None:
    """Gather the fp32 master weights of a live engine; rank 0 writes them to `path`.

    A collective: call it on every rank.
    """
    state = get_full_model_state(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        _write_safetensors(state, path)
    if dist.is_initialized():
        dist.barrier()  # the file exists on return, on every rank


def checkpoint_to_fp32(directory: str | os.PathLike[str], path: str | os.PathLike[str], *,
                       tag: str | None = None) -> dict[str, torch.Tensor]:
    """Consolidate a DeepSpeed checkpoint directory into one fp32 safetensors file.

    Runs in a single process without a process group (DeepSpeed's zero_to_fp32); returns
    the state it wrote.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(os.fspath(directory), tag=tag)
    state = {name: tensor.detach().float() for name, tensor in state.items()}
    _write_safetensors(state, path)
    return state


def _write_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    # safetensors refuses tensors that share memory (tied weights): each gets its own copy.
    save_file({name: tensor.detach().cpu().contiguous().clone()
               for name, tensor in state.items()}, os.fspath(path))
