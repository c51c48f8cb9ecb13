"""Bad input to a public function gets an accel error that names the argument.

One table, `CASES`: each public callable with a builder of valid arguments (a one-process
world: `Context()`, small nn.Linear models, a tiny DataLoader) and, per argument, what it
allows. Hypothesis replaces ONE argument at a time by a value the argument does not allow
(wrong type, out of range) and the call must raise an `accel.errors.AccelError` whose
message names the argument: never a raw TypeError / AttributeError from inside torch,
never a silent return. `test_every_public_callable_is_covered` keeps the table complete.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import logging
import math
import os
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy
from torch.profiler import ProfilerActivity
from torch.utils.data import DataLoader

import accel
from accel.backends import builtin_names
from accel.backends._optimizer import AccelOptimizer
from accel.context import Context
from accel.data import DistributedLoader
from accel.errors import AccelError, InvalidArgumentError, InvalidOptionError
from accel.mesh import DIMENSIONS

# --------------------------------------------------------------------------- what is allowed


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def int_in(low: int, high: float = math.inf) -> Callable[[Any], bool]:
    return lambda value: is_int(value) and low <= value <= high


def is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def positive(value: Any) -> bool:
    return is_number(value) and math.isfinite(value) and value > 0


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def optional(allowed: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or allowed(value)


def instance(*types: type) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, types)


def one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and value in choices


def nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def list_of(allowed: Callable[[Any], bool], *, empty: bool = True) -> Callable[[Any], bool]:
    return lambda value: (isinstance(value, (list, tuple)) and (empty or len(value) > 0)
                          and all(allowed(item) for item in value))


def is_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return True
    try:
        return isinstance(value, str) and torch.device(value) is not None
    except RuntimeError:
        return False


def is_timeout(value: Any) -> bool:
    if isinstance(value, datetime.timedelta):
        return value.total_seconds() > 0
    return positive(value) and value < 1e12


def is_seconds(value: Any) -> bool:
    """init(barrier_timeout=...) also reads the text of ACCEL_BARRIER_TIMEOUT: "30"."""
    if isinstance(value, datetime.timedelta):
        return value.total_seconds() > 0
    try:
        return not isinstance(value, bool) and datetime.timedelta(
            seconds=float(value)).total_seconds() > 0
    except (TypeError, ValueError, OverflowError):
        return False


def is_backend(value: Any) -> bool:
    known = {*dist.Backend.backend_list, "xla"} - {"undefined"}
    return isinstance(value, str) and all(
        part.rpartition(":")[2].strip().lower() in known for part in value.split(","))


def is_mesh(value: Any) -> bool:  # a one-process world: every size 1 (or -1, the rest)
    return isinstance(value, Mapping) and len(value) > 0 and all(
        name in DIMENSIONS and is_int(size) and size in (1, -1) for name, size in value.items())


def is_level(value: Any) -> bool:
    if is_int(value):
        return True
    return isinstance(value, str) and (value.strip().isdigit() or isinstance(
        logging.getLevelName(value.strip().upper()), int))


def is_strategy(value: Any) -> bool:
    if isinstance(value, str):
        return value.lower() in builtin_names()
    return all(hasattr(value, name) for name in ("name", "capabilities", "wrap_model"))


def is_scheduler(value: Any) -> bool:
    return callable(getattr(value, "step", None)) and callable(getattr(value, "state_dict", None))


def is_float_dtype(value: Any) -> bool:
    if isinstance(value, torch.dtype):
        return value.is_floating_point
    names = {"fp32", "float32", "float", "fp16", "float16", "half", "bf16", "bfloat16",
             "fp64", "float64"}
    return isinstance(value, str) and value.lower().removeprefix("torch.") in names


def is_memory_map(value: Any) -> bool:
    """max_memory in the shapes these tests can tell apart: {0 / "cpu": bytes}."""
    return isinstance(value, Mapping) and all(
        (k == "cpu" or int_in(0)(k)) and int_in(0)(v) for k, v in value.items())


def is_main_device(value: Any) -> bool:
    return int_in(0)(value) or (is_device(value) and not (isinstance(value, str)
                                                           and value.strip() == "disk"))


def is_device_map_spec(value: Any) -> bool:
    return (isinstance(value, Mapping) or int_in(0)(value) or is_device(value)
            or value in ("auto", "balanced", "sequential", "disk"))


def is_shard_units(value: Any) -> bool:
    def module_class(item: Any) -> bool:
        return isinstance(item, type) and issubclass(item, nn.Module)
    return (value is None or int_in(1)(value) or module_class(value)
            or (callable(value) and not isinstance(value, type))
            or (isinstance(value, (list, tuple, set, frozenset)) and len(value) > 0
                and all(module_class(item) for item in value)))


def is_trackers(value: Any) -> bool:
    return list_of(lambda item: item in ("jsonl", "tensorboard", "mlflow", "wandb")
                   or all(hasattr(item, a) for a in ("name", "start", "log", "finish")))(value)


def is_tracker_options(value: Any) -> bool:
    return isinstance(value, Mapping) and all(
        key in ("jsonl", "tensorboard", "mlflow", "wandb") and isinstance(opts, Mapping)
        for key, opts in value.items())


CTX = instance(Context)
MODULE = instance(nn.Module)
PATH = instance(str, os.PathLike)
MAPPING = instance(Mapping)
def class_names(value: Any) -> bool:
    return isinstance(value, (list, tuple, set, frozenset)) and all(
        isinstance(name, str) for name in value)


CLASS_NAMES = class_names


def fn_or_ctx(value: Any) -> bool:
    """What the decorators on_main_process & co. take: a function, or the Context to bind."""
    return callable(value) or isinstance(value, Context)


FN_OR_CTX = fn_or_ctx


def is_splittable(value: Any) -> bool:
    """split_between_processes: a sequence, or a dict of sequences of one length."""
    kinds = (list, tuple, torch.Tensor, np.ndarray)
    if isinstance(value, kinds):
        return True
    return isinstance(value, Mapping) and all(isinstance(v, kinds) for v in value.values()) \
        and len({len(v) for v in value.values()}) <= 1


def is_shard_size(value: Any) -> bool:
    """save_model's max_shard_size: bytes > 0 or a size with a unit."""
    if isinstance(value, str):
        return re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value) is not None
    return int_in(1)(value)
