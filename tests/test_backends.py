"""Every backend module provides the whole `Backend` protocol, with the same parameter names."""

from __future__ import annotations

import importlib
import inspect

import pytest

from accel.backends import BACKEND_MODULES, Backend, backend_for, load_backend
from accel.context import Context
from accel.errors import AccelError

PROTOCOL = {
    name: [p for p in inspect.signature(member).parameters if p != "self"]
    for name, member in vars(Backend).items()
    if inspect.isfunction(member) and not name.startswith("_")
}


def test_the_protocol_is_not_empty():
    assert {"wrap_model", "unwrap_model", "wrap_optimizer", "set_grad_sync", "backward",
            "clip_grad_norm"} <= set(PROTOCOL)


@pytest.mark.parametrize("backend", sorted(BACKEND_MODULES))
def test_backend_module_implements_the_protocol(backend):
    module = importlib.import_module(BACKEND_MODULES[backend])
    for name, params in PROTOCOL.items():
        function = getattr(module, name, None)
        assert callable(function), f"{module.__name__} lacks {name}()"
        got = list(inspect.signature(function).parameters)
        assert got == params, (
            f"{module.__name__}.{name}{tuple(got)} != Backend.{name}{tuple(params)}")


def test_backends_are_found_by_name():
    assert backend_for(Context()).__name__ == "accel.backends.single"
    assert load_backend("ddp").__name__ == "accel.backends.ddp"
    with pytest.raises(AccelError, match="unknown backend 'tpu'.*'ddp'"):
        load_backend("tpu")
