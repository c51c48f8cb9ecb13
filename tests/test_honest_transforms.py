"""Honest transforms: each returns new objects, or its docstring and the README say "(in place)".

Every public transform runs on fresh objects in a one-process world (a fake world for the
engines); a snapshot of what it could change on them (module tables, forwards and hooks,
parameter objects and their attributes, optimizer groups and state, loader attributes)
is taken before and after. Links between objects live in the objects returned or in weak
identity tables, never as `_accel_*` attributes on the user's objects.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import re
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import accel
from accel.errors import TransformOrderError
from accel.testing import fake_world

REPO = Path(__file__).resolve().parent.parent
IN_PLACE = "(in place)"


# --------------------------------------------------------------------------- snapshots


class Snapshot:
    """Path -> identity (or value) of everything on `objects` that a transform could change.

    It keeps every object it saw alive, so no id it recorded can be reused by a new object
    before the comparison.
    """

    def __init__(self, **objects: Any):
        self.alive: list[Any] = []
        self.seen: dict[tuple, Any] = {}
        for role, obj in objects.items():
            for path, owner in _owners(role, obj):
                self._record(path, owner)

    def _record(self, path: tuple, owner: Any) -> None:
        if isinstance(owner, torch.Tensor):
            self.seen[(*path, "data")] = (owner.data_ptr(), owner.device, owner.dtype,
                                          tuple(owner.shape), owner.requires_grad)
        table = owner if isinstance(owner, dict) else vars(owner)
        for key, value in table.items():
            self._note((*path, self._key(key)), value)
            if isinstance(value, (dict, list)):  # module tables, hooks, param groups, state
                items = value.items() if isinstance(value, dict) else enumerate(value)
                for inner, item in items:
                    self._note((*path, self._key(key), self._key(inner)), item)

    def _key(self, key: Any) -> Any:
        if isinstance(key, (str, int)):
            return key
        self.alive.append(key)  # a parameter keying optimizer state
        return f"<id {id(key)}>"

    def _note(self, path: tuple, value: Any) -> None:
        self.alive.append(value)
        self.seen[path] = frozenset(value) if isinstance(value, set) else id(value)

    def changes(self, later: Snapshot) -> list[str]:
        paths = set(self.seen) | set(later.seen)
        return sorted(".".join(map(str, path)) for path in paths
                      if self.seen.get(path, "absent") != later.seen.get(path, "absent"))


def _owners(role: str, obj: Any) -> Iterator[tuple[tuple, Any]]:
    """The object and what hangs off it: submodules, parameters, buffers, param groups."""
    yield (role,), obj
    if isinstance(obj, nn.Module):
        for name, module in obj.named_modules(remove_duplicate=False):
            if name:  # the root is (role,)
                yield (role, name), module
        tensors = [*obj.named_parameters(remove_duplicate=False),
                   *obj.named_buffers(remove_duplicate=False)]
        for name, tensor in tensors:
            yield (role, name), tensor
    if isinstance(obj, torch.optim.Optimizer):
        for index, group in enumerate(obj.param_groups):
            yield (role, f"group{index}"), group
            for number, param in enumerate(group["params"]):
                yield (role, f"group{index}", number), param


def reachable(objects: dict[str, Any]) -> list[Any]:
    return [owner for role, obj in objects.items() for _, owner in _owners(role, obj)]


def accel_attributes(objects: Iterable[Any]) -> list[str]:
    """`Type.name` of every `_accel*` attribute on `objects`."""
    return [f"{type(obj).__name__}.{name}" for obj in objects
            if isinstance(getattr(obj, "__dict__", None), dict)
            for name in vars(obj) if name.startswith("_accel")]


# --------------------------------------------------------------------------- the cases


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def make_loader() -> DataLoader:
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(x, x[:, :2]), batch_size=4)


def wrapped(model: nn.Module, ctx: accel.Context) -> tuple[Any, accel.Context]:
    return accel.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), ctx)


def forward(model: nn.Module) -> None:
    model(torch.randn(3, 4)).sum().backward()


#: name -> a context manager yielding (transform, inputs, apply): `apply(**inputs)` runs
#: the transform on the inputs; the transform's docstring is what must say "(in place)".
CASES: dict[str, Callable[[], contextlib.AbstractContextManager]] = {}
#: the name by which the README's table must say a case works in place, when not its own
README_NAME: dict[str, str] = {}


def case(name: str, readme: str | None = None):
    def register(fn):
        CASES[name] = contextlib.contextmanager(fn)
        if readme:
            README_NAME[name] = readme
        return fn
    return register


def given(transform: Callable, apply: Callable, **inputs: Any) -> Iterator[tuple]:
    """A case's one item: what it checks, on which inputs, by running what."""
    yield transform, inputs, apply


