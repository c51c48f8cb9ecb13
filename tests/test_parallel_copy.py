"""Whole tensors copied into a plain module on several threads equal torch's load_state_dict,
and anything torch would do more (hooks, own loading, other names) is left to torch."""

from __future__ import annotations

import torch
from torch import nn

from accel.backends import _parallel_copy
from accel.backends._parallel_copy import copy_into


def model() -> nn.Module:
    layers = nn.Sequential(nn.Linear(300, 700), nn.LayerNorm(700), nn.Linear(700, 3))
    layers[2].weight = nn.Parameter(torch.randn(3, 700))
    return layers


def test_the_copies_in_pieces_equal_load_state_dict(monkeypatch):
    monkeypatch.setattr(_parallel_copy, "PIECE", 4096)  # many pieces, tensors cut unevenly
    source, target, expected = model(), model(), model()
    state = source.state_dict()
    expected.load_state_dict(state)
    target_parameters = list(target.parameters())
    assert copy_into(target, state)
    assert list(target.parameters()) == target_parameters  # the module's own tensors
    for name, value in expected.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name


def test_what_torch_does_more_is_left_to_it():
    hooked = model()
    hooked[0].register_load_state_dict_post_hook(lambda module, keys: None)
    state = model().state_dict()
    assert not copy_into(hooked, state)
    assert not copy_into(nn.BatchNorm1d(4), nn.BatchNorm1d(4).state_dict())  # its own loading
    assert not copy_into(model(), {**state, "extra": torch.ones(1)})
    assert not copy_into(model(), {**state, "0.weight": torch.ones(300, 700)})  # shape
    assert not copy_into(nn.Sequential(nn.Linear(300, 700)).to("meta"),
                         nn.Sequential(nn.Linear(300, 700)).state_dict())
