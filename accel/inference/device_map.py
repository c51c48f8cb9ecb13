"""Device maps: which device holds each block of a model, decided greedily and explained.

Blocks are placed in the model's order on the accelerators (by index), then the CPU,
then disk. A module that does not fit in what is left on a device is split into its
children unless its class is a no-split class (a transformer block: its residual stream
must not cross devices); a block that does not fit moves on to the next device, never
back. Tied tensors are placed with the first block that holds them. The result depends
only on the model's structure and the budgets, so the same inputs give the same map.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from accel.context import Context
from accel.errors import InvalidArgumentError
from accel.inference.blocks import (
    all_tensors,
    is_splittable,
    largest_block,
    no_split_classes,
    owner_entry,
    split_entry,
    tensors_under,
    tied_names,
)
from accel.inference.empty import tensor_bytes, to_dtype
from accel.inference.memory import (
    CPU,
    DISK,
    Budget,
    DeviceLike,
    device_name,
    format_size,
    is_accelerator,
    memory_budgets,
)
from accel.validation import check_bool, check_context, check_mapping, check_module


@dataclasses.dataclass(frozen=True)
class PlanStep:
    """One line of the story of a device map: a block placed, split or moved on."""

    name: str
    device: str | None  # None: not placed by this step (a split, a move to the next device)
    size: int
    reason: str


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    """A device map with the budgets it filled and every decision that led to it."""

    budgets: tuple[Budget, ...]
    steps: tuple[PlanStep, ...]
    notes: tuple[str, ...]

    @property
    def device_map(self) -> dict[str, str]:
        return {s.name: s.device for s in self.steps if s.device is not None}


def infer_device_map(model: nn.Module, max_memory: Mapping[DeviceLike, Any] | None = None,
                     no_split_module_classes: Iterable[str] | None = None,
                     dtype: str | torch.dtype | None = None, balanced: bool = True, *,
                     ctx: Context | None = None, prefetch: int = 2) -> dict[str, str]:
    """Which device each block of `model` goes to: accelerators in order, then cpu, then disk.

    Args:
        max_memory: bytes (or "10GiB") per device: 0 / "cuda:0", "cpu". Devices not named
            are not used; disk always is. None: 90% of what is free on each GPU and in RAM.
        no_split_module_classes: class names kept whole on one device; None: the model's
            `_no_split_modules` (transformers models), else none.
        dtype: count floating weights at this dtype (the dtype you will load them in).
        balanced: spread over several GPUs evenly when the model fits in them, instead of
            filling the first one first.
        ctx: use only this process's accelerator (`ctx.device`) and its share of the RAM.
        prefetch: blocks `dispatch_model` keeps loaded ahead; when anything is offloaded,
            room for (1 + prefetch) of the largest block is kept free on the first GPU.

    Returns:
        An ordered dict from module (or tensor) name to "cuda:N", "cpu" or "disk".

    >>> with accel.init_empty_weights():
    ...     model = GPT2LMHeadModel(config)
    >>> accel.infer_device_map(model, max_memory={0: "1GiB", "cpu": "4GiB"})
    {'transformer.wte': 'cuda:0', 'lm_head': 'cuda:0', ..., 'transformer.h.11': 'cpu'}
    """
    check_plan_arguments("infer_device_map", model, max_memory, balanced, ctx)
    return plan_device_map(model, max_memory, no_split_module_classes, dtype, balanced,
                           ctx=ctx, prefetch=prefetch).device_map


def explain_device_map(model: nn.Module, max_memory: Mapping[DeviceLike, Any] | None = None,
                       no_split_module_classes: Iterable[str] | None = None,
                       dtype: str | torch.dtype | None = None, balanced: bool = True, *,
                       ctx: Context | None = None, prefetch: int = 2) -> str:
    """Where `infer_device_map` puts each block and why, as text (same arguments).

    >>> print(accel.explain_device_map(model, max_memory={"cpu": "300MB"}))
    budgets: cpu 286.10 MiB (max_memory), disk unlimited (disk is the last resort)
    transformer.wte  -> cpu   147.26 MiB  fits: 147.26 MiB of 286.10 MiB used on cpu
    ...
    """
    check_plan_arguments("explain_device_map", model, max_memory, balanced, ctx)
    plan = plan_device_map(model, max_memory, no_split_module_classes, dtype, balanced,
                           ctx=ctx, prefetch=prefetch)
    return format_plan(plan)


def check_plan_arguments(function: str, model: Any, max_memory: Any, balanced: Any,
                         ctx: Any) -> None:
    """The arguments of a device map's planning that plan_device_map does not check itself."""
    check_module(function, "model", model)
    check_mapping(function, "max_memory", max_memory,
                  "a dict from device (0, 'cuda:1', 'cpu') to bytes or '10GiB' (or None)",
                  optional=True)
    check_bool(function, "balanced", balanced)
    check_context(function, ctx, optional=True)


