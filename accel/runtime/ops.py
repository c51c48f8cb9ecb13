"""Collectives on nested data: gather, reduce, broadcast, pad, and moving data to a device.

Every function takes a tensor or any nesting of lists, tuples, namedtuples and mappings of
tensors, and returns the same structure. Leaves that are not tensors pass through
unchanged. Collectives of data (gather, gather_object, reduce, pad_across_processes)
run across the data-parallel ranks (`ctx.dp_group`: on a mesh with tp, cp or pp their
peers hold the same data; `ranks="all"` takes every rank instead); broadcast runs on
`ctx.group`. All run on the device the
group's backend needs (CPU for gloo, CUDA for nccl); results come back on the device
the input was on. With `ctx.debug`, each collective first checks that every rank passes
the same shapes and dtypes, and raises `CollectiveMismatchError` on every rank instead
of hanging. Without it nothing compares shapes: a mismatch can give a rank wrong data
before a transfer of the wrong size fails (or aborts) another rank; a collective that
fails raises `CollectiveFailedError`, which says so.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from accel.context import Context
from accel.errors import (
    InvalidArgumentError,
    NotConnectedError,
    UnsupportedError,
)
from accel.runtime.diagnosis import debug_check, explained
from accel.validation import check_bool, check_context, check_device, check_int, check_type
from accel.world import World

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM,
               "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
# Device types each torch.distributed backend can communicate; backends not listed
# (fake, xla, mpi, ucc, custom) take tensors where they are.
_BACKEND_DEVICES = {"gloo": ("cpu",), "nccl": ("cuda",), "xla": ("xla",)}


# --------------------------------------------------------------------------- structure


def recursively_apply(fn: Callable[[torch.Tensor], Any], data: Any) -> Any:
    """Apply `fn` to every tensor in nested lists/tuples/namedtuples/mappings; keep the rest.

    Container types are kept (a namedtuple stays that namedtuple, an OrderedDict stays
    ordered, a defaultdict keeps its factory); a mapping type that cannot be rebuilt from
    a dict becomes a plain dict.

    >>> recursively_apply(lambda t: t * 2, {"x": torch.ones(2), "name": "a"})
    {'x': tensor([2., 2.]), 'name': 'a'}
    """
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, Mapping):
        return _rebuild_mapping(data, {k: recursively_apply(fn, v) for k, v in data.items()})
    if isinstance(data, (list, tuple)):
        return _rebuild_sequence(data, [recursively_apply(fn, v) for v in data])
    return data


def _rebuild_sequence(original: list | tuple, items: list) -> list | tuple:
    if isinstance(original, tuple) and hasattr(original, "_fields"):  # namedtuple
        return type(original)(*items)
    return type(original)(items)


def _rebuild_mapping(original: Mapping, items: dict) -> Mapping:
    if isinstance(original, defaultdict):
        return type(original)(original.default_factory, items)
    try:
        return type(original)(items)
    except TypeError:  # a Mapping whose constructor does not take a dict
        return items


def _leaves(data: Any, path: str = "data") -> list[tuple[str, torch.Tensor]]:
    """Every tensor in `data` with its path, e.g. ("data['x'][1]", tensor), in a fixed order."""
    if isinstance(data, torch.Tensor):
        return [(path, data)]
    if isinstance(data, Mapping):
        return [leaf for k, v in data.items() for leaf in _leaves(v, f"{path}[{k!r}]")]
    if isinstance(data, (list, tuple)):
        return [leaf for i, v in enumerate(data) for leaf in _leaves(v, f"{path}[{i}]")]
    return []


# --------------------------------------------------------------------------- plumbing


#: what the `ranks` option of the data collectives means.
RANKS = {"data": "the data-parallel ranks (ctx.dp_group)", "all": "every rank of the world"}


def among(ctx: Context, ranks: str) -> Context:
    """ctx as the collective sees it: every rank ("all"), or its data-parallel peers ("data").

    A mesh with tp, cp or pp gives each data-parallel group the same data: gathering a
    metric over "all" ranks would repeat every sample tp x cp x pp times.
    """
    if not isinstance(ranks, str) or ranks not in RANKS:
        raise InvalidArgumentError(
            f"ranks must be one of {list(RANKS)} ({'; '.join(RANKS.values())}), got {ranks!r}")
    return ctx if ranks == "all" else over_data(ctx)


def over_data(ctx: Context) -> Context:
    """ctx seen from the data-parallel ranks only: rank dp_rank of dp_size in dp_group.

    The Context itself when every rank is a data-parallel rank (no tp, cp or pp).
    """
    if ctx.layout.only_data_parallel:
        return ctx
    world = World(rank=ctx.dp_rank, world_size=ctx.dp_size, local_rank=0, local_world_size=1,
                  launcher=ctx.world.launcher)
    return Context(world=world, device=ctx.device, dist_backend=ctx.dist_backend,
                   debug=ctx.debug, group=ctx.dp_group, timeout=ctx.timeout)


def _require_group(ctx: Context) -> None:
    if not dist.is_initialized():
        raise NotConnectedError(
            f"the Context says world size {ctx.world_size} but no torch.distributed process "
            "group exists in this process; build the Context with accel.init() or "
            "accel.Context.from_process_group()"
        )


def _comm_device(tensor: torch.Tensor, ctx: Context) -> torch.device:
    """Where `tensor` must be for ctx's backend: gloo needs CPU, nccl needs CUDA."""
    backend = ctx.dist_backend or ""
    # "cpu:gloo,cuda:nccl" names a backend per device type; "gloo" serves every type.
    names = [part.split(":")[-1] for part in backend.split(",")]
    if any(name not in _BACKEND_DEVICES for name in names):
        return tensor.device
    allowed = {dev for name in names for dev in _BACKEND_DEVICES[name]}
    if tensor.device.type in allowed:
        return tensor.device
    if "cpu" in allowed:
        return torch.device("cpu")
    if ctx.device.type in allowed:
        return ctx.device
    raise UnsupportedError(
        f"the {backend!r} process group cannot communicate {tensor.device} tensors, and this "
        f"process's device is {ctx.device}; move the data to a {'/'.join(sorted(allowed))} "
        "device first"
    )


