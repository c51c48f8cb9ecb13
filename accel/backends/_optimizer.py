"""`AccelOptimizer`: the optimizer every engine adapts, with the per-step state of a loop.

It holds what a training loop needs and no Context can: the fp16 gradient scaler, the
accumulation counter, and whether the last `step()` really changed the parameters
(`step_was_skipped`). `accel.wrap_optimizer` builds it; engines receive it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from accel.errors import IncompatibleOptionsError


class AccelOptimizer(torch.optim.Optimizer):
    """A torch optimizer that knows about gradient scaling and accumulation.

    It is an `Optimizer` (LR schedulers accept it) whose param groups and state are the
    wrapped optimizer's own. `step()` returns the wrapped step's value, or None when
    the step was skipped (`step_was_skipped`: an accumulation micro-step, or an fp16
    overflow).
    """

    # Deliberately no super().__init__: the wrapped optimizer owns groups, state, hooks.
    def __init__(self, optimizer: torch.optim.Optimizer, scaler: Any = None):
        self.optimizer = optimizer
        self.scaler = scaler
        #: set by accumulate_grads: the micro-step counter and gradient-sync switch.
        self.accumulation: Any = None
        self.step_was_skipped = False
        #: how many times the parameters were really updated.
        self.real_steps = 0
        # GradScaler.unscale_ raises when called twice before update(): clipping by norm
        # and then by value in one step must unscale once.
        self._grads_unscaled = False

    # The wrapped optimizer's attributes, so schedulers and user code see one optimizer.
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    def __getattr__(self, name: str) -> Any:
        # Only reached for names this class lacks: train()/eval() of schedule-free
        # optimizers, hook tables, custom attributes.
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        extra = ", fp16 scaler" if self.scaler is not None else ""
        if self.accumulation is not None:
            extra += f", accumulation {self.accumulation.steps}"
        return f"AccelOptimizer({type(self.optimizer).__name__}{extra})"

    @property
    def sync_gradients(self) -> bool:
        """Whether the current micro-batch ends an accumulation cycle (its step applies).

        Decided at the micro-batch's first forward and kept until the next micro-batch's
        first forward: it reads the same before and after `step()` (as Accelerate's
        `sync_gradients`), so `if optimizer.sync_gradients: completed_steps += 1` after
        the step counts real updates. Before the first forward it answers for the
        micro-batch to come; always True without `accumulate_grads`.
        """
        return self.accumulation is None or self.accumulation.is_boundary

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients, except in the middle of an accumulation cycle."""
        if self.accumulation is None or self.accumulation.micro_step == 0:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Apply the update at an accumulation boundary; count the micro-step otherwise."""
        if self.accumulation is not None and not self.accumulation.advance():
            self.step_was_skipped = True
            return None
        result = self._apply_step(closure)
        if not self.step_was_skipped:
            self.real_steps += 1
        return result

    def _apply_step(self, closure: Callable[[], Any] | None) -> Any:
        if self.scaler is None:
            self.step_was_skipped = False
            return self.optimizer.step() if closure is None else self.optimizer.step(closure)
        if closure is not None:
            raise IncompatibleOptionsError(
                "an optimizer step with a closure (LBFGS) cannot run under fp16 loss scaling; "
                "use bf16 or fp32 for closure-based optimizers"
            )
        scale = self.scaler.get_scale()
        result = self.scaler.step(self.optimizer)
        self.scaler.update()
        self._grads_unscaled = False
        # The scaler lowers its scale exactly when it found inf/nan and skipped the step.
        self.step_was_skipped = self.scaler.get_scale() < scale
        return result

    def unscale_gradients(self) -> None:
        """Divide the gradients by the fp16 loss scale; later calls before the step do nothing."""
        if self.scaler is not None and not self._grads_unscaled:
            self.scaler.unscale_(self.optimizer)
            self._grads_unscaled = True

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state, plus the loss scale and the accumulation micro-step."""
        state = self.optimizer.state_dict()
        if self.scaler is not None:
            state = {**state, "accel_scaler": self.scaler.state_dict()}
        if self.accumulation is not None:
            state = {**state, "accel_accumulation": self.accumulation.state_dict()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        scaler_state = state.pop("accel_scaler", None)
        accumulation = state.pop("accel_accumulation", None)
        self.optimizer.load_state_dict(state)
        if scaler_state is not None and self.scaler is not None:
            self.scaler.load_state_dict(scaler_state)
        if accumulation is not None and self.accumulation is not None:
            self.accumulation.load_state_dict(accumulation)
