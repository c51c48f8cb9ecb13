"""torch_xla: the model on an XLA device (TPU, or PJRT's CPU device), as replicas or SPMD.

Replicas (`accel.XLA()`): each process holds the whole model on its XLA device; the
optimizer step averages gradients across replicas and cuts the step's graph, as
`xm.optimizer_step(optimizer, barrier=True)`. SPMD (`accel.XLA(fsdp=True)` or a
`mesh_shape`): one process drives every device of the host through a device mesh;
parameters get sharding annotations and XLA's compiler partitions the computation.

torch_xla is imported here only, inside functions: `import accel` never needs it.
"""

from __future__ import annotations

import math
import os
import runpy
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs
import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from accel.backends import COLLECTIVE_BACKWARD, BuiltinStrategy, single
from accel.backends import _state as state
from accel.backends._optimizer import AccelOptimizer
from accel.context import Context
from accel.errors import IncompatibleOptionsError, InvalidOptionError
from accel.runtime.xla import torch_xla_modules as _torch_xla
from accel.validation import check_bool, check_str, option_validator, shown

# One XLA process has no peers to shadow; multi-process XLA has no Join support.
join = single.join
clip_grad_value = single.clip_grad_value
unwrap_model = single.unwrap_model
# Gradients already averaged across replicas in this step (clip_grad_norm does it first,
# to measure the global norm; the step must not average them twice). Weak, by identity.
_REDUCED: WeakIdKeyDictionary = WeakIdKeyDictionary()
# CPU parameter -> the XLA parameter that replaced it, for `wrap_optimizer` (an optimizer
# built before shard_model); an entry lives while something still holds the CPU one.
_MOVED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _to_optional_tuple(value: Any) -> Any:
    """A list as a tuple (frozen configs hash); anything else as it is, for the validator."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _tuple_of(check: Any, allowed: str) -> Any:
    """An attrs validator: None, or a non-empty tuple each of whose items passes `check`."""
    def validate(instance: Any, attribute: Any, value: Any) -> None:
        if value is None or (isinstance(value, tuple) and value and all(map(check, value))):
            return
        raise InvalidOptionError(
            f"accel.XLA: {attribute.name} must be None or {allowed}, got {shown(value)}")

    return validate


@attrs.frozen
class XLA(BuiltinStrategy):
    """torch_xla: the model on an XLA device (TPU, or PJRT's CPU device in tests).

    Without a mesh, each process holds a replica (one per TPU core under `accel launch
    --xla`) and the optimizer step averages gradients across replicas, as
    `xm.optimizer_step`. With `mesh_shape` or `fsdp`, SPMD: one process drives every
    device of the host through a device mesh; batches from `distribute_loader` are
    sharded along their first (batch) dimension over all mesh axes.

    Args:
        mesh_shape: devices per mesh axis (their product is the device count); default
            with SPMD: all devices on one axis.
        axis_names: one name per mesh axis; default ("fsdp",) for one axis, else
            ("data", "fsdp", ...).
        fsdp: FSDP-style parameter sharding: dim 0 of every parameter is split over the
            mesh axis `fsdp_axis` (parameters whose dim 0 does not divide stay replicated).
        fsdp_axis: the name of the mesh axis parameters are sharded over.

    >>> model, ctx = accel.shard_model(model, ctx, strategy=accel.XLA(fsdp=True))
    """

    capabilities = frozenset({COLLECTIVE_BACKWARD})
    mesh_shape: tuple[int, ...] | None = attrs.field(
        default=None, converter=_to_optional_tuple, validator=_tuple_of(
            lambda size: type(size) is int and size >= 1, "a list of ints >= 1 (devices per axis)"))
    axis_names: tuple[str, ...] | None = attrs.field(
        default=None, converter=_to_optional_tuple, validator=_tuple_of(
            lambda name: isinstance(name, str) and name != "", "a list of axis names (str)"))
    fsdp: bool = attrs.field(default=False, validator=option_validator("XLA", check_bool))
    fsdp_axis: str = attrs.field(default="fsdp", validator=option_validator("XLA", check_str))

    @property
    def spmd(self) -> bool:
        """Whether one process drives all devices through a mesh (SPMD)."""
        return self.fsdp or self.mesh_shape is not None


STRATEGY = XLA


def _spmd() -> Any:
    _torch_xla()
    import torch_xla.distributed.spmd as xs

    return xs


def launch_per_device(target: str, args: list[str], *, module: bool = False) -> int:
    """`accel launch --xla`: run `target` once per local XLA device, through torch_xla.

    One launcher process per host (not torchrun's N per host): torch_xla's `xmp.spawn`
    starts a worker per device (TPU chip; PJRT's CPU device has one), and accel.init() in
    each reads its rank from the XLA runtime. PJRT_DEVICE defaults to TPU. For SPMD
    strategies run one plain process per host instead: `PJRT_DEVICE=TPU python train.py`.
    Returns 0, or 1 when a worker failed.
    """
    os.environ.setdefault("PJRT_DEVICE", "TPU")
    _torch_xla()
    import torch_xla.distributed.xla_multiprocessing as xmp

    try:
        xmp.spawn(_run_target, args=(target, list(args), module))
    except Exception as exc:  # a worker's failure, re-raised here by the process pool
        print(f"accel launch --xla: a worker failed: {exc}", file=sys.stderr)
        return 1
    return 0


def _run_target(index: int, target: str, args: list[str], module: bool) -> None:
    sys.argv = [target, *args]
    try:
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            raise RuntimeError(f"worker {index} exited with {exit_.code}") from None


# --------------------------------------------------------------------------- model


def wrap_model(model: nn.Module, ctx: Context, strategy: Any) -> nn.Module:
    if ctx.device.type != "xla":
        raise IncompatibleOptionsError(
            f"strategy XLA needs an XLA device, but the Context's device is {ctx.device}; "
            "use accel.init(device='xla') (or set PJRT_DEVICE=TPU / CPU)"
        )
    if not strategy.spmd:
        return _to_device(model, ctx.device)
    xr = _torch_xla().runtime
    xr.use_spmd()
    mesh = device_mesh(strategy)
    model = _to_device(model, ctx.device)
    if strategy.fsdp:
        shard_parameters(model, mesh, strategy.fsdp_axis)
    return model


def _to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """Move the model; a CPU parameter moved to XLA is a new object, recorded in _MOVED."""
    before = dict(model.named_parameters())
    model = model.to(device)
    for name, param in model.named_parameters():
        old = before.get(name)
        if old is not None and old is not param:
            _MOVED[old] = param
    return model


def device_mesh(strategy: Any) -> Any:
    """The SPMD device mesh a strategy config describes (all devices of the job)."""
    xs = _spmd()
    count = _torch_xla().runtime.global_runtime_device_count()
    shape = strategy.mesh_shape or (count,)
    names = strategy.axis_names or (("fsdp",) if len(shape) == 1 else
                                    ("data", *(f"fsdp{i or ''}" for i in range(len(shape) - 1))))
    if math.prod(shape) != count:
        raise IncompatibleOptionsError(
            f"mesh_shape {shape} holds {math.prod(shape)} devices but there are {count}; "
            "make the product of mesh_shape the device count"
        )
    if len(names) != len(shape) or (strategy.fsdp and strategy.fsdp_axis not in names):
        raise IncompatibleOptionsError(
            f"axis_names {names} must name each of the {len(shape)} mesh axes and include "
            f"fsdp_axis {strategy.fsdp_axis!r}"
        )
    return xs.Mesh(list(range(count)), shape, names)


def shard_parameters(model: nn.Module, mesh: Any, axis: str) -> None:
    """FSDP-style: split dim 0 of every parameter over mesh axis `axis`, replicate the rest.

    A parameter whose dim 0 does not divide by the axis size stays replicated.
    """
    xs = _spmd()
    size = mesh.shape()[axis]
    for param in model.parameters():
        if param.dim() >= 1 and param.shape[0] % size == 0:
            xs.mark_sharding(param, mesh, (axis, *([None] * (param.dim() - 1))))


def sharding_spec(tensor: torch.Tensor) -> str:
    """The XLA sharding annotation of `tensor` ("" when it has none, i.e. replicated)."""
    return _torch_xla()._XLAC._get_xla_sharding_spec(tensor)


# --------------------------------------------------------------------------- optimizer


class XlaOptimizer(AccelOptimizer):
    """An AccelOptimizer whose step averages gradients across replicas and cuts the graph."""

    def _apply_step(self, closure: Callable[[], Any] | None) -> Any:
        torch_xla = _torch_xla()
        params = _params(self)
        reduce_gradients(params)
        result = super()._apply_step(closure)
        for param in params:
            if param.grad is not None:
                _REDUCED.pop(param.grad, None)
        # Without the cut, every step would append to one ever-growing lazy graph.
        torch_xla.sync()
        return result


def _params(optimizer: AccelOptimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def reduce_gradients(params: Iterable[torch.Tensor]) -> None:
    """Average the gradients of `params` across replicas, each once per step.

    A no-op in one process and under SPMD, where the compiler reduces them itself.
    """
    torch_xla = _torch_xla()
    count = torch_xla.runtime.world_size()
    grads = [p.grad for p in params if p.grad is not None and p.grad not in _REDUCED]
    if count <= 1 or not grads:
        return
    xm = torch_xla.core.xla_model
    xm.all_reduce(xm.REDUCE_SUM, grads, scale=1.0 / count)
    for grad in grads:
        _REDUCED[grad] = True


def wrap_optimizer(optimizer: AccelOptimizer, ctx: Context) -> AccelOptimizer:
    """Point an optimizer built before shard_model at the XLA parameters; step as XLA does."""
    inner = optimizer.optimizer
    for group in inner.param_groups:
        group["params"] = [_MOVED.get(param, param) for param in group["params"]]
    for old in [param for param in inner.state if param in _MOVED]:
        new = _MOVED[old]
        # Scalars (Adam's step count) stay on the CPU, where torch.optim keeps them.
        inner.state[new] = {key: value.to(new.device) if torch.is_tensor(value) and value.dim()
                            else value for key, value in inner.state.pop(old).items()}
    return XlaOptimizer(inner, optimizer.scaler)


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Nothing to switch: gradients are averaged once, at the optimizer step."""


def backward(loss: torch.Tensor, optimizer: Any, **kwargs: Any) -> None:
    single.backward(loss, optimizer, **kwargs)


def clip_grad_norm(model: nn.Module, max_norm: float, norm_type: float) -> torch.Tensor:
    # The norm is the one of the averaged gradients, as under DDP.
    reduce_gradients(model.parameters())
    return single.clip_grad_norm(model, max_norm, norm_type)


# --------------------------------------------------------------------------- data


class _BatchSharding:
    """Shards every tensor of a batch along dim 0 over all mesh axes (duck-types
    torch_xla's ShardingSpec for `send_cpu_data_to_device`: one spec per tensor rank)."""

    minibatch = False

    def __init__(self, mesh: Any):
        self.mesh = mesh
        self.devices = math.prod(mesh.mesh_shape)

    def can_apply(self, tensor: torch.Tensor) -> bool:
        return tensor.dim() >= 1 and tensor.shape[0] % self.devices == 0

    def xla_spec(self, tensor: torch.Tensor) -> Any:
        if not self.can_apply(tensor):
            return None  # replicated: a batch that does not divide (the last one)
        xs = _spmd()
        axes = tuple(self.mesh.axis_names)
        spec = xs.ShardingSpec(self.mesh, (axes if len(axes) > 1 else axes[0],
                                           *([None] * (tensor.dim() - 1))))
        return spec.xla_spec(tensor)


def device_feed(ctx: Context) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """How `distribute_loader` moves a stream of CPU batches to the XLA device.

    Through torch_xla's parallel loader (`MpDeviceLoader`): a background thread uploads
    the next batches while the device computes, and each batch taken cuts the previous
    step's graph. Under SPMD batches are sharded along dim 0 over the mesh.
    """
    strategy = ctx.strategy
    if _torch_xla().runtime.is_spmd() and not getattr(strategy, "spmd", False):
        raise IncompatibleOptionsError(
            "SPMD is on but the Context has no SPMD strategy: apply "
            "shard_model(strategy=accel.XLA(...)) before distribute_loader"
        )
    sharding = _BatchSharding(device_mesh(strategy)) if getattr(strategy, "spmd", False) else None
    device = ctx.device

    def feed(stream: Iterator[Any]) -> Iterator[Any]:
        from torch_xla.distributed.parallel_loader import MpDeviceLoader

        loader = MpDeviceLoader(_Iterable(stream), device, input_sharding=sharding)
        iterator = iter(loader)
        try:
            yield from iterator
        finally:
            iterator._loader.close()  # stop its threads when the epoch is abandoned

    return feed


class _Iterable:
    """A one-pass iterable over an iterator, as ParallelLoader wants (it calls iter once)."""

    def __init__(self, iterator: Iterator[Any]):
        self.iterator = iterator

    def __iter__(self) -> Iterator[Any]:
        return self.iterator


# --------------------------------------------------------------------------- state


def get_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, *, full: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """full=True: CPU tensors (SPMD shards gathered), for the plain save path; False:
    the device tensors as they are (use `save_sharded` for SPMD-sharded ones)."""
    torch_xla = _torch_xla()
    torch_xla.sync()  # materialise pending updates before reading
    model_state, optimizer_state = state.get_state_dict(model, optimizer, full=False)
    if not full:
        return model_state, optimizer_state
    to_cpu = torch_xla.core.xla_model._maybe_convert_to_cpu
    return to_cpu(model_state), None if optimizer_state is None else to_cpu(optimizer_state)


def set_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer | None,
    model_state: dict[str, Any], optimizer_state: dict[str, Any] | None, *, full: bool,
) -> None:
    """Load CPU or device tensors into the model (and optimizer); SPMD shardings are kept."""
    xla_c = _torch_xla()._XLAC
    specs = {name: sharding_spec(p) for name, p in model.named_parameters()}
    shardings = {name: xla_c._get_xla_op_sharding(p) for name, p in model.named_parameters()
                 if specs[name] not in ("", "{replicated}")}
    state.set_state_dict(model, optimizer, model_state, optimizer_state, full=full)
    # Loading copies the values in as replicated tensors: annotate them as they were.
    for name, param in model.named_parameters():
        if name in shardings and sharding_spec(param) != specs[name]:
            xla_c._xla_mark_sharding(param, shardings[name])
    _torch_xla().sync()


def save_sharded(state_dict: dict[str, Any], path: str) -> None:
    """Save SPMD-sharded state as safetensors shards (no pickle), with torch_xla's planner.

    `state_dict` holds tensors (in nested dicts). Each process writes its own files; the
    shapes and offsets live in their headers, which `load_sharded` reads back (torch's
    FileSystemWriter would add a pickled .metadata, which loading would have to unpickle).
    """
    import torch.distributed.checkpoint as dcp

    _torch_xla()
    from torch_xla.experimental.distributed_checkpoint import SPMDSavePlanner

    class OneChunkPerFile(dcp.HuggingFaceStorageWriter):
        # SPMD: one process holds several shards of a tensor, all under its one name; a
        # safetensors file keeps one tensor per name, so each shard goes to a file of
        # its own (file k: every tensor's k-th local shard).
        def _split_by_storage_plan(self, storage_plan: Any, items: list[Any]
                                   ) -> dict[int, list[Any]]:
            files: dict[int, list[Any]] = {}
            seen: dict[str, int] = {}
            for item in items:
                seen[item.index.fqn] = seen.get(item.index.fqn, 0) + 1
                files.setdefault(seen[item.index.fqn], []).append(item)
            return files

    dcp.save(state_dict, storage_writer=OneChunkPerFile(path, save_distributed=True),
             planner=SPMDSavePlanner())


def load_sharded(state_dict: dict[str, Any], path: str) -> None:
    """Load what `save_sharded` wrote into `state_dict` (device tensors, sharded as they
    are) in place; reads the safetensors headers only, never a pickle.

    Raises:
        CheckpointNotFoundError: `path` holds no safetensors shards (nothing
            `save_sharded` wrote; an older save's pickled .metadata is not read).
    """
    import pathlib

    import torch.distributed.checkpoint as dcp

    from accel.errors import CheckpointNotFoundError

    _torch_xla()
    from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner

    if not any(pathlib.Path(path).glob("*.safetensors")):
        raise CheckpointNotFoundError(
            f"{path} holds no safetensors shards written by save_sharded; accel does not "
            "unpickle the .metadata of other torch.distributed.checkpoint folders: save "
            "the state again with this version's save_sharded")
    dcp.load(state_dict, storage_reader=dcp.HuggingFaceStorageReader(path),
             planner=SPMDLoadPlanner())