def format_plan(plan: DevicePlan) -> str:
    """The text `explain_device_map` returns for a plan."""
    budgets = ", ".join(f"{b.device} {format_size(b.bytes)} ({b.source})" for b in plan.budgets)
    width = max((len(s.name or "(model)") for s in plan.steps), default=10)
    lines = [f"budgets: {budgets}", *plan.notes]
    for step in plan.steps:
        where = f"-> {step.device:<7}" if step.device is not None else " " * 10
        lines.append(f"{step.name or '(model)':<{width}}  {where} {format_size(step.size):>11}"
                     f"  {step.reason}")
    return "\n".join(lines)


def plan_device_map(model: nn.Module, max_memory: Mapping[DeviceLike, Any] | None = None,
                    no_split_module_classes: Iterable[str] | None = None,
                    dtype: str | torch.dtype | None = None, balanced: bool = True, *,
                    ctx: Context | None = None, prefetch: int = 2) -> DevicePlan:
    """The full decision record behind `infer_device_map` (same arguments)."""
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise InvalidArgumentError(f"prefetch must be an int >= 0, got {prefetch!r}")
    accelerators = None
    if ctx is not None:  # this process's own accelerator only; none for a CPU process
        accelerators = [] if ctx.device.type == "cpu" else [device_name(ctx.device)]
    budgets = memory_budgets(max_memory, accelerators=accelerators,
                             processes_per_node=ctx.local_world_size if ctx else 1)
    no_split = no_split_classes(model, no_split_module_classes)
    as_dtype = to_dtype(dtype) if dtype is not None else None
    block_name, block_size = largest_block(model, no_split, as_dtype)
    notes: list[str] = []
    if balanced:
        budgets = _balance(budgets, model, as_dtype, block_size, notes)
    plan = _Planner(model, budgets, no_split, as_dtype).run()
    gpus = [b for b in budgets if is_accelerator(b.device)]
    offloads = any(s.device in (CPU, DISK) for s in plan.steps)
    if gpus and offloads and block_size:
        # Offloaded blocks run on the first accelerator: their weights land there just in
        # time, with `prefetch` more blocks on their way in.
        reserve = block_size * (1 + prefetch)
        first = gpus[0]
        notes.append(f"reserved {format_size(reserve)} on {first.device} for offloaded blocks: "
                     f"largest block {block_name} ({format_size(block_size)}) x "
                     f"(1 + prefetch {prefetch})")
        budgets = [dataclasses.replace(b, bytes=max(0, b.bytes - reserve))
                   if b is first else b for b in budgets]
        plan = _Planner(model, budgets, no_split, as_dtype).run()
    return DevicePlan(budgets=tuple(budgets), steps=plan.steps, notes=tuple(notes))