RANKS = one_of("data", "all")

# --------------------------------------------------------------------------- valid arguments

#: a folder for the files valid calls read or write; set by the `workdir` fixture.
WORK: Path = Path()


@pytest.fixture(scope="module", autouse=True)
def workdir(tmp_path_factory):
    global WORK
    WORK = tmp_path_factory.mktemp("bad_input")
    model = nn.Linear(2, 2)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              WORK / "model.safetensors")
    with accel.init_trackers(Context(), ["jsonl"], WORK, run_name="run") as trackers:
        trackers.log({"loss": 1.0}, step=0)
        trackers.log({"loss": 0.5}, step=1)
    return WORK


def linear() -> nn.Module:
    return nn.Linear(2, 2)


def loader() -> DataLoader:
    return DataLoader(range(8), batch_size=2)


def distributed_loader() -> DistributedLoader:
    return accel.distribute_loader(loader(), Context())[0]


def wrapped(model: nn.Module | None = None) -> AccelOptimizer:
    params = (model or linear()).parameters()
    return accel.wrap_optimizer(torch.optim.SGD(params, lr=0.1), Context())[0]


def blocks() -> nn.Module:
    """A model with repeated blocks (an nn.ModuleList of two Linears)."""
    return nn.Sequential(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]))


def is_block_spec(value: Any) -> bool:
    """compile_model's and checkpoint_activations' blocks: module classes or a function."""
    classes = value if isinstance(value, tuple) else (value,)
    if classes and all(isinstance(cls, type) and issubclass(cls, nn.Module) for cls in classes):
        return True
    return callable(value) and not isinstance(value, (type, nn.Module))


