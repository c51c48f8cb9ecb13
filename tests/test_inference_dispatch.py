"""dispatch_model / remove_dispatch on the CPU: disk blocks as memory-mapped files, loaded
just in time and prefetched on a background thread; the copy path's logic on CPU tensors."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from test_inference_device_map import TinyLM
from torch import nn

from accel.errors import InvalidArgumentError, TransformOrderError
from accel.inference import (
    dispatch_model,
    dispatch_stats,
    dispatched_device_map,
    init_empty_weights,
    remove_dispatch,
)
from accel.inference.units import CopyLoader, Schedule, Unit

LAYERS = 4
SPLIT_MAP = {"embed": "cpu", "head": "cpu", "body.blocks.0": "cpu", "body.blocks.1": "disk",
             "body.blocks.2": "disk", "body.blocks.3": "disk", "body.norm": "disk"}
DISK_UNITS = 4  # blocks 1-3 and the final norm


def make_model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(LAYERS).eval()


def inputs() -> torch.Tensor:
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose mapping holds the tensor's memory, from /proc/self/maps."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                path = fields[5] if len(fields) > 5 else ""
                return path if path.startswith("/") else None
    return None


def resident_bytes_of(path: str) -> int:
    """Bytes of `path` mapped and resident in this process (all its mappings)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = len(fields) > 5 and fields[5] == path
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "accel-prefetch"]


def test_cpu_and_disk_blocks_give_the_same_outputs(tmp_path):
    reference = make_model()
    model = dispatch_model(copy.deepcopy(reference), SPLIT_MAP, offload_dir=tmp_path)
    try:
        with torch.no_grad():
            assert torch.equal(model(inputs()), reference(inputs()))
            assert torch.equal(model(inputs()), reference(inputs()))  # and again, prefetched
        assert model.head.weight is model.embed.weight
        block = model.body.blocks[2].up.weight
        assert mapped_file(block) == str(tmp_path / "body.blocks.2.safetensors")
        assert mapped_file(model.body.blocks[0].up.weight) is None  # cpu: plain memory
        assert dispatched_device_map(model) == SPLIT_MAP
    finally:
        remove_dispatch(model)


def test_prefetch_thread_loads_every_block_ahead(tmp_path):
    model = dispatch_model(make_model(), SPLIT_MAP, offload_dir=tmp_path, prefetch=2,
                           release_after_use=True)
    try:
        assert len(prefetch_threads()) == 1
        with torch.no_grad():
            for _ in range(3):
                model(inputs())
        stats = dispatch_stats(model)
        # Only the first block of the first pass loads inline; the order wraps around,
        # so the next pass's first blocks load while the last ones compute.
        assert (stats.inline, stats.prefetched) == (1, 3 * DISK_UNITS - 1)
    finally:
        remove_dispatch(model)
    assert not prefetch_threads()
    assert not model._forward_pre_hooks and not model.body.blocks[1]._forward_pre_hooks


def test_without_prefetch_every_block_loads_inline(tmp_path):
    model = dispatch_model(make_model(), SPLIT_MAP, offload_dir=tmp_path, prefetch=0,
                           release_after_use=True)
    try:
        assert not prefetch_threads()
        with torch.no_grad():
            model(inputs())
            model(inputs())
        stats = dispatch_stats(model)
        assert (stats.inline, stats.prefetched) == (2 * DISK_UNITS, 0)
        assert stats.inline_s > 0 and stats.wait_s == 0
    finally:
        remove_dispatch(model)


def test_disk_weights_are_paged_in_for_their_block_and_dropped_after(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(3)])  # 1 MiB per layer
    files = [str(tmp_path / f"{i}.safetensors") for i in range(3)]
    dispatch_model(model, {str(i): "disk" for i in range(3)}, offload_dir=tmp_path, prefetch=0,
                   release_after_use=True)
    seen_during = {}
    # A pre-hook registered after dispatch's runs once the block's weights are in.
    model[1].register_forward_pre_hook(
        lambda *_: seen_during.update(own=resident_bytes_of(files[1]),
                                      before=resident_bytes_of(files[0])))
    try:
        with torch.no_grad():
            model(torch.ones(1, 512))
        assert seen_during["own"] >= 2**20          # the running block is resident
        assert seen_during["before"] <= 2 * 4096    # the finished one dropped (edge pages)
        assert all(resident_bytes_of(f) <= 2 * 4096 for f in files)
    finally:
        remove_dispatch(model)


