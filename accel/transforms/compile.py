"""`compile_model`: torch.compile per repeated block (regional) or of the whole forward.

The compiled code replaces the forward of each block (or of the model) in place, as
`with_amp` does: module and parameter names never change, so `unwrap_model`,
`save_model`, `save_state` and `from_pretrained` exports see no `_orig_mod.`, and the
hooks of the engines (FSDP2's all-gathers, DDP's reducer, accumulate_grads) stay outside
the compiled code, eager, as torchtitan's per-block compile before `fully_shard` has them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from accel.backends._checkpointing import CheckpointedForward
from accel.context import Context
from accel.errors import IncompatibleOptionsError, TransformOrderError, UnsupportedError
from accel.transforms._blocks import BlockSpec, find_blocks
from accel.validation import check_bool, check_context, check_module, fail

#: the keyword arguments compile_model passes on to torch.compile.
COMPILE_OPTIONS = tuple(name for name in inspect.signature(torch.compile).parameters
                        if name != "model")


class CompiledForward:
    """A module's forward run through torch.compile'd code shared by every module whose
    forward is the same function: the blocks of one class compile once.

    `forward` (the eager one) stays reachable: `module.forward = module.forward.forward`
    undoes compile_model.
    """

    def __init__(self, forward: Callable[..., Any], compiled: Callable[..., Any],
                 options: dict[str, Any]):
        functools.update_wrapper(self, forward)  # signature, name, doc: what HF inspects
        self.forward = forward
        self.compiled = compiled
        self.options = options

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        owner, _ = _split(self.forward)
        args = tuple(_unaliased(value) for value in args)
        kwargs = {key: _unaliased(value) for key, value in kwargs.items()}
        with _outside(self.forward):
            return self.compiled(owner, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # torch.compile's wrapper does not pickle; the unpickled forward compiles again.
        return {**self.__dict__, "compiled": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.compiled is None:
            self.compiled = torch.compile(_split(self.forward)[1], **self.options)


def _unaliased(value: Any) -> Any:
    """`value`, copied if it is a view of a tensor subclass.

    tensor_parallel's layers hand on the local tensor of a DTensor (`to_local()`), a view
    of an AsyncCollectiveTensor; AOT autograd replays such an input from its base and
    its gradient then skips DTensor's `to_local` backward, so that the redistribution
    before it gets a plain tensor and fails. A copy (made after the collective's wait)
    is an input of its own. It happens where eager tensor-parallel code feeds a compiled
    block (the first block, after the embedding): one activation copy per step.
    """
    if (isinstance(value, torch.Tensor) and value._base is not None
            and type(value._base) not in (torch.Tensor, nn.Parameter)):
        return value.clone()
    return value


def _split(forward: Callable[..., Any]) -> tuple[Any, Callable[..., Any]]:
    """(the object the forward runs on, the plain function): what is compiled is the
    function, so the blocks of one class share its code and its compiled graphs."""
    if inspect.ismethod(forward):
        return forward.__self__, forward.__func__
    if isinstance(forward, CheckpointedForward):  # its CPU offload stays eager: _outside
        return forward, CheckpointedForward.recompute
    return forward, type(forward).__call__  # with_amp's forward object, or another


def _outside(forward: Callable[..., Any]) -> contextlib.AbstractContextManager[Any]:
    """What runs around the compiled code, eager: checkpoint_activations' CPU offload
    (save_on_cpu's hooks, which dynamo refuses to trace, pack what the compiled
    function saves for backward all the same)."""
    if isinstance(forward, CheckpointedForward):
        return forward.offloading()
    return contextlib.nullcontext()


def compile_model(
    model: nn.Module, ctx: Context, *, regional: bool = True, blocks: BlockSpec = None,
    **compile_kwargs: Any,
) -> tuple[nn.Module, Context]:
    """torch.compile each repeated block of the model (regional) or its whole forward.

    (in place) The forward of each block (regional=True) or of the model becomes a
    `CompiledForward`; names, parameters and hooks do not change. Regional compilation
    compiles the blocks' forward function once and every block runs that code (the
    parameters are inputs of the graph), so a 12-layer model compiles like a 1-layer one.

    Apply it after with_amp, tensor_parallel and checkpoint_activations (it compiles what
    they built) and before shard_model: FSDP2's hooks then stay around each compiled
    block, as torchtitan orders it, and under DDP the compiled code runs inside DDP's
    forward, where torch's DDPOptimizer splits the graphs at DDP's gradient buckets.
    Under tensor_parallel the blocks' DTensor projections and their collectives are
    compiled with them (an input that is a view of a collective's result, as the
    embedding's all-reduced output is, enters as a copy: AOT autograd would replay it
    from its base and lose DTensor's backward). checkpoint_activations' CPU offload
    stays around the compiled code (dynamo does not trace save_on_cpu's hooks).

    Args:
        regional: compile the repeated blocks (default) or the whole forward (False;
            under FSDP2 the graph then breaks at every shard unit's hooks).
        blocks: which modules are the blocks: None for the entries of each nn.ModuleList
            of 2+ modules of one class (transformer layers), a class, a tuple of classes,
            or a function module -> bool.
        **compile_kwargs: passed to torch.compile (backend, mode, dynamic, options,
            fullgraph). Regional compilation defaults to fullgraph=True: a block that
            cannot be one graph raises instead of running partly eager.

    Raises:
        TransformOrderError: applied twice, after shard_model, or to a model that is
            already compiled.
        IncompatibleOptionsError: no blocks found, an unknown compile option, a
            transformers model with config.use_cache=True (each layer's cache index
            would make torch.compile recompile every layer), or tensor_parallel blocks
            under full recomputation (checkpoint_activations' "full" or N: torch 2.13's
            AOT autograd fails on them; "selective" compiles).
        UnsupportedError: an XLA device (its graphs are XLA's own).

    >>> model, ctx = accel.compile_model(model, ctx)                 # per block
    >>> model, ctx = accel.compile_model(model, ctx, regional=False, mode="max-autotune")
    """
    _check_arguments(model, ctx, regional, compile_kwargs)
    _check_recomputed_dtensors(model)
    if regional:
        targets = find_blocks("compile_model", model, blocks)
        _check_cache_off(model)
        options = {"fullgraph": True, **compile_kwargs}
    else:
        if blocks is not None:
            raise IncompatibleOptionsError(
                "accel.compile_model: blocks= names the regions of regional=True; drop it "
                "for regional=False (the whole forward is compiled)")
        targets, options = [model], dict(compile_kwargs)
    compiled: dict[Callable[..., Any], Callable[..., Any]] = {}  # one per forward function
    for module in targets:
        function = _split(module.forward)[1]
        if function not in compiled:
            compiled[function] = torch.compile(function, **options)
        module.forward = CompiledForward(module.forward, compiled[function], options)
    return model, ctx.record(f"compile_model({_describe(targets, regional, options)})")


def _describe(targets: list[nn.Module], regional: bool, options: dict[str, Any]) -> str:
    shown = ", ".join(f"{key}={value!r}" for key, value in options.items())
    if not regional:
        return "whole" + (f", {shown}" if shown else "")
    kinds = sorted({type(module).__name__ for module in targets})
    return f"{len(targets)} x {'/'.join(kinds)}, {shown}"


def _check_arguments(model: Any, ctx: Any, regional: Any, compile_kwargs: dict[str, Any]) -> None:
    check_module("compile_model", "model", model)
    check_context("compile_model", ctx)
    check_bool("compile_model", "regional", regional)
    unknown = sorted(set(compile_kwargs) - set(COMPILE_OPTIONS))
    if unknown:
        fail("compile_model", "each keyword argument", ", ".join(unknown),
             f"a torch.compile option ({', '.join(COMPILE_OPTIONS)})", wrong_type=False)
    if ctx.device.type == "xla":
        raise UnsupportedError(
            "accel.compile_model: torch.compile does not compile for XLA devices (XLA traces "
            "and compiles its own graphs); drop compile_model on XLA")
    if ctx.was_applied("compile_model") or _is_compiled(model):
        raise TransformOrderError(
            "compile_model was already applied to this model (or torch.compile was): apply "
            "it once, to the module itself")
    if ctx.was_applied("shard_model"):
        raise TransformOrderError(
            "compile_model must come before shard_model: FSDP2 shards the compiled blocks "
            "(torchtitan's order) and DDP runs the compiled code inside its forward; "
            "reorder: with_amp, tensor_parallel, checkpoint_activations, compile_model, "
            "shard_model")


def _is_compiled(model: nn.Module) -> bool:
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return True
    return any(isinstance(module.__dict__.get("forward"), CompiledForward)
               or module._compiled_call_impl is not None for module in model.modules())


def _check_recomputed_dtensors(model: nn.Module) -> None:
    """Full recomputation of a block holding DTensor parameters does not compile."""
    for name, module in model.named_modules():
        forward = module.__dict__.get("forward")
        if (isinstance(forward, CheckpointedForward) and not forward.selective
                and any(isinstance(p, DTensor) for p in module.parameters())):
            raise IncompatibleOptionsError(
                f"accel.compile_model: block {name!r} holds tensor_parallel's DTensor "
                "parameters and recomputes its whole forward (checkpoint_activations with "
                "policy 'full' or every N-th block); torch 2.13's AOT autograd cannot "
                "compile that (it saves the DTensors' DeviceMesh for backward as if it were "
                "a tensor and fails at the first step). Use checkpoint_activations(policy="
                "'selective'), which compiles with tensor_parallel, or drop one of the two")


def _check_cache_off(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None) is True:
        raise IncompatibleOptionsError(
            "accel.compile_model: this transformers model has config.use_cache=True: its "
            "forward builds a KV cache, whose entry for each layer makes torch.compile "
            "recompile every block (past 8 layers the limit is hit). Training needs no "
            "cache: set model.config.use_cache = False before compile_model")