def prepared() -> dict[str, Any]:
    """A model and its wrapped optimizer, as accumulate_grads takes them."""
    model = linear()
    return dict(model=model, optimizer=wrapped(model), ctx=Context())


def saved_state() -> Path:
    """A checkpoint of linear() that load_state reads (written once)."""
    path = WORK / "state"
    if not path.exists():
        accel.save_state(path, Context(), model=linear(), rng=False)
    return path


def deepspeed_init(**kwargs: Any) -> None:
    """accel.deepspeed_init, entered; importing deepspeed sets PYTORCH_NVML_BASED_CUDA_CHECK."""
    env = dict(os.environ)
    try:
        with accel.deepspeed_init(**kwargs):
            pass
    finally:
        os.environ.clear()
        os.environ.update(env)


def backward_arguments() -> dict[str, Any]:
    model = linear()
    return dict(loss=model(torch.ones(1, 2)).sum(), optimizer=wrapped(model), ctx=Context())


def scheduler_arguments() -> dict[str, Any]:
    optimizer = wrapped()
    return dict(scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1), ctx=Context(),
                optimizer=optimizer)


# --------------------------------------------------------------------------- the table


@dataclasses.dataclass
class Case:
    """One public callable: fresh valid keyword arguments, and what each argument allows."""

    name: str
    valid: Callable[[], dict[str, Any]]
    allowed: dict[str, Callable[[Any], bool]]
    #: how to call it with the keywords; default accel.<name>(**kwargs)
    call: Callable[..., Any] | None = None
    #: the error the valid call raises in a one-process world (no process group, no tp)
    valid_raises: type[Exception] | tuple[type[Exception], ...] | None = None

    def __call__(self, kwargs: dict[str, Any]) -> Any:
        result = (self.call or getattr(accel, self.name))(**kwargs)
        # checked on entry, like `with` (a Path is a deprecated no-op context manager)
        if isinstance(result, AbstractContextManager) and not isinstance(result, Path):
            with result:
                pass
        return result


def ctx_only(name: str, **more: Any) -> Case:
    """A collective or helper of (data, ctx, ...) whose data is any tensor."""
    return Case(name, lambda: dict(data=torch.ones(3), ctx=Context()), {"ctx": CTX, **more})


PLACEMENT = {"model": MODULE, "max_memory": optional(is_memory_map),
             "no_split_module_classes": optional(CLASS_NAMES), "dtype": optional(is_float_dtype),
             "balanced": is_bool, "ctx": optional(CTX), "prefetch": int_in(0)}
DISPATCH = {"offload_dir": optional(PATH), "main_device": optional(is_main_device),
            "prefetch": int_in(0), "no_split_module_classes": optional(CLASS_NAMES),
            "release_after_use": optional(is_bool)}

