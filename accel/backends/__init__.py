"""Engines behind the public transforms: a strategy is anything that implements `Strategy`.

The public transforms validate their inputs, then call ``engine_of(ctx).<method>``: no
code outside this package branches on an engine's name; it asks for a declared
capability (`has_capability`). A strategy is:

- a built-in: one module here (``single``, ``ddp``, ``fsdp``, ``deepspeed``, ``xla``,
  ``custom``) defining module-level engine functions and its config class, a subclass
  of `BuiltinStrategy` (``accel.DDP()``...). Its name is its module's name: the module
  list is the one place names live, so adding an engine is adding one file;
- the user's own: any object with the methods of `Strategy` (subclass `accel.Strategy`
  for single-process defaults), or `accel.Custom(parallelize_fn)`.

Modules whose names start with ``_`` hold shared code, not engines.
"""

from __future__ import annotations

import atexit
import functools
import gc
import importlib
import pkgutil
import sys
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar

from accel.errors import IncompatibleOptionsError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from accel.context import Context

#: the engine keeps the user's parameter objects (an optimizer built before it stays valid).
KEEPS_PARAMETERS = "keeps_parameters"
#: ranks may train without gradient sync and average whole parameters (local_sgd).
LOCAL_SGD = "local_sgd"
#: save_state writes each rank's shards (torch.distributed.checkpoint), never a full copy.
SHARDED_CHECKPOINT = "sharded_checkpoint"
#: the module's own tensors are not the weights (ZeRO's flat partitions): export and
#: load_model go through get_state_dict / set_state_dict(full=True).
ENGINE_HOLDS_WEIGHTS = "engine_holds_weights"
#: ranks communicate in backward: a rank with one batch fewer leaves the others waiting.
COLLECTIVE_BACKWARD = "collective_backward"
#: reduces gradients over the cp ranks too (accel.context_parallel), summing their parts.
CONTEXT_PARALLEL = "context_parallel"
CAPABILITIES = (KEEPS_PARAMETERS, LOCAL_SGD, SHARDED_CHECKPOINT, ENGINE_HOLDS_WEIGHTS,
                COLLECTIVE_BACKWARD, CONTEXT_PARALLEL)


