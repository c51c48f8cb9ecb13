"""fp32 master weights for a model whose parameters are bf16 (`with_amp(..., params="bf16",
master_weights=True)`): the optimizer steps fp32 copies, the model keeps bf16.

The optimizer's param groups keep the model's own bf16 parameters, so checkpoints map
its state to parameter names as for any optimizer. Around each step of the torch
optimizer (hooks on it, so torch's checkpoint code, which steps it to create state, gets
the same), each bf16 parameter's data is swapped for its fp32 master and its gradient
for an fp32 copy: the optimizer's state is created and updated in fp32, and the master
is stored in that state ("master_weight"), saved and loaded with it. After the step the
bf16 parameter takes the master's value, rounded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.utils.weak import WeakIdKeyDictionary

from accel.errors import IncompatibleOptionsError

#: what with_amp writes in its record when it asks for master weights.
MARK = "master_weights"
KEY = "master_weight"
_LOW = (torch.bfloat16, torch.float16)


def wanted(ctx: Any) -> bool:
    """Whether with_amp recorded master_weights=True in this Context."""
    return any(step.startswith("with_amp(") and MARK in step for step in ctx.applied)


#: torch optimizers that already have master weights.
_ATTACHED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def attach(optimizer: Any) -> None:
    """Give `optimizer` (an AccelOptimizer) fp32 master weights for its bf16 parameters."""
    inner = optimizer.optimizer
    params = [p for group in inner.param_groups for p in group["params"]]
    if any(isinstance(param, DTensor) for param in params):
        raise IncompatibleOptionsError(
            "with_amp(master_weights=True) keeps whole fp32 copies, not DTensor shards: under "
            "FSDP2 use with_amp(dtype='bf16') without params= (FSDP2 keeps fp32 shards, "
            "gathers them in bf16 and reduces gradients in fp32: master weights already)")
    if not any(param.dtype in _LOW for param in params):
        raise IncompatibleOptionsError(
            "with_amp(master_weights=True): the optimizer holds no bf16 parameter; build it "
            "over model.parameters() after with_amp(..., params='bf16')")
    if inner in _ATTACHED:
        return
    swap = _Swap(inner)
    _ATTACHED[inner] = (inner.register_step_pre_hook(swap.before_step),
                        inner.register_step_post_hook(swap.after_step),
                        inner.register_load_state_dict_pre_hook(swap.before_load),
                        inner.register_load_state_dict_post_hook(swap.after_load))


class _Swap:
    """Swaps bf16 parameters for their fp32 masters while the optimizer works on them.

    A parameter's master enters its optimizer state after its first step: a state not
    empty before that step would skip the optimizer's own initialisation of it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        #: parameter -> (its bf16 data, its bf16 gradient), during a step or a load.
        self.low: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]
                if p.dtype in _LOW]

    def _enter(self, param: torch.Tensor, data: torch.Tensor, grad: torch.Tensor | None) -> None:
        self.low[param] = (param.data, param.grad)
        param.grad = None  # a gradient must match the dtype of the data it is set beside
        param.data = data
        param.grad = grad

    def _leave(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Give every swapped parameter its bf16 data and gradient back: (param, fp32 data)."""
        swapped = []
        for param, (low, low_grad) in self.low.items():
            swapped.append((param, param.data))
            param.grad = None
            param.data = low
            param.grad = low_grad
        self.low.clear()
        return swapped

    def before_step(self, *_: Any) -> None:
        for param in self._params():
            if param.grad is not None:  # else the optimizer skips it too
                master = self.optimizer.state.get(param, {}).get(KEY)
                if master is None:
                    master = param.detach().float()
                self._enter(param, master, param.grad.float())

    def after_step(self, *_: Any) -> None:
        for param, master in self._leave():
            param.data.copy_(master)
            self.optimizer.state[param][KEY] = master

    def before_load(self, optimizer: Any, state_dict: Any) -> None:
        # torch casts loaded state to each parameter's dtype: fp32 while this lasts.
        for param in self._params():
            self._enter(param, param.data.float(), None)

    def after_load(self, optimizer: Any) -> None:
        for param, _ in self._leave():
            master = self.optimizer.state.get(param, {}).get(KEY)
            if master is not None:
                param.data.copy_(master)