CASES = [
    # core
    Case("shutdown", lambda: dict(ctx=Context()), {"ctx": CTX}),
    Case("detect_world", lambda: dict(env={}), {"env": MAPPING}),
    Case("wait_for_everyone", lambda: dict(ctx=Context()), {
        "ctx": CTX, "timeout": optional(is_timeout)}),
    Case("main_process_first", lambda: dict(ctx=Context()), {"ctx": CTX}),
    Case("local_main_process_first", lambda: dict(ctx=Context()), {"ctx": CTX}),
    *[Case(name, lambda: dict(fn_or_ctx=Context()), {"fn_or_ctx": FN_OR_CTX})
      for name in ("on_main_process", "on_local_main_process", "on_last_process")],
    Case("on_process", lambda: dict(index=0, ctx=Context()), {
        "index": int_in(0), "ctx": optional(CTX)}),
    Case("split_between_processes", lambda: dict(data=[1, 2], ctx=Context()), {
        "data": is_splittable, "ctx": CTX, "apply_padding": is_bool}),
    Case("print", lambda: dict(ctx=Context(), file=io.StringIO()), {
        "ctx": CTX, "per_node": is_bool}),
    # flag takes anything `if` takes; only a tensor of several elements is drawn rarely
    Case("any_rank", lambda: dict(flag=True, ctx=Context()), {"ctx": CTX}),
    Case("all_ranks", lambda: dict(flag=True, ctx=Context()), {"ctx": CTX}),
    Case("init", lambda: dict(env={}), {
        "device": optional(is_device), "dist_backend": optional(is_backend),
        "timeout": is_timeout, "seed": optional(int_in(0, 2**64 - 1)),
        "debug": optional(is_bool), "env": optional(MAPPING), "mesh": optional(is_mesh),
        "barrier_timeout": optional(is_seconds)}),
    Case("from_process_group", lambda: dict(env={}), {
        "group": optional(instance(dist.ProcessGroup)), "device": optional(is_device),
        "env": optional(MAPPING), "mesh": optional(instance(DeviceMesh))},
        valid_raises=accel.errors.LaunchEnvironmentError),
    ctx_only("gather", ranks=RANKS),
    Case("gather_object", lambda: dict(obj=[1], ctx=Context()), {"ctx": CTX, "ranks": RANKS}),
    ctx_only("reduce", op=one_of("mean", "sum", "max", "min"), ranks=RANKS),
    ctx_only("broadcast", src=int_in(0, 0)),
    Case("broadcast_object", lambda: dict(obj=1, ctx=Context()), {"ctx": CTX, "src": int_in(0, 0)}),
    ctx_only("pad_across_processes", dim=int_in(-1, 0), pad_first=is_bool, ranks=RANKS),
    Case("send_to_device", lambda: dict(data=torch.ones(2), device="cpu"), {
        "device": lambda v: int_in(0)(v) or is_device(v), "non_blocking": optional(is_bool)}),
    Case("concatenate", lambda: dict(structures=[torch.ones(2), torch.ones(1)]), {
        "structures": instance(list, tuple), "dim": int_in(-1, 0)}),
    Case("set_seed", lambda: dict(seed=1), {
        "seed": int_in(0, 2**64 - 1), "ctx": optional(CTX), "deterministic": is_bool,
        "per_rank": is_bool}),
    Case("synchronize_rng_states", lambda: dict(ctx=Context()), {
        "ctx": CTX, "src": int_in(0, 0), "generator": optional(instance(torch.Generator)),
        "python": is_bool, "numpy": is_bool}),
    Case("get_logger", lambda: dict(name="accel.test_bad_input", ctx=Context()), {
        "name": instance(str), "ctx": CTX, "level": optional(is_level)}),
    Case("find_executable_batch_size", lambda: dict(fn=lambda batch_size: batch_size), {
        "fn": optional(callable), "starting_batch_size": int_in(1), "ctx": optional(CTX),
        "factor": lambda v: is_number(v) and 0 < v < 1}),
    Case("clear_device_cache", dict, {"garbage_collection": is_bool}),
    Case("is_out_of_memory", lambda: dict(error=RuntimeError("x")), {
        "error": instance(BaseException)}),
    Case("notebook_launch", lambda: dict(fn=int, num_processes=1), {
        "fn": callable, "args": instance(list, tuple), "num_processes": optional(int_in(1)),
        "timeout": optional(is_timeout)}),
    Case("profile_steps", lambda: dict(ctx=Context(), out_dir=WORK / "traces"), {
        "ctx": CTX, "out_dir": PATH, "wait": int_in(0), "warmup": int_in(0),
        "active": int_in(1), "repeat": int_in(0),
        "activities": optional(lambda v: isinstance(v, (list, tuple, set, frozenset)) and len(
            v) > 0 and all(isinstance(a, ProfilerActivity) for a in v)),
        "record_shapes": is_bool, "profile_memory": is_bool, "with_stack": is_bool,
        "trace_format": one_of("chrome", "tensorboard")}),
    # strategy configs
    Case("DDP", dict, {
        "find_unused_parameters": is_bool, "static_graph": is_bool,
        "bucket_cap_mb": optional(positive), "gradient_as_bucket_view": is_bool,
        "sync_buffers": is_bool,
        "comm_hook": lambda v: v is None or callable(v) or one_of("fp16", "bf16", "powersgd")(v)}),
    Case("FSDP", dict, {
        "shard_units": is_shard_units,
        "reshard_after_forward": lambda v: v is None or is_bool(v) or int_in(1)(v),
        "mixed_precision": optional(instance(MixedPrecisionPolicy)),
        "cpu_offload": instance(bool, OffloadPolicy), "activation_checkpointing": is_bool,
        "replicate_degree": optional(int_in(1)), "mesh": optional(instance(DeviceMesh)),
        "init_fn": optional(callable), "keep_meta": is_bool}),
    Case("DeepSpeed", dict, {
        "stage": optional(int_in(1, 3)), "offload_optimizer": optional(is_bool),
        "offload_params": optional(is_bool),
        "config": optional(instance(Mapping, str, os.PathLike))}),
    Case("XLA", dict, {
        "mesh_shape": optional(list_of(int_in(1), empty=False)),
        "axis_names": optional(list_of(nonempty_str, empty=False)), "fsdp": is_bool,
        "fsdp_axis": nonempty_str}),
    Case("Custom", lambda: dict(parallelize_fn=lambda model, ctx: model), {
        "parallelize_fn": callable}),
    # transforms
    Case("with_amp", lambda: dict(model=linear(), ctx=Context(), dtype="bf16"), {
        "model": MODULE, "ctx": CTX, "dtype": optional(one_of("no", "bf16", "fp16", "fp8")),
        "fp32_outputs": is_bool, "params": one_of("fp32", "bf16"),
        # fp8's options under dtype="bf16", master weights of fp32 parameters: refused
        "recipe": lambda v: v is None, "module_filter": lambda v: v is None,
        "master_weights": lambda v: v is False}),
    Case("compile_model", lambda: dict(model=blocks(), ctx=Context()), {
        "model": MODULE, "ctx": CTX, "regional": is_bool, "blocks": optional(is_block_spec)}),
    Case("checkpoint_activations", lambda: dict(model=blocks(), ctx=Context()), {
        "model": MODULE, "ctx": CTX, "offload": is_bool, "blocks": optional(is_block_spec),
        "policy": lambda v: v in ("full", "selective") or (is_int(v) and v >= 1)}),
    Case("shard_model", lambda: dict(model=linear(), ctx=Context()), {
        "model": MODULE, "ctx": CTX, "strategy": optional(is_strategy)}),
    Case("unwrap_model", lambda: dict(model=linear(), ctx=Context()), {
        "model": MODULE, "ctx": CTX}),
    Case("tensor_parallel", lambda: dict(model=linear(), ctx=Context()), {
        "model": MODULE, "ctx": CTX,
        "plan": lambda v: isinstance(v, Mapping) or (isinstance(v, str) and v == "auto"),
        "sequence_parallel": is_bool, "loss_parallel": is_bool},
        valid_raises=accel.errors.IncompatibleOptionsError),  # no tp dimension in one process
    Case("loss_parallel", lambda: dict(ctx=Context()), {"ctx": CTX}),
    Case("context_parallel", lambda: dict(model=linear(), ctx=Context()), {
        "model": MODULE, "ctx": CTX},
        valid_raises=accel.errors.IncompatibleOptionsError),  # no cp dimension in one process
    Case("pipeline_parallel", lambda: dict(model=blocks(), ctx=Context(), microbatches=2,
                                           loss_fn=nn.functional.mse_loss), {
        "model": MODULE, "ctx": CTX,
        "split_points": lambda v: v == "auto" or list_of(lambda p: isinstance(p, str))(v),
        "schedule": one_of("gpipe", "1f1b", "interleaved1f1b"), "microbatches": int_in(1),
        "loss_fn": callable, "stages_per_rank": int_in(1)},
        valid_raises=accel.errors.IncompatibleOptionsError),  # no pp dimension in one process
    Case("wrap_optimizer", lambda: dict(optimizer=torch.optim.SGD(linear().parameters(), lr=0.1),
                                        ctx=Context()), {
        "optimizer": instance(torch.optim.Optimizer), "ctx": CTX,
        "scaler": optional(instance(torch.amp.GradScaler))}),
    Case("wrap_scheduler", scheduler_arguments, {
        "scheduler": is_scheduler, "ctx": CTX, "optimizer": instance(AccelOptimizer)}),
    Case("backward", backward_arguments, {
        "loss": instance(torch.Tensor), "optimizer": instance(AccelOptimizer), "ctx": CTX}),
    Case("clip_grad_norm", lambda: dict(model=linear(), ctx=Context(), max_norm=1.0), {
        "model": MODULE, "ctx": CTX,
        "max_norm": lambda v: is_number(v) and not math.isnan(v) and v > 0,  # inf: no clip
        "norm_type": lambda v: is_number(v) and not math.isnan(v) and v > 0,
        "optimizer": optional(instance(AccelOptimizer))}),
    Case("clip_grad_value", lambda: dict(model=linear(), ctx=Context(), clip_value=1.0), {
        "model": MODULE, "ctx": CTX,
        "clip_value": lambda v: is_number(v) and not math.isnan(v) and v > 0,
        "optimizer": optional(instance(AccelOptimizer))}),
    Case("local_sgd", lambda: dict(model=linear(), ctx=Context(), sync_every=2), {
        "model": MODULE, "ctx": CTX, "sync_every": int_in(1)}),
    Case("accumulate_grads", lambda: dict(prepared(), steps=2), {
        "model": MODULE, "optimizer": instance(AccelOptimizer), "ctx": CTX,
        "steps": optional(int_in(1)), "loader": optional(instance(DistributedLoader)),
        "sync_each_batch": is_bool}),
    Case("no_sync", lambda: dict(model=linear(), ctx=Context()), {"model": MODULE, "ctx": CTX}),
    Case("join_uneven_inputs", lambda: dict(model=linear(), ctx=Context()), {
        "model": MODULE, "ctx": CTX, "loader": optional(instance(DistributedLoader))}),
    # compose(*transforms): the second of the pipeline's transforms replaced
    Case("compose", lambda: dict(transforms=accel.shard_model), {"transforms": callable},
         call=lambda transforms: accel.compose(accel.with_amp, transforms)),
    Case("training_settings", dict, {"env": optional(MAPPING)}),
    Case("deepspeed_init", lambda: dict(ctx=Context()), {
        "ctx": CTX, "strategy": optional(instance(accel.DeepSpeed)),
        "precision": one_of("no", "bf16", "fp16")},
        # no process group in one process (or no deepspeed installed)
        call=deepspeed_init,
        valid_raises=(accel.errors.IncompatibleOptionsError, accel.errors.MissingDependencyError)),
    # checkpoints
    Case("CheckpointFolder", lambda: dict(root=WORK / "folder"), {
        "root": PATH, "total_limit": optional(int_in(1)),
        "prefix": lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_.-]*", v) is not None
        and ".tmp-" not in v}),
    Case("save_state", lambda: dict(path=WORK / "saved", ctx=Context(), model=linear(),
                                    rng=False), {
        "path": instance(str, os.PathLike, accel.CheckpointFolder), "ctx": CTX, "model": MODULE,
        "rng": is_bool, "step": optional(int_in(0))}),
    Case("load_state", lambda: dict(path=saved_state(), ctx=Context(), model=linear(),
                                    rng=False), {
        "path": instance(str, os.PathLike, accel.CheckpointFolder), "ctx": CTX, "model": MODULE,
        "rng": is_bool, "verify": is_bool}),
    Case("save_model", lambda: dict(model=linear(), directory=WORK / "export", ctx=Context()), {
        "model": MODULE, "directory": PATH, "ctx": CTX, "max_shard_size": is_shard_size}),
    Case("load_model", lambda: dict(model=linear(), path=WORK / "model.safetensors",
                                    ctx=Context()), {
        "model": MODULE, "path": PATH, "ctx": CTX, "strict": is_bool}),
    Case("load_pretrained", lambda: dict(model=linear(), ctx=Context(),
                                         path=WORK / "model.safetensors"), {
        "model": MODULE, "ctx": CTX, "path": PATH, "dtype": optional(is_float_dtype)}),
    # data
    Case("distribute_loader", lambda: dict(loader=loader(), ctx=Context()), {
        "loader": instance(DataLoader), "ctx": CTX, "split_batches": is_bool,
        "even_batches": is_bool, "dispatch_batches": is_bool, "device_placement": is_bool,
        "seed": optional(int_in(0)), "non_blocking": optional(is_bool)}),
    Case("skip_first_batches", lambda: dict(loader=loader(), num_batches=1), {
        "loader": instance(DataLoader, DistributedLoader), "num_batches": int_in(0)}),
    Case("gather_for_metrics", lambda: dict(data=torch.ones(2), ctx=Context(),
                                            loader=distributed_loader()), {
        "ctx": CTX, "loader": instance(DistributedLoader)}),
    # inference
    Case("check_device_map", lambda: dict(model=linear(), device_map={"": "cpu"}), {
        "model": MODULE, "device_map": MAPPING}),
    Case("compute_module_sizes", lambda: dict(model=linear()), {
        "model": MODULE, "dtype": optional(is_float_dtype)}),
    Case("dispatch_model", lambda: dict(model=linear(), device_map={"": "cpu"}), {
        "model": MODULE, "device_map": MAPPING, **DISPATCH}),
    Case("dispatch_stats", lambda: dict(model=linear()), {"model": MODULE},
         valid_raises=accel.errors.TransformOrderError),  # not dispatched
    Case("remove_dispatch", lambda: dict(model=linear()), {"model": MODULE},
         valid_raises=accel.errors.TransformOrderError),
    Case("estimate_memory", lambda: dict(model=linear()), {
        # a str names a factory to import or a config.json: not drawn at random
        "model": lambda v: isinstance(v, (nn.Module, str, os.PathLike)) or callable(v),
        "dtypes": list_of(one_of("float32", "float16", "bfloat16", "int8", "int4"),
                          empty=False),
        "no_split_module_classes": optional(CLASS_NAMES)}),
    Case("infer_device_map", lambda: dict(model=linear(), max_memory={"cpu": 10**6}),
         PLACEMENT),
    Case("explain_device_map", lambda: dict(model=linear(), max_memory={"cpu": 10**6}),
         PLACEMENT),
    Case("init_empty_weights", dict, {"include_buffers": is_bool}),
    Case("init_on_device", lambda: dict(device="cpu"), {
        "device": is_device, "include_buffers": is_bool}),
    Case("load_checkpoint_and_dispatch", lambda: dict(
        model=linear(), checkpoint=WORK / "model.safetensors", device_map="cpu"), {
        **{k: v for k, v in PLACEMENT.items() if k != "balanced"}, **DISPATCH,
        "checkpoint": PATH, "device_map": is_device_map_spec, "strict": is_bool}),
    # tracking
    Case("init_trackers", lambda: dict(ctx=Context(), project_dir=WORK / "runs",
                                       run_name=uuid.uuid4().hex), {
        "ctx": CTX, "trackers": is_trackers, "project_dir": PATH, "config": optional(MAPPING),
        "run_name": optional(nonempty_str), "options": optional(is_tracker_options)}),
    Case("progress", lambda: dict(iterable=range(3), ctx=Context(), disable=True), {
        "iterable": instance(Iterable), "ctx": CTX, "per_node": is_bool}),
    Case("plot_metrics", lambda: dict(run_dir=WORK / "run", out=WORK / "plots"), {
        "run_dir": PATH, "out": optional(PATH),
        "metrics": optional(list_of(lambda e: isinstance(e, str) or list_of(instance(str))(e),
                                    empty=False))}),
]