class Strategy:
    """The backend protocol: what `shard_model` and every transform after it call.

    Subclass it (every method defaults to one plain process: no wrapper, no sync) and
    override what your engine does, or write any class with the same attributes and
    methods. `name` is shown in the Context and in checkpoints; `capabilities` is a
    frozenset of this module's capability constants that the strategy declares.

    >>> class Mine(accel.Strategy):
    ...     name = "mine"
    ...     def wrap_model(self, model, ctx): return my_parallelize(model, ctx.mesh)
    >>> model, ctx = accel.shard_model(model, ctx, strategy=Mine())
    """

    name: ClassVar[str] = "custom"
    capabilities: ClassVar[frozenset[str]] = frozenset()

    @property
    def _engine(self) -> Any:
        """The module whose functions implement the methods (one plain process here)."""
        return _builtin_module("single")

    def wrap_model(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Place and wrap (or shard in place) the model for this engine."""
        return self._engine.wrap_model(model, ctx, self)

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        """The user's module inside the engine's wrapper, with its own parameter names."""
        return self._engine.unwrap_model(model)

    def wrap_optimizer(self, optimizer: Any, ctx: Context) -> Any:
        """Adapt a wrapped optimizer (`AccelOptimizer`) to the engine."""
        return self._engine.wrap_optimizer(optimizer, ctx)

    def set_grad_sync(self, model: nn.Module, enabled: bool) -> None:
        """Whether the backward passes of the forwards that follow synchronise gradients."""
        self._engine.set_grad_sync(model, enabled)

    def backward(self, loss: torch.Tensor, optimizer: Any, **kwargs: Any) -> None:
        """Backpropagate `loss` (already divided for accumulation), scaling it for fp16."""
        self._engine.backward(loss, optimizer, **kwargs)

    def clip_grad_norm(self, model: nn.Module, max_norm: float, norm_type: float) -> torch.Tensor:
        """Clip the gradients of `model` in place; return their total norm across ranks."""
        return self._engine.clip_grad_norm(model, max_norm, norm_type)

    def clip_grad_value(self, model: nn.Module, clip_value: float) -> None:
        """Clamp every gradient element of `model` to [-clip_value, clip_value] in place."""
        self._engine.clip_grad_value(model, clip_value)

    def join(self, model: nn.Module) -> AbstractContextManager[Any]:
        """A block in which ranks that run out of inputs early shadow the others' collectives."""
        return self._engine.join(model)

    def get_state_dict(
        self, model: nn.Module, optimizer: Any, *, full: bool
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The model's and optimizer's state, keyed by the user's own parameter names.

        full=True: unsharded tensors on the CPU, for export; in a world of several
        processes only rank 0 receives them (the others get empty dicts).
        full=False: the engine's native (sharded) form, for torch.distributed.checkpoint.
        The optimizer part is None when `optimizer` is None.
        """
        return self._engine.get_state_dict(model, optimizer, full=full)

    def set_state_dict(self, model: nn.Module, optimizer: Any, model_state: dict[str, Any],
                       optimizer_state: dict[str, Any] | None, *, full: bool) -> None:
        """Load what `get_state_dict` returned (the optimizer part only with `optimizer`).

        full=True: only rank 0's dicts are read and broadcast; other ranks may pass {}.
        """
        self._engine.set_state_dict(model, optimizer, model_state, optimizer_state, full=full)


class BuiltinStrategy(Strategy):
    """Base of accel's own strategy configs: their engine is the module that defines them.

    A subclass defined in ``accel.backends.NAME`` (or a module below it) is the strategy
    NAME; the functions of that module implement its methods (``wrap_model`` receives
    the config as its last argument).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = cls.__module__.split(".")[2]

    #: its options in a config file / `ACCEL_<NAME>_*` variables: `accel.launch_settings.Setting`s
    #: named `<name>_<key>` with `section=<name>`; `accel config` asks their questions.
    settings: ClassVar[tuple[Any, ...]] = ()

    @classmethod
    def from_settings(cls, settings: Any) -> BuiltinStrategy:
        """This strategy with the options `accel launch` / `accel config` set (none here)."""
        return cls()

    @property
    def _engine(self) -> Any:
        # Looked up once per class: the methods run on every training step.
        cls = type(self)
        if "_engine_module" not in cls.__dict__:
            cls._engine_module = _builtin_module(self.name)
        return cls._engine_module


def _builtin_module(name: str) -> Any:
    return sys.modules.get(f"{__name__}.{name}") or importlib.import_module(f"{__name__}.{name}")


@functools.cache
def builtin_names() -> list[str]:
    """The names of accel's engines: the modules of this package not starting with _."""
    return sorted(info.name for info in pkgutil.iter_modules(__path__)
                  if not info.name.startswith("_"))


def strategy_class(name: str) -> type[BuiltinStrategy]:
    """The config class of the built-in strategy `name` ("ddp" -> accel.DDP)."""
    if name not in builtin_names():
        raise IncompatibleOptionsError(
            f"unknown strategy {name!r}; use one of {builtin_names()}, a config object such "
            "as accel.DDP(...), or your own strategy (see accel.Strategy, accel.Custom)"
        )
    return _builtin_module(name).STRATEGY


def strategy_named(name: str) -> Strategy:
    """The built-in strategy `name` ("ddp", "fsdp", ...) with its default options."""
    config = strategy_class(name)
    try:
        return config()
    except TypeError:  # a strategy whose options have no defaults (custom)
        raise IncompatibleOptionsError(
            f"strategy {name!r} needs options: pass accel.{config.__name__}(...) instead of "
            "its name") from None


def default_strategy(ctx: Context) -> Strategy:
    """XLA replicas on an XLA device, DDP over 2+ data-parallel ranks, else single."""
    if ctx.device.type == "xla":
        return strategy_named("xla")
    return strategy_named("ddp" if ctx.dp_size > 1 else "single")


def resolve_strategy(strategy: str | Strategy | None, ctx: Context) -> Strategy:
    """A strategy object from a name, an object implementing `Strategy`, or None."""
    if strategy is None:
        return default_strategy(ctx)
    if isinstance(strategy, str):
        return strategy_named(strategy.lower())
    missing = [name for name in ("name", "capabilities", *_METHODS)
               if not hasattr(strategy, name)]
    if missing:
        raise IncompatibleOptionsError(
            f"{strategy!r} is not a strategy: it lacks {missing}; pass a name ('ddp'), a "
            "config like accel.DDP(), accel.Custom(fn), or subclass accel.Strategy"
        )
    unknown = set(strategy.capabilities) - set(CAPABILITIES)
    if unknown:
        raise IncompatibleOptionsError(
            f"strategy {strategy.name!r} declares unknown capabilities {sorted(unknown)}; "
            f"accel knows {list(CAPABILITIES)}"
        )
    return strategy


_METHODS = ("wrap_model", "unwrap_model", "wrap_optimizer", "set_grad_sync", "backward",
            "clip_grad_norm", "clip_grad_value", "join", "get_state_dict", "set_state_dict")


def engine_of(ctx: Context) -> Strategy:
    """The strategy `shard_model` applied, or the single-process one before it."""
    return ctx.strategy if ctx.strategy is not None else _single()


@functools.cache
def _single() -> Strategy:
    return strategy_named("single")


def has_capability(ctx: Context, capability: str) -> bool:
    """Whether ctx's strategy declares `capability` (one of `CAPABILITIES`)."""
    return capability in engine_of(ctx).capabilities


def collect_engine_cycles_at_exit() -> None:
    """Free engine objects (FSDP2 modules, DeepSpeed engines) while the interpreter is whole.

    They live in reference cycles that hold process groups and gloo's worker threads;
    left to the collector during interpreter shutdown, a run that succeeded aborts or
    segfaults on exit (FSDP2 with plain torch: 4 exits in 50; 0 in 60 with this).
    Registered once, however often it is called.
    """
    atexit.unregister(gc.collect)
    atexit.register(gc.collect)


# The names transforms used before strategies were objects; kept for one release.
backend_for = engine_of
