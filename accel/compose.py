"""`compose`: chain transforms into one pipeline over named PyTorch objects."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from accel.context import Context
from accel.errors import IncompatibleOptionsError

#: names of the objects a pipeline carries; a transform names them in its signature.
ROLES = ("model", "optimizer", "scheduler", "loader")


def _split_signature(transform: Callable[..., Any]) -> tuple[list[str], list[str]]:
    """(roles the transform acts on and returns, roles it only reads as links)."""
    params = list(inspect.signature(transform).parameters.values())
    names = [p.name for p in params]
    if "ctx" not in names:
        raise IncompatibleOptionsError(f"{_name(transform)} has no 'ctx' parameter: not a transform")
    cut = names.index("ctx")
    acted = names[:cut]
    unknown = [name for name in acted if name not in ROLES]
    if unknown:
        raise IncompatibleOptionsError(
            f"{_name(transform)} takes {unknown} before ctx; a pipeline carries only {ROLES}"
        )
    # A link the caller bound with functools.partial keeps its bound value.
    links = [p.name for p in params[cut + 1:] if p.name in ROLES
             and (p.default is inspect.Parameter.empty or p.default is None)]
    return acted, links


def _name(transform: Callable[..., Any]) -> str:
    inner = getattr(transform, "func", transform)
    return getattr(inner, "__name__", repr(inner))


def compose(*transforms: Callable[..., Any]) -> Callable[..., tuple[dict[str, Any], Context]]:
    """Build a pipeline that applies `transforms` in order.

    Each transform receives the objects its signature names (model, optimizer,
    scheduler, loader), before ctx as the objects it returns, after ctx as links it
    only reads. The pipeline returns every object and the final Context.

    >>> prepare = accel.compose(partial(accel.with_amp, dtype="bf16"), accel.shard_model,
    ...                         accel.wrap_optimizer, accel.distribute_loader)
    >>> objs, ctx = prepare(accel.init(), model=model, optimizer=optimizer, loader=loader)
    >>> model, optimizer = objs["model"], objs["optimizer"]
    """
    plans = [(transform, *_split_signature(transform)) for transform in transforms]

    def pipeline(ctx: Context, **objects: Any) -> tuple[dict[str, Any], Context]:
        unknown = sorted(set(objects) - set(ROLES))
        if unknown:
            raise IncompatibleOptionsError(f"unknown objects {unknown}; a pipeline takes {ROLES}")
        objects = dict(objects)
        for transform, acted, links in plans:
            missing = [role for role in acted if role not in objects]
            if missing:
                raise IncompatibleOptionsError(
                    f"{_name(transform)} needs {missing}; pass them to the pipeline"
                )
            result = transform(*(objects[r] for r in acted), ctx,
                               **{r: objects[r] for r in links if r in objects})
            *outputs, ctx = result
            objects.update(zip(acted, outputs))
        return objects, ctx

    return pipeline