for dtype in ("bf16", "fp16", "fp8"):
    @case(f"with_amp_{dtype}")
    def _amp(dtype=dtype):
        if dtype == "fp8" and importlib.util.find_spec("torchao") is None:
            pytest.skip("fp8 needs torchao")
        model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
        yield from given(accel.with_amp, functools.partial(
            accel.with_amp, ctx=accel.Context(), dtype=dtype), model=model)


@case("shard_model_single")
def _single():
    yield from given(accel.shard_model, functools.partial(
        accel.shard_model, ctx=accel.Context(), strategy="single"), model=make_model())


def _shard_in_fake_world(strategy: str):
    with fake_world(0, 2) as ctx:
        yield from given(accel.shard_model, functools.partial(
            accel.shard_model, ctx=ctx, strategy=strategy), model=make_model())


case("shard_model_ddp")(functools.partial(_shard_in_fake_world, "ddp"))
case("shard_model_fsdp", readme="accel.FSDP")(
    functools.partial(_shard_in_fake_world, "fsdp"))


@case("wrap_optimizer")
def _wrap_optimizer():
    optimizer = torch.optim.AdamW(make_model().parameters())
    yield from given(accel.wrap_optimizer, functools.partial(
        accel.wrap_optimizer, ctx=accel.Context()), optimizer=optimizer)


@case("wrap_optimizer_built_before_fsdp")
def _wrap_optimizer_fsdp():
    with fake_world(0, 2) as ctx:
        model = make_model()
        optimizer = torch.optim.AdamW(model.parameters())
        _, ctx = accel.shard_model(model, ctx, strategy="fsdp")
        yield from given(accel.wrap_optimizer, functools.partial(
            accel.wrap_optimizer, ctx=ctx), optimizer=optimizer)


@case("wrap_scheduler")
def _wrap_scheduler():
    optimizer, ctx = wrapped(make_model(), accel.Context())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer.optimizer, step_size=1)
    yield from given(accel.wrap_scheduler, lambda scheduler, optimizer: accel.wrap_scheduler(
        scheduler, ctx, optimizer), scheduler=scheduler, optimizer=optimizer)


@case("accumulate_grads")
def _accumulate():
    model = make_model()
    optimizer, ctx = wrapped(model, accel.Context())
    yield from given(accel.accumulate_grads, lambda model, optimizer: accel.accumulate_grads(
        model, optimizer, ctx, steps=2), model=model, optimizer=optimizer)


@case("no_sync")
def _no_sync():
    def apply(model):
        with accel.no_sync(model, accel.Context()):
            forward(model)
    yield from given(accel.no_sync, apply, model=make_model())


@case("distribute_loader")
def _distribute():
    yield from given(accel.distribute_loader, functools.partial(
        accel.distribute_loader, ctx=accel.Context()), loader=make_loader())


@case("skip_first_batches")
def _skip():
    yield from given(accel.skip_first_batches, functools.partial(
        accel.skip_first_batches, num_batches=1), loader=make_loader())


@case("skip_first_batches_distributed")
def _skip_distributed():
    loader, _ = accel.distribute_loader(make_loader(), accel.Context())
    yield from given(accel.skip_first_batches, functools.partial(
        accel.skip_first_batches, num_batches=1), loader=loader)


@case("local_sgd")
def _local_sgd():
    def apply(model):
        with accel.local_sgd(model, accel.Context(), sync_every=1) as sgd:
            forward(model)
            sgd.step()
    yield from given(accel.local_sgd, apply, model=make_model())