def _to_comm(tensor: torch.Tensor, ctx: Context, *, writable: bool) -> torch.Tensor:
    """`tensor`, contiguous, on the communication device; a copy when `writable`, since
    in-place collectives (all_reduce, broadcast) must not change the caller's tensor."""
    moved = tensor.to(_comm_device(tensor, ctx))
    if writable and moved is tensor:
        return moved.clone(memory_format=torch.contiguous_format)
    return moved.contiguous()


def _global_rank(ctx: Context, group_rank: int) -> int:
    return group_rank if ctx.group is None else dist.get_global_rank(ctx.group, group_rank)


def _check_src(src: int, ctx: Context, name: str) -> None:
    check_context(name, ctx)
    check_int(name, "src", src, minimum=0)
    if not 0 <= src < ctx.world_size:
        raise InvalidArgumentError(
            f"{name}: src={src} is not a rank of this world of size {ctx.world_size}; "
            f"pass a rank between 0 and {ctx.world_size - 1}"
        )


# --------------------------------------------------------------------------- collectives


@explained
def gather(data: Any, ctx: Context, *, ranks: str = "data") -> Any:
    """All-gather every tensor and concatenate the ranks' pieces along dim 0, in rank order.

    Tensors must have the same shape on every rank (see `pad_across_processes`); a 0-d
    tensor becomes a 1-d tensor of length world size, also in a single process, so code
    sees the same shapes whatever the world.

    >>> gather(torch.tensor([2 * ctx.rank + 1, 2 * ctx.rank + 2]), ctx)  # 2 ranks
    tensor([1, 2, 3, 4])
    """
    check_context("gather", ctx)
    ctx = among(ctx, ranks)
    if not ctx.is_distributed:
        return recursively_apply(lambda t: t.reshape(1) if t.dim() == 0 else t, data)
    _require_group(ctx)
    debug_check("gather", _leaves(data), ctx)
    return recursively_apply(lambda t: _gather_tensor(t, ctx), data)


