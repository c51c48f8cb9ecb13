"""init_empty_weights / init_on_device / compute_module_sizes, on real modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from accel.errors import InvalidArgumentError
from accel.inference import compute_module_sizes, init_empty_weights, init_on_device
from accel.inference.empty import to_dtype


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.register_buffer("positions", torch.arange(5))          # int64, persistent
        self.register_buffer("scale", torch.ones(3), persistent=False)


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_parameters_on_meta_buffers_real_by_default():
    with init_empty_weights():
        module = WithBuffer()
    assert {p.device.type for p in module.parameters()} == {"meta"}
    assert module.positions.device.type == "cpu"
    assert torch.equal(module.positions, torch.arange(5))  # computed values survive
    assert isinstance(module.linear.weight, nn.Parameter)
    assert module.linear.weight.requires_grad


def test_include_buffers_puts_everything_on_meta():
    with init_empty_weights(include_buffers=True):
        module = WithBuffer()
    assert {t.device.type for t in [*module.parameters(), *module.buffers()]} == {"meta"}


def test_the_hooks_are_gone_after_the_block():
    with init_empty_weights(include_buffers=True):
        nn.Linear(2, 2)
    after = WithBuffer()
    assert {t.device.type for t in [*after.parameters(), *after.buffers()]} == {"cpu"}
    with pytest.raises(RuntimeError), init_empty_weights():
        raise RuntimeError("inside")
    assert nn.Linear(2, 2).weight.device.type == "cpu"  # removed on an exception too


def test_init_on_device_keeps_requires_grad_and_parameter_class():
    with init_on_device("meta"):
        linear = nn.Linear(3, 3)
        linear.weight.requires_grad_(False)
        frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
        linear.register_parameter("extra", frozen)
    assert linear.extra.device.type == "meta" and not linear.extra.requires_grad
    assert type(linear.extra) is nn.Parameter


def test_a_four_gigabyte_model_allocates_no_parameter_memory():
    before = resident_bytes()
    with init_empty_weights():
        model = nn.Sequential(*[nn.Linear(8192, 8192) for _ in range(16)])  # 4.0 GiB fp32
    grown = resident_bytes() - before
    size = compute_module_sizes(model)[""]
    assert size > 4 * 2**30
    assert grown < 64 * 2**20, f"building on meta grew RSS by {grown / 2**20:.0f} MiB"


def test_compute_module_sizes_counts_every_module_and_tensor():
    model = nn.Sequential(WithBuffer(), nn.Linear(3, 2, bias=False))
    sizes = compute_module_sizes(model)
    assert sizes["0.linear.weight"] == 12 * 4 and sizes["0.linear.bias"] == 3 * 4
    assert sizes["0.positions"] == 5 * 8 and sizes["0.scale"] == 3 * 4
    assert sizes["0"] == (12 + 3 + 3) * 4 + 5 * 8
    assert sizes["1"] == 6 * 4
    assert sizes[""] == sizes["0"] + sizes["1"]


def test_sizes_at_a_dtype_keep_integer_buffers_and_count_tied_once():
    model = nn.Sequential(WithBuffer(), nn.Linear(4, 3))
    model[1].weight = model[0].linear.weight  # tied
    sizes = compute_module_sizes(model, dtype="bf16")
    assert sizes["0.positions"] == 5 * 8          # int64 is not a floating weight
    assert sizes["0.linear.weight"] == 12 * 2
    assert "1.weight" not in sizes                 # counted once, under its first name
    assert sizes[""] == (12 + 3 + 3 + 3) * 2 + 5 * 8


def test_sizes_of_a_meta_model_match_the_real_one():
    torch.manual_seed(0)
    real = nn.Sequential(nn.Linear(10, 20), nn.LayerNorm(20))
    with init_empty_weights():
        empty = nn.Sequential(nn.Linear(10, 20), nn.LayerNorm(20))
    assert compute_module_sizes(empty) == compute_module_sizes(real)


def test_dtype_names():
    assert to_dtype("bf16") is torch.bfloat16 and to_dtype("torch.float16") is torch.float16
    with pytest.raises(InvalidArgumentError, match="unknown dtype"):
        to_dtype("float8")
    with pytest.raises(InvalidArgumentError, match="floating"):
        to_dtype(torch.int8)
