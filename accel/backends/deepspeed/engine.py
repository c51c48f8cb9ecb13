"""The model and optimizer wrappers between which the DeepSpeed engine is built.

`DeepSpeedModel` is what shard_model returns: the user's module (same parameter names)
whose forward runs through the engine. `DeepSpeedOptimizer` is what wrap_optimizer
returns: an AccelOptimizer whose step is the engine's. The engine itself is built once,
at the model's first forward (or the first call that needs it), when the optimizer,
the accumulation count and the batch size are all known.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from accel.backends._optimizer import AccelOptimizer
from accel.backends.deepspeed.config import (
    Facts,
    engine_config,
    load_user_config,
    micro_batch_pending,
    static_config,
)
from accel.context import Context
from accel.errors import (
    IncompatibleOptionsError,
    MissingDependencyError,
    TransformOrderError,
    UnsupportedError,
)
from accel.validation import check_context, check_type, fail

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
#: user's parameter -> a weak reference to the DeepSpeedModel that holds it, for
#: wrap_optimizer. Weak both ways: the wrapper holds the parameters, and neither is kept
#: alive by this table.
_MODEL_OF: WeakIdKeyDictionary = WeakIdKeyDictionary()


def import_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as exc:
        raise MissingDependencyError("deepspeed", "deepspeed", "the DeepSpeed backend") from exc
    return deepspeed


class DeepSpeedModel(nn.Module):
    """The user's module with a DeepSpeed engine behind its forward.

    It shares the module's parameter, buffer and child tables, so names, `state_dict`
    keys and `parameters()` are the user's own (no ``module.`` prefix). The engine is
    built at the first forward; `build_engine()` builds it earlier when needed.
    """

    def __init__(self, module: nn.Module, ctx: Context, strategy: Any,
                 user_config: dict[str, Any]):
        super().__init__()
        self._parameters = module._parameters
        self._buffers = module._buffers
        self._non_persistent_buffers_set = module._non_persistent_buffers_set
        self._modules = module._modules
        self.training = module.training
        # Plain attributes, not children: a child would put "module." before every name.
        object.__setattr__(self, "module", module)
        object.__setattr__(self, "engine", None)
        self.ctx = ctx
        self.strategy = strategy
        self.user_config = user_config
        #: the DeepSpeedOptimizer that wrap_optimizer linked (None: an inference engine).
        self.optimizer: DeepSpeedOptimizer | None = None
        #: set_grad_sync's switch; False inside accel.no_sync.
        self.grad_sync = True
        self.config: dict[str, Any] | None = None
        #: the engine was built before any forward: its micro-batch size is a stand-in.
        self.batch_size_pending = False

    def extra_repr(self) -> str:
        state = "built" if self.engine is not None else "built at the first forward"
        return f"DeepSpeed ZeRO, engine {state}"

    def train(self, mode: bool = True) -> DeepSpeedModel:
        super().train(mode)
        self.module.training = mode  # the user's top-level flag; the children are shared
        if self.engine is not None:
            self.engine.training = mode
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        engine = self.build_engine(first_batch=(args, kwargs))
        if self.batch_size_pending:
            engine.set_train_micro_batch_size(_batch_size_of((args, kwargs)) or 1)
            self.batch_size_pending = False
        if self.optimizer is not None:
            # Read by the engine's backward (reduce now or not) and its step (update or not).
            engine.set_gradient_accumulation_boundary(
                self.grad_sync and self.optimizer.sync_gradients)
        return engine(*args, **kwargs)

    def build_engine(self, first_batch: Any = None) -> Any:
        """The engine, built now (`deepspeed.initialize`) if it does not exist yet."""
        if self.engine is not None:
            self._check_accumulation_unchanged()
            return self.engine
        deepspeed = import_deepspeed()
        facts = self._facts(first_batch)
        config = engine_config(self.user_config, self.strategy, facts)
        _check_dtype_supported(facts.precision)
        _check_zero_init_params(self.module, config, facts.precision)
        client = self.optimizer.optimizer if self.optimizer is not None else None
        engine, *_ = deepspeed.initialize(model=self.module, optimizer=client, config=config)
        engine.training = self.training
        object.__setattr__(self, "engine", engine)
        self.config = config
        self.batch_size_pending = micro_batch_pending(self.user_config, facts)
        return engine

    def _facts(self, first_batch: Any) -> Facts:
        accumulation = self.optimizer.accumulation if self.optimizer is not None else None
        steps = accumulation.steps if accumulation is not None else 1
        stage = static_config(self.user_config, self.strategy, self.ctx.precision,
                              self.ctx.device.type)["zero_optimization"]["stage"]
        if accumulation is not None and accumulation.sync_each_batch and stage < 2:
            raise IncompatibleOptionsError(
                "accumulate_grads(sync_each_batch=True) under ZeRO-1: ZeRO-1 reduces gradients "
                "once per cycle; stages 2 and 3 reduce every micro-batch anyway. Use "
                "accel.DeepSpeed(stage=2), or drop sync_each_batch"
            )
        loader = accumulation.loader if accumulation is not None else None
        micro = getattr(loader, "batch_size", None)
        return Facts(
            precision=self.ctx.precision, grad_accum_steps=steps,
            world_size=self.ctx.world_size, device_type=self.ctx.device.type,
            micro_batch_size=micro,
            micro_batch_source=f"the loader linked to accumulate_grads (batch_size={micro})",
            micro_batch_guess=_batch_size_of(first_batch),
            grad_scaler=self.optimizer.grad_scaler if self.optimizer is not None else None,
        )

    def _check_accumulation_unchanged(self) -> None:
        accumulation = self.optimizer.accumulation if self.optimizer is not None else None
        steps = accumulation.steps if accumulation is not None else 1
        built = self.engine.gradient_accumulation_steps()
        if steps != built:
            raise TransformOrderError(
                f"accumulate_grads(steps={steps}) came after the DeepSpeed engine was built "
                f"with gradient_accumulation_steps={built} (at the model's first forward or "
                "a state call); apply accumulate_grads before running the model"
            )


class DeepSpeedOptimizer(AccelOptimizer):
    """An AccelOptimizer whose step, zero_grad and state are the DeepSpeed engine's.

    DeepSpeed scales fp16 losses itself (following `grad_scaler`'s settings), so
    `scaler` is None. `state_dict()` gathers the partitioned state into the torch
    optimizer format (a collective: call it on every rank).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: DeepSpeedModel,
                 grad_scaler: Any = None):
        super().__init__(optimizer, scaler=None)
        self.model = model
        self.grad_scaler = grad_scaler
        #: the user's parameters of each group; DeepSpeed replaces them by flat partitions.
        self.group_params = [list(group["params"]) for group in optimizer.param_groups]

    def __repr__(self) -> str:
        return "DeepSpeed" + super().__repr__()

    def engine(self, purpose: str) -> Any:
        """The built engine, or an error saying `purpose` came too early."""
        if self.model.engine is None:
            raise TransformOrderError(
                f"{purpose} before the model's first forward: the DeepSpeed engine is built "
                "there; run the forward pass first"
            )
        return self.model.engine

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.model.engine is not None:
            raise UnsupportedError(
                "DeepSpeed partitions the param groups when it builds the engine (at the "
                "first forward); add every param group before that"
            )
        self.optimizer.add_param_group(param_group)
        self.group_params.append(list(self.optimizer.param_groups[-1]["params"]))

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.accumulation is not None and self.accumulation.micro_step != 0:
            return
        if self.model.engine is None:
            self.optimizer.zero_grad(set_to_none=set_to_none)
        else:
            self.model.engine.optimizer.zero_grad(set_to_none=set_to_none)

    def _apply_step(self, closure: Callable[[], Any] | None) -> Any:
        if closure is not None:
            raise IncompatibleOptionsError(
                "DeepSpeed's step takes no closure (LBFGS-style optimizers cannot run under "
                "ZeRO); use an optimizer that steps without one"
            )
        engine = self.engine("optimizer.step()")
        if not engine.is_gradient_accumulation_boundary():
            raise IncompatibleOptionsError(
                "optimizer.step() after a backward whose forward ran inside accel.no_sync: "
                "DeepSpeed updates only at the end of an accumulation cycle; run the last "
                "micro-batch's forward outside no_sync, or use accel.accumulate_grads"
            )
        engine.step()
        # False after an fp16 overflow: DeepSpeed skipped the update and lowered the scale.
        self.step_was_skipped = not engine.was_step_applied()
        return None

    def state_dict(self) -> dict[str, Any]:
        """The full optimizer state in torch's format (gathered: call on every rank)."""
        from accel.backends.deepspeed.full_state import get_full_optimizer_state

        self.model.build_engine()
        state = get_full_optimizer_state(self, key_of=None)
        if self.accumulation is not None:
            state["accel_accumulation"] = self.accumulation.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a torch-format state (from any backend's optimizer.state_dict())."""
        from accel.backends.deepspeed.full_state import set_full_optimizer_state

        state = dict(state_dict)
        accumulation = state.pop("accel_accumulation", None)
        state.pop("accel_scaler", None)  # DeepSpeed keeps its own loss scale
        self.model.build_engine()
        set_full_optimizer_state(self, state, key_of=None)
        if accumulation is not None and self.accumulation is not None:
            self.accumulation.load_state_dict(accumulation)


def link_optimizer(optimizer: AccelOptimizer) -> DeepSpeedOptimizer:
    """The DeepSpeedOptimizer for the one DeepSpeedModel whose parameters `optimizer` holds."""
    params = [p for group in optimizer.optimizer.param_groups for p in group["params"]]
    models = {id(m): m for m in (_linked_model(p) for p in params) if m is not None}
    if len(models) != 1 or any(_linked_model(p) is None for p in params):
        raise IncompatibleOptionsError(
            "under DeepSpeed an optimizer must hold the parameters of exactly one model that "
            f"shard_model wrapped (this one holds parameters of {len(models)} such models"
            + (" and others)" if any(_linked_model(p) is None for p in params) else ")")
            + "; DeepSpeed builds one engine per model and optimizer: give each model its own"
        )
    (model,) = models.values()
    if model.engine is not None:
        raise TransformOrderError(
            "the DeepSpeed engine of this model was already built without an optimizer (at "
            "its first forward); apply wrap_optimizer before running the model"
        )
    if model.optimizer is not None:
        raise TransformOrderError("this DeepSpeed model already has an optimizer; one per model")
    model.optimizer = DeepSpeedOptimizer(optimizer.optimizer, model, optimizer.scaler)
    return model.optimizer


def wrap(model: nn.Module, ctx: Context, strategy: Any) -> DeepSpeedModel:
    """Check everything known now, and wrap `model`; the engine comes later."""
    import_deepspeed()
    check_world(ctx)
    user = load_user_config(strategy.config)
    static_config(user, strategy, ctx.precision, ctx.device.type)  # errors now, not later
    _check_dtype_supported(ctx.precision)
    if isinstance(model, DeepSpeedModel) or any(_linked_model(p) for p in model.parameters()):
        raise TransformOrderError("this model is already wrapped for DeepSpeed; wrap it once")
    wrapper = DeepSpeedModel(model, ctx, strategy, user)
    link = weakref.ref(wrapper)
    for param in model.parameters():
        _MODEL_OF[param] = link
    return wrapper


def _linked_model(param: torch.Tensor) -> DeepSpeedModel | None:
    link = _MODEL_OF.get(param)
    return link() if link is not None else None


def check_world(ctx: Context) -> None:
    """DeepSpeed needs torch.distributed started, over the whole world, on its accelerator."""
    if not dist.is_available() or not dist.is_initialized():
        raise IncompatibleOptionsError(
            "DeepSpeed needs a started torch.distributed process group, even for one process: "
            "launch with `accel launch -n N script.py` (N >= 2), or start one yourself "
            "(torch.distributed.init_process_group) and use accel.from_process_group()"
        )
    if ctx.group is not None and dist.get_world_size(ctx.group) != dist.get_world_size():
        raise UnsupportedError(
            "DeepSpeed data parallelism spans the whole world; the Context's process group is "
            "a subgroup: use a Context of the default group"
        )
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name != ctx.device.type:
        raise UnsupportedError(
            f"DeepSpeed chose the accelerator {name!r}, but the Context's device is "
            f"{ctx.device}: set DS_ACCELERATOR={ctx.device.type} before starting the process"
        )


def _check_dtype_supported(precision: str) -> None:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = {"fp16": accelerator.is_fp16_supported, "bf16": accelerator.is_bf16_supported}
    if precision in supported and not supported[precision]():
        raise UnsupportedError(
            f"DeepSpeed does not support {precision} on this {accelerator.device_name()} "
            f"(its accelerator reports no {precision} kernels); use "
            + ("bf16" if precision == "fp16" else "fp32 (with_amp dtype='no')")
        )


def _check_zero_init_params(module: nn.Module, config: dict[str, Any], precision: str) -> None:
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return
    stage = config["zero_optimization"]["stage"]
    if stage != 3:
        raise IncompatibleOptionsError(
            f"the model was built under accel.deepspeed_init (ZeRO-3 partitioned parameters), "
            f"but the strategy's stage is {stage}; use accel.DeepSpeed(stage=3)"
        )
    built = partitioned[0].ds_tensor.dtype
    if built != _DTYPES[precision]:
        name = {v: k for k, v in _DTYPES.items()}.get(built, str(built))
        raise IncompatibleOptionsError(
            f"the model was built under deepspeed_init(precision={name!r}), but the Context's "
            f"precision is {precision!r}; pass precision={precision!r} to deepspeed_init"
        )


def _batch_size_of(batch: Any) -> int | None:
    """The leading size of the first tensor in a forward's inputs (None: no tensor)."""
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


#: the dtypes deepspeed_init can store parameters in (with_amp's, less fp8).
_INIT_PRECISIONS = ("no", "bf16", "fp16")


@contextlib.contextmanager
def deepspeed_init(ctx: Context, strategy: Any = None, *,
                   precision: str = "no") -> Iterator[None]:
    """Build a model too large for one rank: parameters are partitioned as they are created.

    DeepSpeed's ZeRO-3 `zero.Init`: each parameter is split across the ranks the moment
    its module is constructed, so no rank ever holds the whole model. Fill it with
    `accel.load_pretrained` (each rank reads its own partitions), or call transformers'
    `from_pretrained` inside the block: accel registers the ZeRO-3 config with
    transformers as its own DeepSpeed integration does (without `accelerate`), and
    transformers loads through rank 0 module by module.

    Args:
        strategy: the accel.DeepSpeed(stage=3, ...) that shard_model will get.
        precision: the dtype parameters are stored in; must match with_amp's ("no",
            "bf16", "fp16"), which is checked when the engine is built.

    >>> with accel.deepspeed_init(ctx, accel.DeepSpeed(stage=3), precision="bf16"):
    ...     model = BigModel()
    ...     llama = LlamaForCausalLM.from_pretrained("llama/", dtype=torch.bfloat16)
    >>> model, ctx = accel.with_amp(model, ctx, dtype="bf16")
    """
    from accel.backends.deepspeed.config import DeepSpeed

    check_context("deepspeed_init", ctx)
    check_type("deepspeed_init", "strategy", strategy, DeepSpeed,
               "an accel.DeepSpeed(stage=3, ...) (or None)", optional=True)
    if not (isinstance(precision, str) and precision in _INIT_PRECISIONS):
        fail("deepspeed_init", "precision", precision,
             f"one of {', '.join(map(repr, _INIT_PRECISIONS))}",
             wrong_type=not isinstance(precision, str))
    strategy = strategy if strategy is not None else DeepSpeed(stage=3)
    deepspeed = import_deepspeed()
    check_world(ctx)
    config = static_config(load_user_config(strategy.config), strategy, precision,
                           ctx.device.type)
    _check_dtype_supported(precision)
    if config["zero_optimization"]["stage"] != 3:
        raise IncompatibleOptionsError(
            "deepspeed_init partitions parameters, which only ZeRO stage 3 does; pass "
            "accel.DeepSpeed(stage=3, ...)"
        )
    # zero.Init parses a whole config, batch size included; only its ZeRO part matters here.
    config.setdefault("train_micro_batch_size_per_gpu", 1)
    # The dtype comes from the config's bf16/fp16 sections: DeepSpeed 0.19 ignores an
    # explicit dtype=torch.float32 on a CPU without fp16 (and picks bf16).
    from accel.backends.deepspeed.hf_zero3 import registered_with_transformers

    # transformers' from_pretrained inside the block sees ZeRO-3 (see hf_zero3); registered
    # first: what it imports must not run under zero.Init's patched tensor constructors.
    with registered_with_transformers(config), deepspeed.zero.Init(config_dict_or_path=config):
        yield
