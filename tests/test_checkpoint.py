"""Checkpoints in one process: the format, numbered folders and rotation, integrity checks.

Multi-process checks (DDP kill and resume, FSDP resharding, DeepSpeed, elastic restarts)
are in test_checkpoint_spawned.py.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
import time

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import accel
from accel.checkpoint import (
    CheckpointFolder,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    load_state,
    save_state,
)
from accel.checkpoint.staging import STALE_AFTER, tmp_name
from accel.checkpoint.tree import flatten, unflatten
from accel.errors import IncompatibleOptionsError, InvalidArgumentError


class Counter:
    """An extra object: anything with state_dict/load_state_dict."""

    def __init__(self, value: int = 0):
        self.value = value
        self.history = torch.zeros(3)

    def state_dict(self):
        return {"value": self.value, "history": self.history.clone()}

    def load_state_dict(self, state):
        self.value, self.history = state["value"], state["history"].clone()


def make_run(seed: int = 0, accumulate: int = 1):
    torch.manual_seed(seed)
    ctx = accel.Context()
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 2))
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=0.1), ctx)
    if accumulate > 1:
        model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx, steps=accumulate)
    scheduler, ctx = accel.wrap_scheduler(
        torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5), ctx, optimizer)
    return ctx, model, optimizer, scheduler


def train(model, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(5, 4)).pow(2).mean()  # draws from torch's generator
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------- the JSON/tensor split

leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.text(max_size=5),
                   st.floats(allow_nan=False), st.builds(torch.randn, st.integers(0, 3)))
trees = st.recursive(leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.tuples(inner, inner),
    st.dictionaries(st.one_of(st.text(max_size=4), st.integers(0, 5)), inner, max_size=3)),
    max_leaves=12)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b and type(a) is type(b)


@given(trees)
def test_flatten_then_unflatten_through_json_gives_the_tree_back(tree):
    skeleton, tensors = flatten(tree)
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    assert same(unflatten(json.loads(json.dumps(skeleton)), tensors), tree)


def test_flatten_keeps_parameter_names_and_names_a_bad_leaf():
    _, tensors = flatten({"fc.weight": torch.ones(1), "state": {0: {"exp_avg": torch.ones(1)}}})
    assert list(tensors) == ["fc.weight", "state/0/exp_avg"]
    with pytest.raises(InvalidArgumentError, match=r"set at 'extra/sampler/seen'.*never pickled"):
        flatten({"extra": {"sampler": {"seen": {1, 2}}}})


# ---------------------------------------------------------------- round trip, one process

def test_round_trip_restores_everything_and_training_continues_identically(tmp_path):
    ctx, model, optimizer, scheduler = make_run(accumulate=2)
    train(model, optimizer, scheduler, 5)
    with pytest.raises(IncompatibleOptionsError, match=r"middle of an accumulation cycle \(1 of 2"):
        save_state(tmp_path / "early", ctx, model=model, optimizer=optimizer)
    assert not (tmp_path / "early").exists()
    train(model, optimizer, scheduler, 1)
    counter = Counter(7)
    random.random(), np.random.rand()
    path = save_state(tmp_path / "ckpt", ctx, model=model, optimizer=optimizer,
                      scheduler=scheduler, counter=counter)
    train(model, optimizer, scheduler, 6)
    expected = (params(model), random.random(), np.random.rand(), scheduler.get_last_lr())

    ctx, model2, optimizer2, scheduler2 = make_run(seed=1, accumulate=2)
    counter2 = Counter()
    info = load_state(path, ctx, model=model2, optimizer=optimizer2, scheduler=scheduler2,
                      counter=counter2)
    assert (info.step, info.world_size, info.backend) == (3, 1, "single")  # 6 micro, 3 real
    assert counter2.value == 7 and torch.equal(counter2.history, torch.zeros(3))
    train(model2, optimizer2, scheduler2, 6)
    got = (params(model2), random.random(), np.random.rand(), scheduler2.get_last_lr())
    assert all(torch.equal(expected[0][k], got[0][k]) for k in expected[0])
    assert got[1:] == expected[1:]


def test_format_is_safetensors_and_json_with_metadata(tmp_path):
    ctx, model, optimizer, scheduler = make_run()
    train(model, optimizer, scheduler, 1)
    path = save_state(tmp_path / "ckpt", ctx, model=model, optimizer=optimizer)
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert files == ["accel.json", "model.json", "model.safetensors", "optimizer.json",
                     "optimizer.safetensors", "ranks/rank0.json", "ranks/rank0.safetensors",
                     "state.json", "state.safetensors"]
    meta = json.loads((path / "accel.json").read_text())
    assert meta["versions"]["torch"] == torch.__version__ and meta["versions"]["accel"]
    assert (meta["world_size"], meta["backend"], meta["layout"], meta["step"]) == (
        1, "single", "full", 1)
    assert set(meta["files"]) == set(files) - {"accel.json"}
    from safetensors.torch import load_file
    assert set(load_file(path / "model.safetensors")) == {"0.weight", "0.bias", "2.weight",
                                                          "2.bias"}
    assert not list(tmp_path.glob("*.tmp-*"))


def test_refuses_to_load_what_was_not_saved(tmp_path):
    ctx, model, optimizer, scheduler = make_run()
    path = save_state(tmp_path / "ckpt", ctx, model=model, rng=False)
    with pytest.raises(IncompatibleOptionsError, match="saved without one; pass optimizer"):
        load_state(path, ctx, model=model, optimizer=optimizer, rng=False)
    with pytest.raises(IncompatibleOptionsError, match="load it with rng=False"):
        load_state(path, ctx, model=model)
    with pytest.raises(IncompatibleOptionsError, match=r"no extra objects named \['ema'\]"):
        load_state(path, ctx, model=model, rng=False, ema=Counter())
    with pytest.raises(InvalidArgumentError, match="ema=int, which has no state_dict"):
        save_state(path, ctx, model=model, ema=3)
    with pytest.raises(InvalidArgumentError, match="is not an accel checkpoint"):
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("keep me")
        save_state(tmp_path / "mine", ctx, model=model)
    assert (tmp_path / "mine" / "notes.txt").exists()


# ---------------------------------------------------------------- folders and rotation

def test_eleven_saves_keep_the_last_two_and_numbering_continues_after_load(tmp_path):
    ctx, model, optimizer, scheduler = make_run()
    folder = CheckpointFolder(tmp_path / "run", total_limit=2)
    assert folder.latest() is None
    with pytest.raises(CheckpointNotFoundError, match="holds no complete checkpoint"):
        load_state(folder, ctx, model=model)
    for _ in range(11):
        train(model, optimizer, scheduler, 1)
        save_state(folder, ctx, model=model, optimizer=optimizer)
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["checkpoint_000010", "checkpoint_000011"]

    # A fresh run (a new process) resumes from the latest and continues the numbering.
    ctx, model2, optimizer2, _ = make_run(seed=3)
    info = load_state(CheckpointFolder(tmp_path / "run", total_limit=2), ctx, model=model2,
                      optimizer=optimizer2)
    assert info.path.name == "checkpoint_000011" and info.step == 11
    assert all(torch.equal(a, b) for a, b in zip(params(model).values(),
                                                 params(model2).values(), strict=True))
    assert save_state(folder, ctx, model=model2, optimizer=optimizer2).name == (
        "checkpoint_000012")
    assert [p.name for p in folder.checkpoints()] == ["checkpoint_000011", "checkpoint_000012"]


def owned_by(path, pid: int):
    """A temporary name beside `path` as process `pid` of this host would make it."""
    return path.with_name(re.sub(r"-\d+-([0-9a-f]{12})$", rf"-{pid}-\1", tmp_name(path).name))


def dead_pid() -> int:
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


def test_partial_saves_are_ignored_then_only_stale_ones_cleaned(tmp_path):
    ctx, model, _, _ = make_run()
    folder = CheckpointFolder(tmp_path / "run")
    save_state(folder, ctx, model=model)
    root = tmp_path / "run"
    with subprocess.Popen(["sleep", "60"]) as alive:
        # What saves leave: one killed mid-way (its process is gone), one still running
        # in another process, and folders without an owner (an older accel), fresh or old.
        killed = owned_by(folder.staging, dead_pid())
        running = owned_by(folder.staging, alive.pid)
        fresh, old = root / "checkpoint_new.tmp-0123456789ab", root / "checkpoint_3.tmp-0123"
        other = root / "notes.tmp-0123456789ab"  # not a checkpoint's: never touched
        for partial in (killed, running, fresh, old, other):
            partial.mkdir()
            (partial / "model.safetensors").write_bytes(b"half")
        os.utime(old, (time.time() - STALE_AFTER - 60,) * 2)
        assert folder.latest().name == "checkpoint_000001"
        assert save_state(folder, ctx, model=model).name == "checkpoint_000002"
        assert sorted(p.name for p in root.iterdir() if ".tmp-" in p.name) == sorted(
            p.name for p in (running, fresh, other))
        alive.kill()
    assert [p.name for p in folder.checkpoints()] == ["checkpoint_000001", "checkpoint_000002"]
    save_state(folder, ctx, model=model)
    assert not running.exists() and fresh.exists()


def test_save_to_an_existing_checkpoint_replaces_it(tmp_path):
    ctx, model, optimizer, scheduler = make_run()
    save_state(tmp_path / "ckpt", ctx, model=model)
    train(model, optimizer, scheduler, 2)
    save_state(tmp_path / "ckpt", ctx, model=model)
    _, model2, _, _ = make_run(seed=5)
    load_state(tmp_path / "ckpt", ctx, model=model2)
    assert all(torch.equal(a, b) for a, b in zip(params(model).values(),
                                                 params(model2).values(), strict=True))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


class Recorded(logging.Handler):
    """The messages logged while it is attached."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_survivor_of_an_interrupted_swap_loads_and_stays_until_replaced(tmp_path):
    ctx, model, optimizer, scheduler = make_run()
    path = save_state(tmp_path / "ckpt", ctx, model=model, rng=False)
    train(model, optimizer, scheduler, 2)
    new = save_state(tmp_path / "new", ctx, model=model, rng=False)
    # What a save over `path` killed between its two renames leaves (where the names cannot
    # be exchanged in one step): the old checkpoint renamed aside, the new one complete
    # under its temporary name, nothing at `path`.
    gone = dead_pid()
    aside, staged = owned_by(path, gone), owned_by(path, gone)
    os.rename(path, aside)
    os.rename(new, staged)
    _, model2, _, _ = make_run(seed=5)
    logger, recorded = logging.getLogger("accel.checkpoint.load"), Recorded()
    logger.addHandler(recorded)
    try:
        info = load_state(path, ctx, model=model2, rng=False)
    finally:
        logger.removeHandler(recorded)
    assert info.recovered and info.path == staged
    assert any("a save over it was interrupted" in message and str(staged) in message
               for message in recorded.messages), recorded.messages
    assert all(torch.equal(a, b) for a, b in zip(params(model).values(),
                                                 params(model2).values(), strict=True))
    with pytest.raises(InvalidArgumentError, match="never pickled"):  # a save that fails...
        save_state(path, ctx, model=model, rng=False, bad=Unsaveable())
    assert aside.exists() and staged.exists()  # ...leaves them: they are all there is
    save_state(path, ctx, model=model, rng=False)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # replaced, then removed
    assert not load_state(path, ctx, model=model2, rng=False).recovered


