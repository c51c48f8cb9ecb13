"""Every engine module implements the whole strategy protocol, and names live in one place."""

from __future__ import annotations

import importlib
import inspect

import pytest

import accel
from accel.backends import (
    CAPABILITIES,
    BuiltinStrategy,
    Strategy,
    builtin_names,
    engine_of,
    resolve_strategy,
    strategy_named,
)
from accel.context import Context
from accel.errors import IncompatibleOptionsError

PROTOCOL = {
    name: [p for p in inspect.signature(member).parameters if p != "self"]
    for name, member in vars(Strategy).items()
    if inspect.isfunction(member) and not name.startswith("_")
}
ENGINES = builtin_names()


def test_the_protocol_is_not_empty():
    assert {"wrap_model", "unwrap_model", "wrap_optimizer", "set_grad_sync", "backward",
            "clip_grad_norm", "get_state_dict", "set_state_dict", "join"} <= set(PROTOCOL)


def test_the_engines_are_the_modules_of_the_package():
    assert ENGINES == ["custom", "ddp", "deepspeed", "fsdp", "single", "xla"]


@pytest.mark.parametrize("name", ENGINES)
def test_engine_module_implements_the_protocol(name):
    module = importlib.import_module(f"accel.backends.{name}")
    config = module.STRATEGY
    assert issubclass(config, BuiltinStrategy) and config.name == name
    assert set(config.capabilities) <= set(CAPABILITIES)
    for method, params in PROTOCOL.items():
        function = getattr(module, method, None)
        assert callable(function), f"{module.__name__} lacks {method}()"
        expected = [*params, "strategy"] if method == "wrap_model" else params
        got = list(inspect.signature(function).parameters)
        assert got == expected, f"{module.__name__}.{method}{tuple(got)} != {tuple(expected)}"


def test_strategies_are_found_by_name_and_the_default_is_single():
    assert engine_of(Context()) == accel.Single()
    assert strategy_named("ddp") == accel.DDP()
    assert resolve_strategy("FSDP", Context()) == accel.FSDP()
    with pytest.raises(IncompatibleOptionsError, match="unknown strategy 'tpu'.*'ddp'"):
        strategy_named("tpu")
    with pytest.raises(IncompatibleOptionsError, match=r"needs options: pass accel.Custom"):
        strategy_named("custom")


def test_an_object_that_is_not_a_strategy_is_refused_naming_what_it_lacks():
    class Half:
        name = "half"
        capabilities = frozenset()

        def wrap_model(self, model, ctx):
            return model

    with pytest.raises(IncompatibleOptionsError, match="lacks.*'unwrap_model'"):
        resolve_strategy(Half(), Context())


def test_unknown_capabilities_are_refused():
    class Boasting(accel.Strategy):
        capabilities = frozenset({"teleports"})

    with pytest.raises(IncompatibleOptionsError, match="unknown capabilities.*teleports"):
        resolve_strategy(Boasting(), Context())
