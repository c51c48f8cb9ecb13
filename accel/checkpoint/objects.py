"""What a checkpoint holds: one model (and its optimizer, scheduler, loader) or many, by name.

`save_state` / `load_state` take either the single form (``model=``, ``optimizer=``,
``scheduler=``, ``loader=``) or the named form (``models={"generator": g, ...}``,
``optimizers={"generator": opt_g, ...}``, ``schedulers={...}``, ``loaders={...}``).
An optimizer is named after the model whose parameters it steps (its state is keyed by
that model's parameter names); schedulers and loaders take any names. Internally both
forms are `Objects`; the single form keeps the file names and metadata of accel's
earlier checkpoints (``model.safetensors``, ``optimizer/``, ``saved.tied``, ...), the
named form writes ``models/NAME``, ``optimizers/NAME`` and lists every name in
accel.json (see `accel.checkpoint.common` for the layout).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs
from torch import nn

from accel.errors import IncompatibleOptionsError, InvalidArgumentError
from accel.validation import check_mapping, check_module, fail

#: the kinds of objects, their keyword in the single form and in the named form.
KINDS = ("model", "optimizer", "scheduler", "loader")
#: the single form's object names (an optimizer is named after its model).
SINGLE_NAMES = {"model": "model", "optimizer": "model", "scheduler": "scheduler",
                "loader": "loader"}
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@attrs.frozen
class Objects:
    """The objects of one save or load, by kind and name."""

    models: dict[str, nn.Module]
    optimizers: dict[str, Any]
    schedulers: dict[str, Any]
    loaders: dict[str, Any]
    #: given as model=, optimizer=, ... (the layout of earlier accel checkpoints).
    single: bool

    def of(self, kind: str) -> dict[str, Any]:
        return getattr(self, f"{kind}s")

    def part(self, kind: str, name: str) -> str:
        """The part (file stem or folder) a model's or optimizer's state goes to."""
        return kind if self.single else f"{kind}s/{name}"


def collect(function: str, single: Mapping[str, Any], named: Mapping[str, Any]) -> Objects:
    """The `Objects` of a call, from its single-form and named-form keyword arguments.

    Raises:
        InvalidArgumentError: both forms, neither model nor models, a name that is not a
            plain file name, an optimizer named after no model, or a value of a wrong type.
    """
    given = [kind for kind in KINDS if single[kind] is not None]
    named_given = [f"{kind}s" for kind in KINDS if named[f"{kind}s"] is not None]
    if given and named_given:
        raise InvalidArgumentError(
            f"{function} got {given[0]}= and {named_given[0]}=: pass the single form "
            "(model=, optimizer=, scheduler=, loader=) or the named form (models={...}, "
            "optimizers={...}, schedulers={...}, loaders={...}), not both")
    if not named_given:
        check_module(function, "model", single["model"])
        return Objects(single=True, **{
            f"{kind}s": {} if single[kind] is None else {SINGLE_NAMES[kind]: single[kind]}
            for kind in KINDS})
    values = {f"{kind}s": _named(function, f"{kind}s", named[f"{kind}s"]) for kind in KINDS}
    if not values["models"]:
        fail(function, "models", named["models"], "a non-empty dict {name: model}",
             wrong_type=named["models"] is not None)
    for name, model in values["models"].items():
        check_module(function, f"models[{name!r}]", model)
    strays = sorted(set(values["optimizers"]) - set(values["models"]))
    if strays:
        raise InvalidArgumentError(
            f"{function} got optimizers named {strays}, which name no model of models= "
            f"{sorted(values['models'])}; name each optimizer after the model whose "
            "parameters it steps")
    return Objects(single=False, **values)


def _named(function: str, argument: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    check_mapping(function, argument, value, "a dict {name: object}")
    for name in value:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            fail(function, argument, value, "a dict whose keys are names of letters, digits, "
                 "'_', '-' and '.' (they name the checkpoint's files)", wrong_type=False)
    return dict(value)


# ---------------------------------------------------------------- where small states go

def slot(kind: str, name: str, single: bool) -> tuple[str, ...]:
    """Where a scheduler's, loader's or optimizer wrapper's state sits in its tree."""
    return (kind,) if single else (f"{kind}s", name)


def put(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key] if isinstance(tree, Mapping) and key in tree else None
        if tree is None:
            return None
    return tree


# ---------------------------------------------------------------- what accel.json says


def described(saved: Mapping[str, Any]) -> dict[str, Any]:
    """`saved` of any accel.json as {"single", "models": {name: {part, tied, selected}},
    "optimizers": {name: {part, class}}, "schedulers": {name: {class}}, "loaders": [...]}."""
    if "models" in saved:
        return {"single": False, **{key: saved[key] for key in (
            "models", "optimizers", "schedulers", "loaders")}}
    return {
        "single": True,
        "models": {"model": {"part": "model", "tied": saved.get("tied", {}),
                             "selected": saved.get("selected", False)}},
        "optimizers": {"model": {"part": "optimizer", "class": saved.get("optimizer_class")}}
        if saved.get("optimizer") else {},
        "schedulers": {"scheduler": {"class": saved.get("scheduler_class")}}
        if saved.get("scheduler") else {},
        "loaders": ["loader"] if saved.get("loader") else [],
    }


def check_names(objects: Objects, saved: dict[str, Any], final: Any) -> None:
    """The objects asked for are the ones saved, by form and by name.

    Raises:
        IncompatibleOptionsError: another form, or names missing from the checkpoint or
            from the call (each listed, with what to pass).
    """
    if objects.single != saved["single"]:
        names = sorted(saved["models"])
        raise IncompatibleOptionsError(
            f"{final} was saved with " + ("model=..." if saved["single"] else
                                          f"models= named {names}")
            + "; load it in the same form (" + ("model=, optimizer=, scheduler=, loader="
                                                if saved["single"] else
                                                "models={...}, optimizers={...}, ...") + ")")
    for kind in KINDS:
        asked, there = set(objects.of(kind)), set(saved[f"{kind}s"])
        if objects.single:
            if asked - there:
                raise IncompatibleOptionsError(
                    f"load_state was given a {kind}, but {final} was saved without one; "
                    f"pass {kind}=None")
            continue
        if kind != "model" and not asked:
            continue  # optimizers=None, ...: leave them all out
        if asked != there:
            raise IncompatibleOptionsError(
                f"load_state got {kind}s named {sorted(asked)}, but {final} holds {kind}s "
                f"named {sorted(there)}: " + (f"it lacks {sorted(asked - there)}; " if (
                    asked - there) else "") + (f"pass also {sorted(there - asked)}; " if (
                    there - asked) else "") + f"pass {kind}s= with exactly the saved names"
                + ("" if kind == "model" else f" (or none, to leave every {kind} out)"))