#: public names with no row above, and why. Anything else public must have one, so a new
#: public function cannot ship without argument checks.
EXEMPT = {
    # classes: records and handles that accel's functions build and return, or protocols
    "Context", "World", "Strategy", "AccelOptimizer", "AccelScheduler", "DistributedLoader",
    "LocalSGD", "Tracker", "Trackers", "TrainingSettings",
    "Single",  # a strategy config with no options: nothing to pass wrong
    "release_memory",  # takes any objects, by design
    "errors",  # a module
    "CheckpointInfo",  # the record load_state returns
    "Pipeline",  # the handle pipeline_parallel returns
}

BY_NAME = {case.name: case for case in CASES}
PAIRS = [(case, name) for case in CASES for name in case.allowed]

#: values of every kind; each test keeps those its argument does not allow.
ANYTHING = st.one_of(
    st.text(max_size=8), st.floats(), st.integers(min_value=-5), st.none(), st.booleans(),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(),
                                                         max_size=2),
    st.sampled_from([object(), b"bytes", 1j, torch.ones(2), nn.Linear(1, 1), Context(), (),
                     frozenset(), datetime.timedelta(seconds=-1), Path("nowhere")]),
)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_the_valid_arguments_are_valid(case):
    """The baseline each bad value changes one argument of (else the errors prove nothing)."""
    if case.valid_raises is None:
        case(case.valid())
    else:
        with pytest.raises(case.valid_raises):
            case(case.valid())