def _gather_tensor(tensor: torch.Tensor, ctx: Context) -> torch.Tensor:
    local = _to_comm(tensor.reshape(1) if tensor.dim() == 0 else tensor, ctx, writable=False)
    pieces = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(pieces, local, group=ctx.group)
    return torch.cat(pieces, dim=0).to(tensor.device)


@explained
def gather_object(obj: Any, ctx: Context, *, ranks: str = "data") -> list[Any]:
    """Every rank's picklable `obj`, in rank order; lists and tuples are concatenated.

    >>> gather_object([ctx.rank], ctx)     # 2 ranks
    [0, 1]
    >>> gather_object("a" if ctx.rank == 0 else "b", ctx)
    ['a', 'b']
    """
    check_context("gather_object", ctx)
    ctx = among(ctx, ranks)
    if ctx.is_distributed:
        _require_group(ctx)
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, obj, group=ctx.group)
    else:
        gathered = [obj]
    if all(isinstance(item, (list, tuple)) for item in gathered):
        return [element for item in gathered for element in item]
    return gathered


@explained
def reduce(data: Any, ctx: Context, op: str = "mean", *, ranks: str = "data") -> Any:
    """Reduce every tensor across ranks with `op`: "mean" (default), "sum", "max" or "min".

    The default is "mean" because the common use is averaging a metric or a loss that
    each rank computed on its own share of the batch. "mean" of an integer or bool tensor
    returns a floating tensor (torch's default dtype): a truncated integer mean would be
    silently wrong. "sum" of a bool tensor counts the True values (int64), as torch.sum.
    The input is never modified.

    Raises:
        InvalidArgumentError: `op` is not one of the four.

    >>> reduce(torch.tensor([1.0, 2.0]) + 2 * ctx.rank, ctx, op="sum")  # 2 ranks
    tensor([4., 6.])
    """
    check_context("reduce", ctx)
    if not isinstance(op, str) or op not in _REDUCE_OPS:
        raise InvalidArgumentError(
            f"reduce: unknown op {op!r}; use one of {', '.join(map(repr, _REDUCE_OPS))}"
        )
    ctx = among(ctx, ranks)
    if ctx.is_distributed:
        _require_group(ctx)
        debug_check(f"reduce(op={op!r})", _leaves(data), ctx)
    return recursively_apply(lambda t: _reduce_tensor(t, ctx, op), data)


def _reduce_tensor(tensor: torch.Tensor, ctx: Context, op: str) -> torch.Tensor:
    if tensor.dtype == torch.bool and op in ("sum", "mean"):
        tensor = tensor.long()  # gloo and nccl sum bools as logical or
    if not ctx.is_distributed:
        return tensor / 1 if op == "mean" and not tensor.is_floating_point() else tensor
    result = _to_comm(tensor, ctx, writable=True)
    dist.all_reduce(result, op=_REDUCE_OPS[op], group=ctx.group)
    if op == "mean":
        result = result / ctx.world_size  # true division: ints become floats
    return result.to(tensor.device)


@explained
def broadcast(data: Any, ctx: Context, src: int = 0) -> Any:
    """Every rank gets rank `src`'s tensors; the others' tensors must have the same shapes.

    Returns new tensors; the input is never modified.

    >>> broadcast(torch.tensor([2 * ctx.rank + 1, 2 * ctx.rank + 2]), ctx)  # 2 ranks
    tensor([1, 2])
    """
    _check_src(src, ctx, "broadcast")
    if not ctx.is_distributed:
        return data
    _require_group(ctx)
    debug_check("broadcast", _leaves(data), ctx)
    return recursively_apply(lambda t: _broadcast_tensor(t, ctx, src), data)


