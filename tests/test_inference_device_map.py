"""infer_device_map / explain_device_map / check_device_map: placement rules and errors.

Maps may name GPUs this machine does not have: planning needs only the budgets.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from accel import Context
from accel.errors import InvalidArgumentError
from accel.inference import (
    check_device_map,
    compute_module_sizes,
    explain_device_map,
    infer_device_map,
    init_empty_weights,
)
from accel.inference.blocks import owner_entry
from accel.inference.memory import device_name, format_size, memory_budgets, parse_size

WIDTH = 32
BLOCK_BYTES = (WIDTH * 4 * WIDTH + 4 * WIDTH + 4 * WIDTH * WIDTH + WIDTH + 2 * WIDTH) * 4


class Block(nn.Module):
    """A residual block: never to be split across devices."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    """Embedding, blocks, head; the head's weight is the embedding's (tied)."""

    _no_split_modules = ("Block",)  # as transformers models declare theirs

    def __init__(self, layers: int = 6, vocab: int = 100):
        super().__init__()
        self.embed = nn.Embedding(vocab, WIDTH)
        self.body = nn.Module()
        self.body.blocks = nn.ModuleList(Block() for _ in range(layers))
        self.body.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.body.blocks:
            x = block(x)
        return self.head(self.body.norm(x))


def empty_model(layers: int = 6) -> TinyLM:
    with init_empty_weights():
        return TinyLM(layers)


def bytes_on(model: nn.Module, device_map: dict[str, str], device: str) -> int:
    """Bytes of the unique tensors whose owner entry is on `device`."""
    seen: dict[int, int] = {}
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    for name, tensor in named.items():
        if device_map[owner_entry(name, device_map)] == device:
            seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def test_everything_fits_on_the_first_device():
    assert infer_device_map(empty_model(), max_memory={"cpu": "1GiB"}) == {"": "cpu"}
    assert infer_device_map(empty_model(), max_memory={0: "1GiB", "cpu": "1GiB"}) == {
        "": "cuda:0"}


def test_blocks_fill_gpus_in_order_then_cpu_then_disk():
    model = empty_model()
    embed = 100 * WIDTH * 4
    # cuda:0 keeps one block of room for running offloaded blocks (prefetch=0).
    device_map = infer_device_map(
        model, max_memory={0: embed + 3 * BLOCK_BYTES, 1: BLOCK_BYTES + 100, "cpu": BLOCK_BYTES},
        no_split_module_classes=["Block"], balanced=False, prefetch=0)
    assert device_map == {
        "embed": "cuda:0", "head": "cuda:0",
        "body.blocks.0": "cuda:0", "body.blocks.1": "cuda:0",
        "body.blocks.2": "cuda:1", "body.blocks.3": "cpu",
        "body.blocks.4": "disk", "body.blocks.5": "disk", "body.norm": "disk",
    }


def test_tied_weights_go_to_one_device_even_when_far_apart():
    model = empty_model()
    # Room for the embedding and the block reserved for running offloaded ones: the head
    # (tied to the embedding) joins it there.
    device_map = infer_device_map(model, max_memory={0: 100 * WIDTH * 4 + BLOCK_BYTES,
                                                     "cpu": "1GiB"},
                                  no_split_module_classes=["Block"], prefetch=0)
    assert device_map["embed"] == device_map["head"] == "cuda:0"
    assert check_device_map(model, device_map) == device_map
    with pytest.raises(InvalidArgumentError, match="tied tensors"):
        check_device_map(model, {"embed": "cpu", "head": 0, "body": "cpu"})


def test_reserves_room_on_the_gpu_for_offloaded_blocks():
    model = empty_model()
    budget = 100 * WIDTH * 4 + 4 * BLOCK_BYTES
    without = infer_device_map(model, max_memory={0: budget, "cpu": "1GiB"}, prefetch=0,
                               no_split_module_classes=["Block"])
    with_prefetch = infer_device_map(model, max_memory={0: budget, "cpu": "1GiB"}, prefetch=2,
                                     no_split_module_classes=["Block"])
    gpu_blocks = lambda m: sum(1 for k, v in m.items() if v == "cuda:0" and "blocks" in k)
    # One block of room (the block running) without prefetch, three with two prefetched.
    assert gpu_blocks(without) == 3 and gpu_blocks(with_prefetch) == 1
    text = explain_device_map(model, max_memory={0: budget, "cpu": "1GiB"}, prefetch=2,
                              no_split_module_classes=["Block"])
    assert "reserved" in text and "(1 + prefetch 2)" in text


def test_balanced_spreads_over_gpus_when_the_model_fits():
    model = empty_model()
    sequential = infer_device_map(model, max_memory={0: "1GiB", 1: "1GiB"}, balanced=False)
    balanced = infer_device_map(model, max_memory={0: "1GiB", 1: "1GiB"},
                                no_split_module_classes=["Block"])
    assert set(sequential.values()) == {"cuda:0"}
    assert set(balanced.values()) == {"cuda:0", "cuda:1"}
    total = compute_module_sizes(model)[""]
    assert bytes_on(model, balanced, "cuda:0") <= total / 2 + BLOCK_BYTES


def test_explanation_tells_where_and_why():
    text = explain_device_map(empty_model(), max_memory={"cpu": 100 * WIDTH * 4 + BLOCK_BYTES},
                              no_split_module_classes=["Block"])
    assert "budgets: cpu" in text and "disk unlimited" in text
    assert "split: does not fit" in text
    assert "tied to embed: placed with it" in text
    assert "cpu is full for it" in text and "moving on to disk" in text
    assert "no-split class Block, kept whole" in text


@settings(max_examples=60, deadline=None)
@given(gpu=st.integers(0, 60_000), cpu=st.integers(0, 60_000), layers=st.integers(1, 5),
       prefetch=st.integers(0, 2))
def test_map_rules_hold_for_any_budget(gpu, cpu, layers, prefetch):
    model = empty_model(layers)
    max_memory = {0: gpu, "cpu": cpu}
    device_map = infer_device_map(model, max_memory=max_memory, prefetch=prefetch,
                                  no_split_module_classes=["Block"])
    # Same inputs, same map: on the same model and on a freshly built one.
    assert infer_device_map(model, max_memory=max_memory, prefetch=prefetch,
                            no_split_module_classes=["Block"]) == device_map
    assert infer_device_map(empty_model(layers), max_memory=max_memory, prefetch=prefetch,
                            no_split_module_classes=["Block"]) == device_map
    check_device_map(model, device_map)  # complete, tied tensors together
    for name in device_map:  # no-split blocks are never split
        assert not any(name.startswith(f"body.blocks.{i}.") for i in range(layers))
    assert bytes_on(model, device_map, "cuda:0") <= gpu
    assert bytes_on(model, device_map, "cpu") <= cpu
    order = ["cuda:0", "cpu", "disk"]  # blocks never go back to an earlier device
    block_devices = [order.index(device_map[f"body.blocks.{i}"]) for i in range(layers)
                     if f"body.blocks.{i}" in device_map]
    assert block_devices == sorted(block_devices)


def test_the_model_own_no_split_list_is_used():
    model = empty_model()
    model._no_split_modules = ["Block"]
    device_map = infer_device_map(model, max_memory={"cpu": BLOCK_BYTES // 2})
    assert "body.blocks.0" in device_map and "body.blocks.0.up" not in device_map
    leaves = infer_device_map(model, max_memory={"cpu": BLOCK_BYTES // 2},
                              no_split_module_classes=[])
    assert "body.blocks.0.up" in leaves


def test_ctx_limits_the_map_to_its_own_gpu():
    budgets = memory_budgets({0: 10, 1: 20, "cpu": 30}, accelerators=["cuda:1"])
    assert [b.device for b in budgets] == ["cuda:1", "cpu", "disk"]
    device_map = infer_device_map(empty_model(), max_memory={0: "1GiB", "cpu": "1GiB"},
                                  ctx=Context())  # a CPU process: no GPU of its own
    assert device_map == {"": "cpu"}


def test_check_device_map_errors():
    model = empty_model()
    with pytest.raises(InvalidArgumentError, match="neither modules nor tensors"):
        check_device_map(model, {"nope": "cpu", "": "cpu"})
    with pytest.raises(InvalidArgumentError, match="places no device"):
        check_device_map(model, {"embed": "cpu", "head": "cpu"})
    with pytest.raises(InvalidArgumentError, match="non-empty dict"):
        check_device_map(model, {})
    assert check_device_map(model, {"": 1}) == {"": "cuda:1"}
    assert check_device_map(model, {"body": "disk", "": "cpu"}) == {"body": "disk", "": "cpu"}


def test_sizes_and_device_names():
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("1.5 GB") == 1_500_000_000
    assert parse_size(123) == 123
    assert format_size(3 * 2**20) == "3.00 MiB"
    assert device_name(0) == "cuda:0" and device_name("disk") == "disk"
    assert device_name(torch.device("cpu")) == "cpu" and device_name("cuda") == "cuda:0"
    for bad in ("ten", "-1GB", "5 parsecs"):
        with pytest.raises(InvalidArgumentError, match="memory size"):
            parse_size(bad)
    with pytest.raises(InvalidArgumentError, match="unknown device"):
        device_name("gpu7")
    with pytest.raises(InvalidArgumentError, match="twice"):
        memory_budgets({0: 1, "cuda:0": 2})
    with pytest.raises(InvalidArgumentError, match="prefetch"):
        infer_device_map(empty_model(), max_memory={"cpu": 1}, prefetch=-1)


def test_free_memory_is_read_when_no_budget_is_given():
    budgets = memory_budgets(None)
    cpu = next(b for b in budgets if b.device == "cpu")
    assert cpu.bytes > 0 and "available RAM" in cpu.source
    assert budgets[-1].device == "disk"
    assert infer_device_map(empty_model()) == {"": "cpu"}  # a tiny model fits in RAM