@pytest.mark.parametrize(("case", "argument"), PAIRS,
                         ids=[f"{case.name}-{name}" for case, name in PAIRS])
@settings(max_examples=20, deadline=None, database=None,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(data=st.data())
def test_a_wrong_argument_gets_an_accel_error_naming_it(case, argument, data):
    allowed = case.allowed[argument]
    value = data.draw(ANYTHING.filter(lambda v: not allowed(v)), label=argument)
    kwargs = case.valid()
    kwargs[argument] = value
    # Any other exception escapes and fails the test; so does a call that returns.
    with pytest.raises(AccelError) as raised:
        case(kwargs)
    assert re.search(rf"\b{argument}\b", str(raised.value)), (
        f"accel.{case.name}({argument}={value!r}) raised {raised.value!r}, "
        f"which does not name {argument!r}")


def test_every_public_callable_is_covered():
    covered = {case.name for case in CASES}
    assert covered.isdisjoint(EXEMPT)
    assert covered | EXEMPT == set(accel.__all__), (
        f"public names without a row in CASES or EXEMPT: "
        f"{sorted(set(accel.__all__) - covered - EXEMPT)}; no longer public: "
        f"{sorted((covered | EXEMPT) - set(accel.__all__))}")


def test_the_issues_examples():
    ctx, model = Context(), nn.Linear(2, 2)
    with pytest.raises(InvalidArgumentError, match=r"accel.init: seed must be an int .* 'abc'"):
        accel.init(seed="abc", env={})
    with pytest.raises(InvalidArgumentError, match="accel.shard_model: ctx must be an accel"):
        accel.shard_model(model, None)
    with pytest.raises(InvalidArgumentError,
                       match=r"accel.wrap_optimizer: optimizer must be a torch.optim.Optimizer"
                             r".*got str 'sgd'"):
        accel.wrap_optimizer("sgd", ctx)
    # Also an IncompatibleOptionsError, as shard_model raised for bad options before.
    with pytest.raises(InvalidOptionError, match="reshard_after_forward must be.*'yes'"):
        accel.FSDP(reshard_after_forward="yes")
    for max_norm in (-1, 0, float("nan")):
        with pytest.raises(InvalidArgumentError,
                           match="accel.clip_grad_norm: max_norm must be a number > 0"):
            accel.clip_grad_norm(model, ctx, max_norm)
    # inf clips nothing and measures the norm: the common idiom stays allowed
    accel.clip_grad_norm(model, ctx, float("inf"))


def test_wrong_types_are_type_errors_and_wrong_values_value_errors():
    """Code that caught TypeError / ValueError around these calls still catches them."""
    with pytest.raises(TypeError):
        accel.wrap_optimizer("sgd", Context())
    with pytest.raises(ValueError):
        accel.clip_grad_norm(nn.Linear(2, 2), Context(), -1)