class Unsaveable:
    def state_dict(self):
        return {"seen": {1, 2}}

    def load_state_dict(self, state):
        pass


# ---------------------------------------------------------------- integrity

@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.json", "ranks/rank0.json"])
def test_damaged_file_is_named_and_nothing_is_loaded(tmp_path, damage, name):
    ctx, model, optimizer, scheduler = make_run()
    train(model, optimizer, scheduler, 1)
    path = save_state(tmp_path / "ckpt", ctx, model=model, optimizer=optimizer)
    target = path / name
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        target.unlink()
    _, model2, optimizer2, _ = make_run(seed=9)
    before = params(model2)
    expected = {"truncate": "truncated", "flip": "checksum", "delete": "missing"}[damage]
    with pytest.raises(CorruptCheckpointError, match=f"{target}.*{expected}"):
        load_state(path, ctx, model=model2, optimizer=optimizer2)
    if damage == "truncate":  # unchecked, a cut file still fails to parse, naming itself
        with pytest.raises(CorruptCheckpointError, match=f"{target}"):
            load_state(path, ctx, model=model2, optimizer=optimizer2, verify=False)
    assert all(torch.equal(before[k], v) for k, v in params(model2).items())


def test_missing_metadata_means_no_checkpoint(tmp_path):
    ctx, model, _, _ = make_run()
    path = save_state(tmp_path / "ckpt", ctx, model=model)
    (path / "accel.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="has no accel.json"):
        load_state(path, ctx, model=model)
    assert CheckpointFolder(tmp_path).latest() is None
