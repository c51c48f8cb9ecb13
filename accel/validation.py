"""Argument checks of the public functions: one call at the top of a function per argument.

Core layer: imports accel.errors and the standard library only, so every layer can use
it (torch, for the checks of torch objects, on call). Each check is an isinstance or a
comparison (backward and clip_grad_norm run them every step) and raises an error that
names the function, the argument, the value and what is allowed:
"accel.clip_grad_norm: max_norm must be a finite number > 0, got -1".
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from accel.errors import InvalidArgumentError, InvalidArgumentTypeError, InvalidOptionError

_REPR_LIMIT = 80
#: timedelta(seconds=...) overflows past about 10**14 seconds; no run waits that long.
_MAX_SECONDS = 10**12


def shown(value: Any) -> str:
    """`value` as a message shows it: its repr, cut short (a model's repr is pages long)."""
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[:_REPR_LIMIT - 3] + "..."


def fail(function: str, name: str, value: Any, allowed: str, *, wrong_type: bool = True,
         error: type[Exception] | None = None) -> NoReturn:
    """Raise the error of argument `name` of accel.`function`, which must be `allowed`.

    wrong_type: the value's type is wrong (InvalidArgumentTypeError, also a TypeError);
    else the type is right and the value is not (InvalidArgumentError, a ValueError).
    error: another accel error class, where a function raised that one before.
    """
    got = shown(value)
    if wrong_type and value is not None:  # "got str 'sgd'": the type is the news
        got = f"{type(value).__name__} {got}"
    if error is None:
        error = InvalidArgumentTypeError if wrong_type else InvalidArgumentError
    raise error(f"accel.{function}: {name} must be {allowed}, got {got}")


def check_type(function: str, name: str, value: Any, expected: type | tuple[type, ...],
               allowed: str, *, optional: bool = False,
               error: type[Exception] | None = None) -> None:
    """`value` is an instance of `expected` (or None when `optional`)."""
    if not (isinstance(value, expected) or (optional and value is None)):
        fail(function, name, value, allowed, error=error)


def check_bool(function: str, name: str, value: Any, *, optional: bool = False) -> None:
    """True or False (or None when `optional`): not 1, not "yes"."""
    if not (value is True or value is False or (optional and value is None)):
        fail(function, name, value, "True or False" + (" (or None)" if optional else ""))


def check_int(function: str, name: str, value: Any, *, minimum: int | None = None,
              maximum: int | None = None, optional: bool = False) -> None:
    """An int (never a bool or a float) within [minimum, maximum] (or None when `optional`)."""
    if optional and value is None:
        return
    if minimum is not None and maximum is not None:
        allowed = f"an int from {minimum} to {maximum}"
    else:
        allowed = "an int" + (f" >= {minimum}" if minimum is not None else "") + (
            f" <= {maximum}" if maximum is not None else "")
    allowed += " (or None)" if optional else ""
    if isinstance(value, bool) or not isinstance(value, int):
        fail(function, name, value, allowed)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        fail(function, name, value, allowed, wrong_type=False)


def check_number(function: str, name: str, value: Any, *, above: float | None = None,
                 minimum: float | None = None, finite: bool = True,
                 optional: bool = False) -> None:
    """An int or float (not a bool, not nan), > `above` / >= `minimum`, finite if asked."""
    if optional and value is None:
        return
    allowed = ("a finite number" if finite else "a number") + (
        f" > {above}" if above is not None else "") + (
        f" >= {minimum}" if minimum is not None else "") + (" (or None)" if optional else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(function, name, value, allowed)
    if (math.isnan(value) or (finite and math.isinf(value))
            or (above is not None and value <= above)
            or (minimum is not None and value < minimum)):
        fail(function, name, value, allowed, wrong_type=False)


def check_seed(function: str, seed: Any, *, optional: bool = False) -> None:
    """A seed torch.manual_seed takes (numpy takes it modulo 2**32): an int in [0, 2**64)."""
    check_int(function, "seed", seed, minimum=0, maximum=2**64 - 1, optional=optional)


def check_str(function: str, name: str, value: Any, *, optional: bool = False) -> None:
    """A non-empty str (or None when `optional`)."""
    check_type(function, name, value, str, "a non-empty str", optional=optional)
    if value == "":
        fail(function, name, value, "a non-empty str", wrong_type=False)


def check_mapping(function: str, name: str, value: Any, allowed: str, *,
                  optional: bool = False) -> None:
    """A Mapping (dict); `allowed` says of what."""
    check_type(function, name, value, Mapping, allowed, optional=optional)


def check_callable(function: str, name: str, value: Any, allowed: str, *,
                   optional: bool = False) -> None:
    """Something to call (a function, a class, a functools.partial)."""
    if not (callable(value) or (optional and value is None)):
        fail(function, name, value, allowed)


def check_context(function: str, ctx: Any, *, name: str = "ctx", optional: bool = False
                  ) -> None:
    """The accel.Context a transform takes, not a model, a str or None."""
    from accel.context import Context  # on call: the context module imports this one

    if not (isinstance(ctx, Context) or (optional and ctx is None)):
        fail(function, name, ctx, "an accel.Context (from accel.init() or accel.Context())"
             + (" or None" if optional else ""))


def check_module(function: str, name: str, value: Any) -> None:
    """A torch nn.Module (imported on call: this layer imports nothing but the stdlib)."""
    from torch import nn

    check_type(function, name, value, nn.Module, "a torch nn.Module")


def check_device(function: str, name: str, value: Any, *, optional: bool = False) -> None:
    """A torch.device or a str torch reads as one ("cpu", "cuda:1", "mps")."""
    import torch

    allowed = "a device such as 'cpu', 'cuda', 'cuda:1' or a torch.device" + (
        " (or None)" if optional else "")
    check_type(function, name, value, (str, torch.device), allowed, optional=optional)
    if isinstance(value, str):
        try:
            torch.device(value)
        except RuntimeError:
            fail(function, name, value, allowed, wrong_type=False)


def check_timeout(function: str, name: str, value: Any, *, optional: bool = False) -> None:
    """A finite number of seconds > 0, or a datetime.timedelta > 0."""
    allowed = "a finite number of seconds > 0 or a datetime.timedelta" + (
        " (or None)" if optional else "")
    if optional and value is None:
        return
    if isinstance(value, datetime.timedelta):
        if value.total_seconds() <= 0:
            fail(function, name, value, allowed, wrong_type=False)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(function, name, value, allowed)
    if not (math.isfinite(value) and 0 < value < _MAX_SECONDS):
        fail(function, name, value, allowed, wrong_type=False)


def option_validator(config: str, check: Callable[..., None], *args: Any, **kwargs: Any
                     ) -> Callable[[Any, Any, Any], None]:
    """An attrs validator of a strategy config's field: `check(config, field, value, ...)`.

    It raises InvalidOptionError, so code that caught the IncompatibleOptionsError
    shard_model raised for a bad option still catches it now that the config refuses it.
    """
    def validate(instance: Any, attribute: Any, value: Any) -> None:
        try:
            check(config, attribute.name, value, *args, **kwargs)
        except InvalidArgumentError as exc:
            raise InvalidOptionError(str(exc)) from None

    return validate