@case("join_uneven_inputs")
def _join():
    ctx = accel.Context()
    loader, ctx = accel.distribute_loader(make_loader(), ctx)

    def apply(model, loader):
        with accel.join_uneven_inputs(model, ctx, loader=loader):
            forward(model)  # iterating the loader would move its epoch: not join's doing
    yield from given(accel.join_uneven_inputs, apply, model=make_model(), loader=loader)


@case("compose")
def _compose():
    pipeline = accel.compose(accel.shard_model, accel.wrap_optimizer, accel.distribute_loader)
    model = make_model()
    yield from given(accel.compose, lambda **objects: pipeline(accel.Context(), **objects),
                     model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     loader=make_loader())


@case("dispatch_model")
def _dispatch():
    yield from given(accel.dispatch_model, functools.partial(
        accel.dispatch_model, device_map={"": "cpu"}), model=make_model())


def _blocks_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]))


@case("compile_model")
def _compile():
    yield from given(accel.compile_model, functools.partial(
        accel.compile_model, ctx=accel.Context(), backend="eager"), model=_blocks_model())


@case("checkpoint_activations")
def _checkpoint_activations():
    yield from given(accel.checkpoint_activations, functools.partial(
        accel.checkpoint_activations, ctx=accel.Context(), policy="selective", offload=True),
        model=_blocks_model())


@case("with_amp_bf16_params", readme="with_amp")
def _amp_bf16_params():
    yield from given(accel.with_amp, functools.partial(
        accel.with_amp, ctx=accel.Context(), dtype="bf16", params="bf16",
        master_weights=True), model=make_model())


def _readme_says_in_place(name: str) -> bool:
    readme = (REPO / "README.md").read_text()
    return re.search(rf"`{re.escape(name)}[^`]*` \([^)]*in place", readme) is not None


@pytest.mark.parametrize("name", CASES)
def test_a_transform_leaves_its_inputs_alone_or_says_in_place(name):
    with CASES[name]() as (transform, inputs, apply):
        before = Snapshot(**inputs)
        apply(**inputs)
        changed = before.changes(Snapshot(**inputs))
    if changed:
        assert IN_PLACE in (transform.__doc__ or ""), (
            f"{transform.__name__} changed {changed[:6]} but its docstring does not say "
            f"{IN_PLACE!r}")
        readme_name = README_NAME.get(name, transform.__name__)
        assert _readme_says_in_place(readme_name), (
            f"the README's table does not say `{readme_name}` works in place")


@pytest.mark.parametrize("name", CASES)
def test_no_transform_leaves_accel_attributes_on_user_objects(name):
    with CASES[name]() as (_, inputs, apply):
        before = Snapshot(**inputs)  # also keeps what the transform replaces, to look at
        apply(**inputs)
        assert accel_attributes([*before.alive, *reachable(inputs)]) == []


#: how the source could set an `_accel_*` attribute: setattr, assignment, a named constant
FORBIDDEN = (r"setattr\([^)]*['\"]_accel", r"\._accel\w*\s*=[^=]", r"['\"]_accel_\w*['\"]")


def test_the_source_sets_no_accel_attribute():
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
             for path in sorted((REPO / "accel").rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if any(re.search(pattern, line) for pattern in FORBIDDEN)]
    assert found == []


def test_the_snapshot_sees_what_an_in_place_change_would_touch():
    model, loader = make_model(), make_loader()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    objects = dict(model=model, optimizer=optimizer, loader=loader)
    changes = {
        "model.0._accel_mark": lambda: setattr(model[0], "_accel_mark", 1),
        "model.0.weight._accel_mark": lambda: setattr(model[0].weight, "_accel_mark", 1),
        "model.forward": lambda: setattr(model, "forward", lambda x: x),
        "model._forward_pre_hooks": lambda: model.register_forward_pre_hook(lambda m, a: None),
        "model.2.bias.data": lambda: setattr(model[2].bias, "data", torch.zeros(2)),
        "optimizer.group0.params": lambda: optimizer.param_groups[0].update(params=[]),
        "loader._accel_mark": lambda: setattr(loader, "_accel_mark", True),
    }
    for expected, change in changes.items():
        before = Snapshot(**objects)
        change()
        changed = before.changes(Snapshot(**objects))
        assert any(path.startswith(expected) for path in changed), (expected, changed)
    assert len(accel_attributes(reachable(objects))) == 3


