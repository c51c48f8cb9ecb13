"""`compose`: chain transforms into one pipeline over named PyTorch objects."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from accel.context import Context
from accel.errors import IncompatibleOptionsError

#: names of the objects a pipeline carries; a transform names them in its signature.
ROLES = ("model", "optimizer", "scheduler", "loader")


def _split_signature(transform: Callable[..., Any]) -> tuple[list[str], list[str], list[str]]:
    """(roles it acts on and returns, roles it reads as links, links it cannot do without)."""
    if not callable(transform):
        raise IncompatibleOptionsError(
            f"compose takes transforms (functions or functools.partial), got a "
            f"{type(transform).__name__}: pass accel.with_amp, not accel.with_amp(...)"
        )
    try:
        params = list(inspect.signature(transform).parameters.values())
    except (TypeError, ValueError):  # a builtin or a class without a signature
        raise IncompatibleOptionsError(
            f"compose takes transforms with a signature (model, ctx, ...), got "
            f"{_name(transform)}") from None
    names = [p.name for p in params]
    if "ctx" not in names:
        raise IncompatibleOptionsError(
            f"{_name(transform)} has no 'ctx' parameter: not a transform"
        )
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
    required = [p.name for p in params[cut + 1:] if p.name in links
                and p.default is inspect.Parameter.empty]
    return acted, links, required


def _outputs(transform: Callable[..., Any], acted: list[str], result: Any) -> tuple[Any, ...]:
    """The returned objects, checked against the roles the signature promised."""
    if (not isinstance(result, tuple) or len(result) != len(acted) + 1
            or not isinstance(result[-1], Context)):
        raise IncompatibleOptionsError(
            f"{_name(transform)} must return ({', '.join(acted)}, ctx) like every transform; "
            f"it returned {type(result).__name__}"
            + (f" of {len(result)} items" if isinstance(result, tuple) else "")
        )
    return result[:-1]


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
        for transform, acted, links, required in plans:
            missing = [role for role in (*acted, *required) if role not in objects]
            if missing:
                raise IncompatibleOptionsError(
                    f"{_name(transform)} needs {missing}; pass them to the pipeline"
                )
            result = transform(*(objects[r] for r in acted), ctx,
                               **{r: objects[r] for r in links if r in objects})
            objects.update(zip(acted, _outputs(transform, acted, result), strict=True))
            ctx = result[-1]
        return objects, ctx

    return pipeline
