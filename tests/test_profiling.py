"""profile_steps: torch.profiler over a window of steps, one trace per rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from accel.context import Context
from accel.errors import IncompatibleOptionsError
from accel.runtime.profiling import profile_steps
from accel.testing import run_world


def train_steps(ctx: Context, out_dir: str, steps: int, **options) -> list[str]:
    """`steps` steps of a matmul inside a named block; returns the traces written."""
    weight = torch.randn(16, 16)
    with profile_steps(ctx, out_dir, **options) as prof:
        for step in range(steps):
            with torch.profiler.record_function(f"train_block_rank{ctx.rank}"):
                out = torch.randn(8, 16) @ weight
                if dist.is_initialized():
                    dist.all_reduce(out)
            prof.step()
            del step
    return [str(path) for path in prof.traces]


def event_names(path: str) -> set[str]:
    trace = json.loads(Path(path).read_text())
    return {event.get("name") for event in trace["traceEvents"]}


def test_window_writes_one_chrome_trace_per_cycle(tmp_path):
    # wait 1, warmup 1, active 2, twice: the cycles end at steps 4 and 8.
    traces = train_steps(Context(), str(tmp_path), 10, wait=1, warmup=1, active=2,
                         repeat=2, record_shapes=True)
    assert [Path(p).name for p in traces] == ["trace_rank0_step4.json",
                                              "trace_rank0_step8.json"]
    names = event_names(traces[0])
    assert {"train_block_rank0", "aten::mm"} <= names
    assert sorted(tmp_path.iterdir()) == [Path(p) for p in traces]


def test_tensorboard_format(tmp_path):
    traces = train_steps(Context(), str(tmp_path), 3, wait=0, warmup=1, active=1,
                         trace_format="tensorboard")
    assert len(traces) == 1 and Path(traces[0]).name.startswith("rank0.")
    assert traces[0].endswith(".pt.trace.json")
    assert "train_block_rank0" in event_names(traces[0])


@pytest.mark.parametrize(("options", "message"), [
    ({"active": 0}, "active must be an integer >= 1"),
    ({"wait": -1}, "wait must be an integer >= 0"),
    ({"warmup": 1.5}, "warmup must be an integer >= 0"),
    ({"trace_format": "perfetto"}, "trace_format must be one of"),
])
def test_bad_schedule_is_refused(tmp_path, options, message):
    with pytest.raises(IncompatibleOptionsError, match=message):
        with profile_steps(Context(), tmp_path, **options):
            pass


def profile_two_ranks(ctx: Context, out_dir: str) -> list[str]:
    return train_steps(ctx, out_dir, 5, wait=1, warmup=1, active=2)


@pytest.mark.spawned
def test_each_of_two_ranks_writes_its_own_trace(tmp_path):
    traces = run_world(profile_two_ranks, 2, str(tmp_path))
    assert [[Path(p).name for p in rank] for rank in traces] == [
        ["trace_rank0_step4.json"], ["trace_rank1_step4.json"]]
    for rank, (path,) in enumerate(traces):
        names = event_names(path)  # valid JSON with the traced ops
        assert {f"train_block_rank{rank}", "aten::mm"} <= names
        assert any("all_reduce" in (name or "") for name in names), sorted(map(str, names))