def _broadcast_tensor(tensor: torch.Tensor, ctx: Context, src: int) -> torch.Tensor:
    result = _to_comm(tensor, ctx, writable=True)
    dist.broadcast(result, src=_global_rank(ctx, src), group=ctx.group)
    return result.to(tensor.device)


@explained
def broadcast_object(obj: Any, ctx: Context, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj`, on every rank.

    >>> config = broadcast_object(read_config() if ctx.is_main_process else None, ctx)
    """
    _check_src(src, ctx, "broadcast_object")
    if not ctx.is_distributed:
        return obj
    _require_group(ctx)
    box = [obj]
    dist.broadcast_object_list(box, src=_global_rank(ctx, src), group=ctx.group)
    return box[0]


@explained
def pad_across_processes(data: Any, ctx: Context, dim: int = 0, pad_index: Any = 0,
                         pad_first: bool = False, *, ranks: str = "data") -> Any:
    """Pad every tensor along `dim` with `pad_index` to the largest size any rank has.

    Use it before `gather` when ranks hold different lengths (generated sequences, the
    last uneven batch). 0-d tensors pass through (there is nothing to pad). With
    `pad_first` the padding goes before the data (left padding).

    Raises:
        InvalidArgumentError: a tensor has no dimension `dim`.

    >>> pad_across_processes(torch.ones(3 - ctx.rank), ctx)  # rank 1 of 2
    tensor([1., 1., 0.])
    """
    check_context("pad_across_processes", ctx)
    check_int("pad_across_processes", "dim", dim)
    check_bool("pad_across_processes", "pad_first", pad_first)
    ctx = among(ctx, ranks)
    if ctx.is_distributed:
        _require_group(ctx)
        debug_check("pad_across_processes", _leaves(data), ctx, compare_shapes=False)
    leaves = [t for _, t in _leaves(data) if t.dim() > 0]
    for tensor in leaves:
        if not -tensor.dim() <= dim < tensor.dim():
            raise InvalidArgumentError(
                f"pad_across_processes: dim={dim} is out of range for a tensor of shape "
                f"{tuple(tensor.shape)}; pass a dim every tensor has"
            )
    if not ctx.is_distributed or not leaves:
        return data
    # One collective for the sizes of all tensors, instead of one per tensor.
    sizes = torch.tensor([t.shape[dim] for t in leaves], dtype=torch.int64)
    all_sizes = _gather_tensor(sizes, ctx).reshape(ctx.world_size, -1)
    targets = iter(all_sizes.max(dim=0).values.tolist())

    def pad(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 0:
            return tensor
        return _pad_tensor(tensor, next(targets), dim, pad_index, pad_first)

    return recursively_apply(pad, data)


def _pad_tensor(tensor: torch.Tensor, size: int, dim: int, pad_index: Any,
                pad_first: bool) -> torch.Tensor:
    dim = dim % tensor.dim()
    if tensor.shape[dim] == size:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = size
    padded = tensor.new_full(shape, pad_index)
    start = size - tensor.shape[dim] if pad_first else 0
    padded.narrow(dim, start, tensor.shape[dim]).copy_(tensor)
    return padded


# --------------------------------------------------------------------------- local helpers


def send_to_device(data: Any, device: str | int | torch.device, *,
                   non_blocking: bool | None = None) -> Any:
    """Move every tensor (and every object with a `.to`, e.g. a BatchEncoding) to `device`.

    Args:
        non_blocking: default True for pinned CPU tensors going to CUDA, False otherwise.
            Objects other than tensors get it only when it is given explicitly.

    >>> batch = send_to_device({"ids": ids, "labels": labels}, ctx.device)
    """
    if not (isinstance(device, int) and not isinstance(device, bool) and device >= 0):
        check_device("send_to_device", "device", device)  # an int is a GPU index
    check_bool("send_to_device", "non_blocking", non_blocking, optional=True)
    target = torch.device(device)
    if isinstance(data, torch.Tensor):
        # A pinned host buffer is copied by DMA while the host queues more work; the
        # copy is ordered on the current stream before any kernel that reads it, so it
        # is safe. Pageable memory gains nothing from it, and device-to-host copies read
        # by the CPU right after must block.
        default = (target.type == "cuda" and data.device.type == "cpu" and data.is_pinned())
        return data.to(target, non_blocking=default if non_blocking is None else non_blocking)
    if _has_own_to(data):
        if non_blocking is not None and _accepts_non_blocking(data.to):
            return data.to(target, non_blocking=non_blocking)
        return data.to(target)
    if isinstance(data, Mapping):
        moved = {k: send_to_device(v, target, non_blocking=non_blocking) for k, v in data.items()}
        return _rebuild_mapping(data, moved)
    if isinstance(data, (list, tuple)):
        moved_items = [send_to_device(v, target, non_blocking=non_blocking) for v in data]
        return _rebuild_sequence(data, moved_items)
    return data


def _has_own_to(obj: Any) -> bool:
    # Plain containers never define .to; a Mapping subclass that does (transformers'
    # BatchEncoding) knows best how to move itself and its extra attributes.
    return callable(getattr(obj, "to", None)) and not isinstance(obj, (list, tuple, dict))


def _accepts_non_blocking(method: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "non_blocking" or p.kind is p.VAR_KEYWORD for p in params)


def concatenate(structures: list[Any], dim: int = 0) -> Any:
    """Concatenate same-structured nested data leaf by leaf (e.g. per-step model outputs).

    0-d tensors count as 1-d, as in `gather`. Non-tensor leaves must be equal in every
    structure and are kept.

    Raises:
        InvalidArgumentError: empty input, or structures that differ.

    >>> concatenate([{"x": torch.ones(2)}, {"x": torch.zeros(1)}])
    {'x': tensor([1., 1., 0.])}
    """
    check_type("concatenate", "structures", structures, (list, tuple),
               "a list of same-structured nested data")
    check_int("concatenate", "dim", dim)
    if not structures:
        raise InvalidArgumentError("concatenate: got an empty list; pass at least one structure")
    for path, tensor in _leaves(structures[0]):
        if not -max(tensor.dim(), 1) <= dim < max(tensor.dim(), 1):  # 0-d counts as 1-d
            raise InvalidArgumentError(
                f"concatenate: dim={dim} is out of range for {path} of shape "
                f"{tuple(tensor.shape)}; pass a dim every tensor has")
    return _concatenate(list(structures), dim, "data")


def _concatenate(items: list[Any], dim: int, path: str) -> Any:
    first = items[0]
    if isinstance(first, torch.Tensor):
        _require_all(items, lambda x: isinstance(x, torch.Tensor), path, "a tensor")
        return torch.cat([t.reshape(1) if t.dim() == 0 else t for t in items], dim=dim)
    if isinstance(first, Mapping):
        keys = list(first.keys())
        _require_all(items, lambda x: isinstance(x, Mapping) and list(x.keys()) == keys,
                     path, f"a mapping with keys {keys}")
        merged = {k: _concatenate([x[k] for x in items], dim, f"{path}[{k!r}]") for k in keys}
        return _rebuild_mapping(first, merged)
    if isinstance(first, (list, tuple)):
        _require_all(items, lambda x: type(x) is type(first) and len(x) == len(first), path,
                     f"a {type(first).__name__} of length {len(first)}")
        merged_items = [_concatenate([x[i] for x in items], dim, f"{path}[{i}]")
                        for i in range(len(first))]
        return _rebuild_sequence(first, merged_items)
    _require_all(items, lambda x: type(x) is type(first) and x == first, path, repr(first))
    return first


def _require_all(items: list[Any], ok: Callable[[Any], bool], path: str, expected: str) -> None:
    for index, item in enumerate(items):
        if not ok(item):
            raise InvalidArgumentError(
                f"concatenate: structure {index} has {type(item).__name__} at {path} where "
                f"structure 0 has {expected}; pass structures of the same shape"
            )