def test_small_disk_blocks_stay_mapped_between_passes_by_default(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(3)])
    dispatch_model(model, {str(i): "disk" for i in range(3)}, offload_dir=tmp_path)
    try:
        assert not dispatch_stats(model).release_after_use  # 3 MiB fit in RAM many times
        with torch.no_grad():
            model(torch.ones(1, 512))
            model(torch.ones(1, 512))
        # Still mapped after the pass: the next one takes no page fault.
        assert resident_bytes_of(str(tmp_path / "1.safetensors")) >= 2**20
        # Freshly written, the files are in the page cache: nothing to load, ever.
        stats = dispatch_stats(model)
        assert (stats.in_memory, stats.inline, stats.prefetched) == (6, 0, 0)
    finally:
        remove_dispatch(model)


def test_an_exception_inside_a_block_leaves_the_model_usable(tmp_path):
    reference = make_model()
    model = dispatch_model(copy.deepcopy(reference), SPLIT_MAP, offload_dir=tmp_path)
    failures = iter([True])

    def fail_once(*_):
        if next(failures, False):
            raise RuntimeError("boom")

    handle = model.body.blocks[2].register_forward_pre_hook(fail_once)
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
            model(inputs())
        with torch.no_grad():
            assert torch.equal(model(inputs()), reference(inputs()))
    finally:
        handle.remove()
        remove_dispatch(model)


def test_tied_weights_offloaded_together_stay_tied(tmp_path):
    reference = make_model()
    model = dispatch_model(copy.deepcopy(reference), {"": "disk"}, offload_dir=tmp_path)
    try:
        assert model.head.weight is model.embed.weight
        assert mapped_file(model.head.weight) == str(tmp_path / "model.safetensors")
        with torch.no_grad():
            assert torch.equal(model(inputs()), reference(inputs()))
    finally:
        remove_dispatch(model)


def test_dispatch_errors(tmp_path):
    with pytest.raises(InvalidArgumentError, match="offload_dir"):
        dispatch_model(make_model(), {"": "disk"})
    with init_empty_weights():
        empty = TinyLM(LAYERS)
    with pytest.raises(InvalidArgumentError, match="meta device"):
        dispatch_model(empty, {"": "cpu"})
    with pytest.raises(InvalidArgumentError, match="prefetch"):
        dispatch_model(make_model(), {"": "cpu"}, prefetch=-1)
    with pytest.raises(InvalidArgumentError, match="main_device"):
        dispatch_model(make_model(), {"": "cpu"}, main_device="disk")
    model = dispatch_model(make_model(), {"": "cpu"})
    with pytest.raises(TransformOrderError, match="already dispatched"):
        dispatch_model(model, {"": "cpu"})
    remove_dispatch(model)
    with pytest.raises(TransformOrderError, match="not dispatched"):
        remove_dispatch(model)
    with pytest.raises(TransformOrderError, match="not dispatched"):
        dispatch_stats(model)


def _units_of(model: nn.Module) -> list[Unit]:
    return [Unit(i, str(i), layer, list(layer.parameters()),
                 [p.data for p in layer.parameters()], [])
            for i, layer in enumerate(model)]


def test_copy_loader_swaps_weights_in_and_back():
    # The accelerator path's logic, run with CPU tensors (no stream, no event).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    units = _units_of(model)
    loader = CopyLoader(torch.device("cpu"))
    loaded = loader.load(units[0], background=True)
    loader.install(units[0], loaded)
    assert model[0].weight.data_ptr() != units[0].sources[0].data_ptr()
    assert torch.equal(model[0].weight, units[0].sources[0])
    loader.unload(units[0])
    assert model[0].weight.data_ptr() == units[0].sources[0].data_ptr()


def test_schedule_follows_the_observed_order():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])
    units = _units_of(model)
    schedule = Schedule(units, CopyLoader(torch.device("cpu")), depth=1)
    per_pass = []
    try:
        for order in ([0, 1, 2, 3], [3, 2, 1, 0], [3, 2, 1, 0], [3, 2, 1, 0]):
            before = schedule.stats
            schedule.start_pass()
            for index in order:
                schedule.enter(units[index])
                schedule.leave(units[index])
            schedule.end_pass()
            per_pass.append((schedule.stats.inline - before.inline,
                             schedule.stats.prefetched - before.prefetched))
        assert schedule.order == [3, 2, 1, 0]
        # Pass 1 follows the first guess (the map's order); pass 2 goes against it; from
        # pass 3 on the observed order is used, and from pass 4 it wraps around as well.
        assert per_pass[0] == (1, 3) and per_pass[3] == (0, 4)
        assert per_pass[1][0] >= 2
    finally:
        schedule.close()