def _balance(budgets: list[Budget], model: nn.Module, dtype: torch.dtype | None,
             block_size: int, notes: list[str]) -> list[Budget]:
    gpus = [b for b in budgets if is_accelerator(b.device)]
    total = sum(tensor_bytes(t, dtype) for t in _unique_tensors(model))
    if len(gpus) < 2 or total > sum(b.bytes for b in gpus):
        return budgets
    # An even share plus one block of slack, so block boundaries do not push the tail
    # onto the CPU; the last GPU keeps its whole budget.
    share = math.ceil(total / len(gpus)) + block_size
    capped = {b.device for b in gpus[:-1] if b.bytes > share}
    if capped:
        notes.append(f"balanced: {', '.join(sorted(capped))} capped at {format_size(share)} "
                     f"so the {format_size(total)} model spreads over {len(gpus)} GPUs")
    return [dataclasses.replace(b, bytes=share, source=f"{b.source}, balanced")
            if b.device in capped else b for b in budgets]


def _unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    return list({id(t): t for t in all_tensors(model).values()}.values())


class _Planner:
    """One greedy pass over the model: a queue of entries, devices filled in order."""

    def __init__(self, model: nn.Module, budgets: list[Budget], no_split: frozenset[str],
                 dtype: torch.dtype | None):
        self.modules = dict(model.named_modules())
        self.tensors = all_tensors(model)
        self.tied = tied_names(self.tensors)
        self.budgets = budgets
        self.no_split = no_split
        self.dtype = dtype
        self.used = {b.device: 0 for b in budgets}
        self.placed: dict[int, str] = {}  # id(tensor) -> device
        self.steps: list[PlanStep] = []

    def run(self) -> DevicePlan:
        queue, index = deque([""]), 0
        while queue:
            name = queue.popleft()
            budget = self.budgets[index]
            partners = self._partners(name, queue)
            size = self._size([name, *partners])
            left = budget.bytes - self.used[budget.device]
            if size <= left:
                self._place(name, partners, queue, budget)
            elif name in self.modules and is_splittable(self.modules[name], self.no_split):
                queue.extendleft(reversed(split_entry(name, self.modules[name])))
                self.steps.append(PlanStep(name, None, size, f"split: does not fit in the "
                                           f"{format_size(left)} left on {budget.device}"))
            else:
                index += 1
                queue.appendleft(name)
                self.steps.append(PlanStep(name, None, size, f"{budget.device} is full for it "
                                           f"({format_size(left)} left): moving on to "
                                           f"{self.budgets[index].device}"))
        return DevicePlan(tuple(self.budgets), tuple(self.steps), ())

    def _place(self, name: str, partners: list[str], queue: deque[str], budget: Budget) -> None:
        for entry in partners:
            self._take_out(entry, queue)
        for entry in (name, *partners):
            size = self._size([entry])  # before marking: a tied tensor counts once
            self.used[budget.device] += size
            for tensor_name in tensors_under(entry, self.tensors):
                self.placed[id(self.tensors[tensor_name])] = budget.device
            reason = (f"fits: {format_size(self.used[budget.device])} of "
                      f"{format_size(budget.bytes)} used on {budget.device}")
            if entry != name:
                reason = f"tied to {name}: placed with it; " + reason
            module = self.modules.get(entry)
            if module is not None and type(module).__name__ in self.no_split:
                reason += f" (no-split class {type(module).__name__}, kept whole)"
            self.steps.append(PlanStep(entry, budget.device, size, reason))

    def _size(self, entries: list[str]) -> int:
        unique = {}
        for entry in entries:
            for tensor_name in tensors_under(entry, self.tensors):
                tensor = self.tensors[tensor_name]
                if id(tensor) not in self.placed:
                    unique[id(tensor)] = tensor
        return sum(tensor_bytes(t, self.dtype) for t in unique.values())

    def _partners(self, name: str, queue: deque[str]) -> list[str]:
        """The queued entries that share a tensor with entry `name` and must go with it."""
        inside = set(tensors_under(name, self.tensors))
        partners: list[str] = []
        for tensor_name in sorted(inside):
            if id(self.tensors[tensor_name]) in self.placed:
                continue
            group = self.tied.get(id(self.tensors[tensor_name]), ())
            for other in group:
                if other in inside:
                    continue
                entry = self._entry_to_pull(other, queue)
                if entry is None:
                    raise InvalidArgumentError(
                        f"{tensor_name} is tied to {other}, which was already placed apart "
                        f"from {name}; list {name!r} and {other.rpartition('.')[0]!r} together "
                        "in no_split_module_classes' blocks or pass an explicit device_map"
                    )
                if entry not in partners:
                    partners.append(entry)
        return partners

    def _entry_to_pull(self, tensor_name: str, queue: deque[str]) -> str | None:
        """The smallest entry holding `tensor_name` that splitting the queue can reach."""
        holder = next((q for q in queue if q == "" or tensor_name == q
                       or tensor_name.startswith(q + ".")), None)
        if holder is None:
            return None
        current = holder
        while current != tensor_name:
            module = self.modules[current]
            if not is_splittable(module, self.no_split):
                return current
            rest = tensor_name[len(current) + 1:] if current else tensor_name
            head = rest.split(".", 1)[0]
            current = f"{current}.{head}" if current else head
        return current

    def _take_out(self, entry: str, queue: deque[str]) -> None:
        """Remove `entry` from the queue, splitting the queued module that holds it."""
        while entry not in queue:
            holder = next(q for q in queue if q == "" or entry.startswith(q + "."))
            position = queue.index(holder)
            del queue[position]
            for offset, child in enumerate(split_entry(holder, self.modules[holder])):
                queue.insert(position + offset, child)
            self.steps.append(PlanStep(holder, None, 0, f"split: to keep {entry} with the "
                                       "block it is tied to"))
        queue.remove(entry)


