"""distribute_loader on real gloo processes: gather order, dispatch, gather_for_metrics, workers.

Each world batches many checks (a world costs seconds); the rank functions return plain
data and the assertions run in the parent.
"""

from __future__ import annotations

import pytest
import torch
from test_data import Records, SeededStream, Stream, WorkerSplitStream
from torch.utils.data import DataLoader

from accel.data import distribute_loader, gather_for_metrics
from accel.errors import UnsupportedError
from accel.runtime.ops import gather
from accel.testing import run_world

pytestmark = pytest.mark.spawned

IN_ORDER_MODES = {
    "shard": ({}, range(64)),
    "split": ({"split_batches": True}, range(64)),
    "dispatch": ({"dispatch_batches": True}, range(64)),
    "dispatch-split": ({"dispatch_batches": True, "split_batches": True}, range(64)),
    "dispatch-stream": ({"dispatch_batches": True}, Stream(64)),
    "stream": ({}, Stream(64)),
}

METRICS_MODES = {
    "shard": {},
    "split": {"split_batches": True},
    "uneven": {"even_batches": False},
    "dispatch": {"dispatch_batches": True},
    "dispatch-split": {"dispatch_batches": True, "split_batches": True},
    "dispatch-uneven": {"dispatch_batches": True, "even_batches": False},
}


def gathered_steps(loader, ctx) -> list[int]:
    return torch.cat([gather(batch, ctx) for batch in loader]).tolist()


def metric_ids(loader, ctx) -> tuple[list[int], list[str]]:
    values, ids = [], []
    for batch in loader:
        values += gather_for_metrics(batch["x"], ctx, loader).tolist()
        ids += gather_for_metrics(batch["id"], ctx, loader)
    return values, ids


def collectives_world(ctx) -> dict:
    out: dict = {}
    for name, (options, dataset) in IN_ORDER_MODES.items():
        loader, _ = distribute_loader(DataLoader(dataset, batch_size=8), ctx, **options)
        out[f"in-order/{name}"] = gathered_steps(loader, ctx)
    for name, options in METRICS_MODES.items():
        loader, _ = distribute_loader(DataLoader(Records(22), batch_size=4), ctx, **options)
        out[f"metrics/{name}"] = metric_ids(loader, ctx)
    stream, _ = distribute_loader(DataLoader(Stream(22), batch_size=4), ctx)
    out["metrics/stream"] = [i for b in stream for i in gather_for_metrics(b, ctx, stream).tolist()]
    # dispatch keeps each sample's tensor and string together, and every rank sees its part
    loader, _ = distribute_loader(DataLoader(Records(10), batch_size=2), ctx,
                                  dispatch_batches=True)
    out["dispatch/mine"] = [(b["x"].tolist(), b["id"]) for b in loader]
    out["dispatch/resume"] = dispatch_resumes_exactly(ctx)
    uneven, _ = distribute_loader(DataLoader(range(3), batch_size=1), ctx, even_batches=False)
    try:
        gather_for_metrics(next(iter(uneven)), ctx, uneven)
    except UnsupportedError as error:
        out["uneven-refused"] = str(error)
    return out


def dispatch_resumes_exactly(ctx) -> bool:
    def make():
        source = DataLoader(SeededStream(30, seed=2), batch_size=2)
        return distribute_loader(source, ctx, dispatch_batches=True)[0]

    straight = make()
    expected = [b for _ in range(2) for b in straight]
    first = make()
    for step, _ in enumerate(first):
        if step == 1:
            state = first.state_dict()
            break
    resumed = make()
    resumed.load_state_dict(state)
    seen = expected[:2] + [b for _ in range(2) for b in resumed]
    return len(seen) == len(expected) and all(map(torch.equal, seen, expected))


def test_collectives_see_every_sample_once_in_order():
    ranks = run_world(collectives_world, 2)
    rank0 = ranks[0]
    for name in IN_ORDER_MODES:
        assert rank0[f"in-order/{name}"] == list(range(64)), name
    for name in METRICS_MODES:
        values, ids = rank0[f"metrics/{name}"]
        assert sorted(values) == list(range(22)), name
        assert sorted(ids) == sorted(f"s{i}" for i in range(22)), name
    assert sorted(rank0["metrics/stream"]) == list(range(22))
    steps = [(0, 1), (4, 5), (8, 9)], [(2, 3), (6, 7), (0, 1)]
    for rank, expected in enumerate(steps):
        assert ranks[rank]["dispatch/mine"] == [
            (list(pair), [f"s{i}" for i in pair]) for pair in expected]
    assert all(r["dispatch/resume"] for r in ranks)
    assert all("[2, 1] batches" in r["uneven-refused"] for r in ranks)


# --------------------------------------------------------------------------- workers


def workers_world(ctx) -> dict:
    def make(dataset, shuffle=False, **options):
        # fork: a spawned rank would otherwise spawn its workers too (seconds each).
        source = DataLoader(dataset, batch_size=4, shuffle=shuffle,
                            num_workers=2, multiprocessing_context="fork", pin_memory=False)
        return distribute_loader(source, ctx, **options)[0]

    out = {}
    shuffled = make(range(40), shuffle=True)
    epochs = [[i for b in shuffled for i in gather_for_metrics(b, ctx, shuffled).tolist()]
              for _ in range(2)]
    out["epochs"] = epochs
    stopped = make(range(40), shuffle=True)
    for step, _ in enumerate(stopped):
        if step == 1:
            state = stopped.state_dict()
            break
    resumed = make(range(40), shuffle=True)
    resumed.load_state_dict(state)
    rest = [[i for b in resumed for i in gather_for_metrics(b, ctx, resumed).tolist()]
            for _ in range(2)]
    out["resumed"] = rest
    split_stream = make(WorkerSplitStream(22))
    out["worker-streams"] = [i for b in split_stream
                             for i in gather_for_metrics(b, ctx, split_stream).tolist()]
    dispatched = make(range(64), dispatch_batches=True)
    out["dispatch"] = gathered_steps(dispatched, ctx)
    return out


def test_loaders_with_two_workers():
    rank0 = run_world(workers_world, 2)[0]
    first, second = rank0["epochs"]
    assert sorted(first) == sorted(second) == list(range(40)) and first != second
    resumed_first, resumed_second = rank0["resumed"]
    assert resumed_first == first[2 * 4 * 2:], "the rest of epoch 0, after 2 steps of 8"
    assert resumed_second == second
    assert sorted(rank0["worker-streams"]) == list(range(22)), \
        "per-worker padding is dropped batch by batch"
    assert rank0["dispatch"] == list(range(64))