# --------------------------------------------------------------------------- with_amp


def test_with_amp_twice_under_fresh_contexts_is_refused():
    model, _ = accel.with_amp(make_model(), accel.Context(), dtype="bf16")
    amp_forward = model.forward
    with pytest.raises(TransformOrderError, match="already applied to this model"):
        accel.with_amp(model, accel.Context(), dtype="fp16")
    assert model.forward is amp_forward
    with pytest.raises(TransformOrderError, match="module '0'"):
        outer = nn.Sequential(model)
        accel.with_amp(outer, accel.Context(), dtype="bf16")
    model.forward = model.forward.forward  # the docstring's undo
    accel.with_amp(model, accel.Context(), dtype="bf16")


# --------------------------------------------------------------------------- no_sync


def test_no_sync_nested_and_under_accumulation_leaves_the_model_as_it_was():
    with fake_world(0, 2) as ctx:
        model, ctx = accel.shard_model(make_model(), ctx, strategy="ddp")
        optimizer, ctx = accel.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), ctx)
        model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx, steps=2)
        model(torch.randn(3, 4))  # DDP's own lazy initialisation, before the snapshot
        optimizer.step()  # the next micro-step ends the cycle: accumulation would sync
        before = Snapshot(model=model)
        with accel.no_sync(model, ctx):
            with accel.no_sync(model, ctx):
                model(torch.randn(3, 4))
            assert model.require_backward_grad_sync is False  # the hook beat accumulation's
        assert model.require_backward_grad_sync is True
        changed = before.changes(Snapshot(model=model))
        assert changed == ["model.require_backward_grad_sync"]  # the switch itself, nothing more


# --------------------------------------------------------------------------- weak links


@contextlib.contextmanager
def gloo_world_of_one() -> Iterator[accel.Context]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield accel.Context.from_process_group()
    finally:
        dist.destroy_process_group()


def loss(model: nn.Module, step: int) -> torch.Tensor:
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
    return model(x).square().mean()


def train(model: nn.Module, optimizer: Any, ctx: accel.Context) -> None:
    for step in range(1, 4):
        accel.backward(loss(model, step), optimizer, ctx)
        optimizer.step()
        optimizer.zero_grad()


def stepped_adamw(model: nn.Module) -> torch.optim.AdamW:
    """An AdamW that already has state: one step, before any transform."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    loss(model, 0).backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def test_fsdp_repoints_an_optimizer_built_before_shard_model_without_attributes():
    reference = make_model()
    train(reference, *accel.wrap_optimizer(stepped_adamw(reference), accel.Context()))
    with gloo_world_of_one() as ctx:
        model = make_model()
        early = stepped_adamw(model)
        originals = [weakref.ref(p) for p in model.parameters()]
        model, ctx = accel.shard_model(model, ctx, strategy="fsdp")
        assert accel_attributes(reachable({"early": early})) == []  # the replaced parameters
        optimizer, ctx = accel.wrap_optimizer(early, ctx)
        train(model, optimizer, ctx)
        got = {name: p.full_tensor() for name, p in model.named_parameters()}
    gc.collect()
    assert [ref() for ref in originals] == [None] * len(originals)  # nothing of accel's holds them
    for name, param in reference.named_parameters():
        torch.testing.assert_close(got[name], param.detach(), rtol=1e-5, atol=1e-6)


def test_a_dispatched_model_is_not_kept_alive_by_accel(tmp_path):
    model = nn.Linear(4, 2)  # one block on disk: the root module is itself an offloaded unit
    accel.dispatch_model(model, {"": "disk"}, offload_dir=tmp_path, prefetch=0)
    assert accel.inference.dispatched_device_map(model) == {"": "disk"}
    model(torch.randn(2, 4))
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