def check_device_map(model: nn.Module, device_map: Mapping[str, DeviceLike]) -> dict[str, str]:
    """A device map with canonical device names, after checking it can run `model`.

    Raises:
        InvalidArgumentError: a name that is neither a module nor a tensor of the model,
            a tensor no entry covers, or tied tensors mapped to different devices.

    >>> accel.check_device_map(model, {"": 0})
    {'': 'cuda:0'}
    """
    check_module("check_device_map", "model", model)
    if not isinstance(device_map, Mapping) or not device_map:
        raise InvalidArgumentError(
            f"device_map must be a non-empty dict from module name to device, got "
            f"{device_map!r}; build one with accel.infer_device_map(model)"
        )
    modules = dict(model.named_modules(remove_duplicate=False))
    tensors = all_tensors(model)
    unknown = [name for name in device_map if name not in modules and name not in tensors]
    if unknown:
        raise InvalidArgumentError(
            f"device_map names {unknown[:5]}, which are neither modules nor tensors of "
            f"{type(model).__name__}; use names from model.named_modules()"
        )
    entries = {name: device_name(device) for name, device in device_map.items()}
    by_tensor: dict[int, list[tuple[str, str | None]]] = {}
    for name, tensor in tensors.items():
        by_tensor.setdefault(id(tensor), []).append((name, owner_entry(name, entries)))
    uncovered = [names[0][0] for names in by_tensor.values()
                 if all(owner is None for _, owner in names)]
    if uncovered:
        raise InvalidArgumentError(
            f"device_map places no device for {len(uncovered)} tensors (first: "
            f"{uncovered[:3]}); add their modules, or '' for everything not listed"
        )
    for names in by_tensor.values():
        devices = {entries[owner] for _, owner in names if owner is not None}
        if len(devices) > 1:
            raise InvalidArgumentError(
                f"tied tensors {[n for n, _ in names]} are mapped to different devices "
                f"{sorted(devices)}; put their modules on one device"
            )
        if any(owner is None for _, owner in names):
            raise InvalidArgumentError(
                f"the tied tensor {names[0][0]} is also {[n for n, _ in names][1:]}, which no "
                "device_map entry covers; map those modules too"
            )
    return entries
