"""Saves in the background: `save_state(..., blocking=False)`.

One process: the handle comes back before the files are written, training goes on, and
the checkpoint holds the state of the moment of the call; the next save and a load wait
for it; a failure surfaces at the next wait and leaves nothing behind. Two ranks: FSDP2
(sharded, torch DCP in the background on a second process group) and DDP (full) saves
run while the ranks train on with collectives, and `shutdown` waits for the last one.
The stall itself is measured by bench/checkpoint.py.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import torch
from torch import nn

import accel
from accel.checkpoint import CheckpointFolder, load_state, save_state
from accel.checkpoint.background import AsyncSave
from accel.errors import CheckpointSaveError, IncompatibleOptionsError, InvalidArgumentError
from accel.testing import run_world


def build(ctx, seed: int = 0, strategy=None):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3))
    if strategy is not None:
        model, ctx = accel.shard_model(model, ctx, strategy=strategy)
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=0.05), ctx)
    return model, optimizer, ctx


def train(model, optimizer, ctx, steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed + ctx.rank)
    for _ in range(steps):
        accel.backward(model(torch.randn(4, 6, generator=generator)).square().mean(),
                       optimizer, ctx)
        optimizer.step()
        optimizer.zero_grad()


def whole(model) -> dict[str, torch.Tensor]:
    from helpers import full_parameters

    return full_parameters(model.module if isinstance(
        model, nn.parallel.DistributedDataParallel) else model)


@pytest.mark.parametrize("staging", ["copy", "overlap"])
def test_the_handle_comes_back_at_once_and_the_checkpoint_holds_that_moment(tmp_path,
                                                                           staging):
    model, optimizer, ctx = build(accel.Context())
    train(model, optimizer, ctx, 2)
    at_save = whole(model)
    handle = save_state(tmp_path / "ckpt", ctx, model=model, optimizer=optimizer,
                        blocking=False, staging=staging)
    assert isinstance(handle, AsyncSave)
    train(model, optimizer, ctx, 3)  # changes every parameter in place, right away
    path = handle.wait()
    assert handle.done() and path == tmp_path / "ckpt" and "committed" in repr(handle)
    fresh, fresh_optimizer, ctx = build(accel.Context(), seed=1)
    info = load_state(path, ctx, model=fresh, optimizer=fresh_optimizer)
    assert info.step == 2
    assert all(torch.equal(at_save[name], value) for name, value in whole(fresh).items())
    assert not list(tmp_path.glob("*.tmp-*"))


def test_overlap_holds_the_next_optimizer_step_until_the_stepped_tensors_are_copied(
        tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)])  # 32 MB to copy
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 1024)).sum().backward()
    at_save = {name: value.clone() for name, value in model.state_dict().items()}
    ctx = accel.Context()
    seen = []
    optimizer.register_step_pre_hook(lambda *_: seen.append(handle.staged()))
    handle = save_state(tmp_path / "ckpt", ctx, model=model, optimizer=optimizer,
                        blocking=False, staging="overlap")
    optimizer.step()  # at once: runs only after the background has copied the parameters
    assert seen == [True]
    handle.wait()
    fresh = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)])
    load_state(tmp_path / "ckpt", ctx, model=fresh, optimizer=torch.optim.SGD(
        fresh.parameters(), lr=0.1))
    assert all(torch.equal(at_save[name], value) for name, value in fresh.state_dict().items())
    assert not torch.equal(at_save["0.weight"], model[0].weight)  # the step did change it


class ChangesAParameter:
    """An extra whose state_dict(), called after the stepped tensors were listed and
    before the background copies them, changes one of them in place (a deterministic
    stand-in for user code that changes parameters outside the optimizer)."""

    def __init__(self, parameter):
        self.parameter = parameter

    def state_dict(self):
        with torch.no_grad():
            self.parameter.add_(1.0)
        return {}

    def load_state_dict(self, state):
        pass


def test_overlap_refuses_a_parameter_changed_outside_the_optimizer(tmp_path):
    model, optimizer, ctx = build(accel.Context())
    handle = save_state(tmp_path / "ckpt", ctx, model=model, optimizer=optimizer,
                        blocking=False, staging="overlap",
                        sneaky=ChangesAParameter(model[0].weight))
    with pytest.raises(CheckpointSaveError, match="changed in place.*staging='copy'"):
        handle.wait()
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.glob("*.tmp-*"))


def test_staging_is_checked():
    model, optimizer, ctx = build(accel.Context())
    with pytest.raises(InvalidArgumentError, match="staging='later'.*'copy'.*'overlap'"):
        save_state("unused", ctx, model=model, blocking=False, staging="later")
    with pytest.raises(IncompatibleOptionsError, match="blocking=False"):
        save_state("unused", ctx, model=model, staging="overlap")
    deepspeed = attrs.evolve(ctx, backend="deepspeed")
    with pytest.raises(IncompatibleOptionsError, match="under 'deepspeed'.*staging='copy'"):
        save_state("unused", deepspeed, model=model, blocking=False, staging="overlap")
    assert not Path("unused").exists()


class Unsaveable:
    def state_dict(self):
        return {"seen": {1, 2}}

    def load_state_dict(self, state):
        pass


def test_the_next_save_and_a_load_wait_and_a_failure_surfaces_once(tmp_path):
    model, optimizer, ctx = build(accel.Context())
    folder = CheckpointFolder(tmp_path / "run", total_limit=2)
    first = save_state(folder, ctx, model=model, optimizer=optimizer, blocking=False)
    train(model, optimizer, ctx, 1)
    second = save_state(folder, ctx, model=model, optimizer=optimizer, blocking=False)
    assert first.done()  # the second save waited for the first before staging
    info = load_state(folder, ctx, model=model, optimizer=optimizer)
    assert second.done() and info.path.name == "checkpoint_000002" and info.step == 1
    failing = save_state(folder, ctx, model=model, blocking=False, bad=Unsaveable())
    with pytest.raises(InvalidArgumentError, match="never pickled"):  # at the next save
        save_state(folder, ctx, model=model)
    with pytest.raises(InvalidArgumentError, match="never pickled"):  # and at its wait
        failing.wait()
    assert save_state(folder, ctx, model=model).name == "checkpoint_000003"  # raised once
    assert [p.name for p in folder.checkpoints()] == ["checkpoint_000002", "checkpoint_000003"]
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp-" in p.name]


def save_in_background_and_train_on(ctx, directory, staging):
    """FSDP2 (sharded) then DDP (full) saves in the background while the ranks train."""
    root = Path(directory)
    fsdp, fsdp_optimizer, fsdp_ctx = build(ctx, strategy="fsdp")
    train(fsdp, fsdp_optimizer, fsdp_ctx, 2)
    expected = {"fsdp": whole(fsdp)}
    save_state(root / "fsdp", fsdp_ctx, model=fsdp, optimizer=fsdp_optimizer, rng=False,
               blocking=False, staging=staging)
    train(fsdp, fsdp_optimizer, fsdp_ctx, 3)  # all-gathers and reduce-scatters meanwhile
    ddp, ddp_optimizer, ddp_ctx = build(ctx, strategy="ddp")
    train(ddp, ddp_optimizer, ddp_ctx, 2)
    expected["ddp"] = whole(ddp)
    save_state(root / "ddp", ddp_ctx, model=ddp, optimizer=ddp_optimizer, rng=False,
               blocking=False, staging=staging)  # waits for the FSDP save first
    train(ddp, ddp_optimizer, ddp_ctx, 3)  # all-reduces while the DDP save writes
    return expected  # run_world calls accel.shutdown, which waits for the DDP save


@pytest.mark.parametrize("staging", ["copy", "overlap"])
def test_two_ranks_save_in_the_background_while_training_and_shutdown_waits(tmp_path,
                                                                            staging):
    expected = run_world(save_in_background_and_train_on, 2, str(tmp_path), staging,
                         timeout=240)[0]
    for name, layout in (("fsdp", "sharded"), ("ddp", "full")):
        model, optimizer, ctx = build(accel.Context(), seed=1)
        info = load_state(tmp_path / name, ctx, model=model, optimizer=optimizer, rng=False)
        assert (info.metadata["layout"], info.step, info.world_size) == (layout, 2, 2)
        assert all(torch.equal(expected[name][key], value)
                   for key, value in whole(model).items()), name
