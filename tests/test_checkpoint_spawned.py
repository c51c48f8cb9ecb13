"""Checkpoints across real processes: SIGKILL and exact resume, elastic restarts, FSDP
resharding (save on 2 ranks, load on 1 and 4), DeepSpeed ZeRO 2/3 round trips.

The kill tests run tests/checkpoint_script.py through `accel launch -n 2` and kill its
processes for real (SIGKILL); an uninterrupted run of the same script is the reference.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import accel_cli
from safetensors.torch import load_file
from torch import nn

import accel
from accel.checkpoint import (
    CheckpointFolder,
    CorruptCheckpointError,
    load_state,
    save_state,
)
from accel.testing import run_world

SCRIPT = "tests/checkpoint_script.py"


def launch(run: Path, *args: str, restarts: int = 0):
    return accel_cli("launch", "-n", "2", "--max-restarts", str(restarts), SCRIPT,
                     "--ckpt", str(run / "ckpt"), "--batches", str(run / "log"),
                     "--out", str(run / "params.safetensors"), *args)


def batches(run: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run / "log" / f"rank{rank}.jsonl").read_text()
            .splitlines()]


def same_params(a: Path, b: Path) -> bool:
    first, second = load_file(a), load_file(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k])
                                                 for k in first)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted")
    result = launch(run)
    assert result.returncode == 0, result.stderr
    return run


def test_sigkill_in_save_keeps_previous_checkpoint_and_resume_is_exact(uninterrupted, tmp_path):
    # Checkpoints at steps 3 and 6 (mid-epoch: 4 batches per epoch); at step 7 rank 0 is
    # killed with SIGKILL in the middle of save_state, and the launcher ends rank 1.
    killed = launch(tmp_path, "--save-at", "3,6,7", "--die-in-save-at", "7")
    assert killed.returncode != 0 and "exited with code 137" in killed.stderr, killed.stderr
    ckpt = tmp_path / "ckpt"
    partial = [p.name for p in ckpt.iterdir() if ".tmp-" in p.name]
    # Numbered only once complete: a save in progress is named after checkpoint_new.
    assert len(partial) == 1 and partial[0].startswith("checkpoint_new.tmp-")
    assert (ckpt / partial[0] / "model.safetensors").exists()  # killed half-way, not before
    latest = CheckpointFolder(ckpt).latest()
    assert latest.name == "checkpoint_000002"
    assert json.loads((latest / "accel.json").read_text())["step"] == 6

    resumed_run = tmp_path / "resumed"
    resumed = accel_cli("launch", "-n", "2", SCRIPT, "--ckpt", str(ckpt), "--batches",
                        str(resumed_run / "log"), "--out", str(resumed_run / "p.safetensors"),
                        "--save-at", "9")
    assert resumed.returncode == 0, resumed.stderr
    assert same_params(uninterrupted / "params.safetensors", resumed_run / "p.safetensors")
    for rank in (0, 1):
        assert batches(resumed_run, rank) == batches(uninterrupted, rank)[6:]
        assert batches(tmp_path, rank)[:7] == batches(uninterrupted, rank)[:7]
    # The partial save is gone (its process is); numbering went on from the latest one.
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint_000002", "checkpoint_000003"]
    assert json.loads((ckpt / "checkpoint_000003" / "accel.json").read_text())["step"] == 9


def test_elastic_restart_after_a_killed_rank_finishes_like_an_uninterrupted_run(
        uninterrupted, tmp_path):
    # Rank 1 kills itself (SIGKILL) after step 8, once; the launcher restarts both ranks,
    # which load the step-6 checkpoint and train on.
    result = launch(tmp_path, "--die-at-step", "8", "--die-rank", "1", "--marker",
                    str(tmp_path / "died-once"), restarts=1)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "died-once").exists()
    steps = [entry["step"] for entry in batches(tmp_path, 0)]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8, 7, 8, 9, 10]
    assert same_params(uninterrupted / "params.safetensors", tmp_path / "params.safetensors")


# ---------------------------------------------------------------- FSDP: reshardable

def fsdp_model():
    torch.manual_seed(0)
    # Widths that 2 and 4 ranks do not divide evenly: uneven shards on every world size.
    return nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3))


def prepare(ctx, strategy):
    model = fsdp_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    if strategy is not None:
        model, ctx = accel.shard_model(model, ctx, strategy=strategy)
    optimizer, ctx = accel.wrap_optimizer(optimizer, ctx)
    return model, optimizer, ctx


def full_state(model, optimizer, ctx):
    """Whole parameters and optimizer state, on rank 0 (others: None)."""
    from accel.backends import backend_for

    model_state, optimizer_state = backend_for(ctx).get_state_dict(model, optimizer, full=True)
    if not ctx.is_main_process:
        return None
    tensors = {f"model/{k}": v.clone() for k, v in model_state.items()}
    for name, entry in optimizer_state["state"].items():
        tensors.update({f"optimizer/{name}/{k}": torch.as_tensor(v).clone()
                        for k, v in entry.items()})
    return tensors


def save_sharded(ctx, directory):
    model, optimizer, ctx = prepare(ctx, "fsdp")
    for _ in range(3):
        accel.backward(model(torch.randn(4, 6)).square().mean(), optimizer, ctx)
        optimizer.step()
        optimizer.zero_grad()
    path = save_state(Path(directory), ctx, model=model, optimizer=optimizer)
    return full_state(model, optimizer, ctx), sorted(
        str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def load_sharded(ctx, directory):
    model, optimizer, ctx = prepare(ctx, "fsdp" if ctx.is_distributed else None)
    info = load_state(Path(directory), ctx, model=model, optimizer=optimizer, rng=False)
    return full_state(model, optimizer, ctx), info.step, info.world_size, ctx.backend


def test_fsdp_checkpoint_from_two_ranks_loads_on_one_and_four(tmp_path):
    saved, files = run_world(save_sharded, 2, str(tmp_path / "ckpt"))[0]
    assert all(name.endswith((".json", ".safetensors")) for name in files), files  # no pickle
    assert any(name.startswith("model/") for name in files)
    assert json.loads((tmp_path / "ckpt" / "accel.json").read_text())["layout"] == "sharded"
    for world_size, backend in ((1, "single"), (4, "fsdp")):
        loaded, step, saved_by, used = run_world(load_sharded, world_size,
                                                 str(tmp_path / "ckpt"))[0]
        assert (step, saved_by, used) == (3, 2, backend)
        assert loaded.keys() == saved.keys()
        assert all(torch.equal(saved[k], loaded[k]) for k in saved), world_size
    # DCP reads the shard files piecewise: they are verified whole before it starts.
    shard = next((tmp_path / "ckpt" / "model").glob("*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CorruptCheckpointError, match=f"{shard}.*checksum"):
        load_sharded(accel.Context(), str(tmp_path / "ckpt"))


# ---------------------------------------------------------------- DeepSpeed ZeRO 2 and 3

def deepspeed_round_trip(ctx, directory, stage):
    from accel.backends.deepspeed import get_full_model_state

    def train(model, optimizer, ds_ctx, count):
        generator = torch.Generator().manual_seed(ctx.rank)
        for _ in range(count):
            loss = model(torch.randn(4, 6, generator=generator)).square().mean()
            accel.backward(loss, optimizer, ds_ctx)
            optimizer.step()
            optimizer.zero_grad()

    model, optimizer, ds_ctx = prepare(ctx, accel.DeepSpeed(stage=stage))
    train(model, optimizer, ds_ctx, 2)
    path = save_state(Path(directory) / f"zero{stage}", ds_ctx, model=model, optimizer=optimizer)
    train(model, optimizer, ds_ctx, 2)
    expected = get_full_model_state(model)
    model2, optimizer2, ds_ctx = prepare(ctx, accel.DeepSpeed(stage=stage))
    info = load_state(path, ds_ctx, model=model2, optimizer=optimizer2)
    train(model2, optimizer2, ds_ctx, 2)
    got = get_full_model_state(model2)
    return info.step, all(torch.equal(expected[k], got[k]) for k in expected)


def deepspeed_world(ctx, directory):
    return [deepspeed_round_trip(ctx, directory, stage) for stage in (2, 3)]


def test_deepspeed_zero2_and_zero3_round_trip(tmp_path):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install 'accel[deepspeed]')")
    for rank_result in run_world(deepspeed_world, 2, str(tmp_path), timeout=300):
        assert rank_result == [(2, True), (2, True)]


def test_07_tutorial_resumes_where_it_stopped(tmp_path):
    run = ("launch", "-n", "2", "tutorials/07_checkpointing.py", "--dir", str(tmp_path))
    first = accel_cli(*run, "--stop-after", "9")
    assert first.returncode == 0, first.stderr
    assert "saved checkpoint_000002" in first.stdout and "stopping early" in first.stdout
    second = accel_cli(*run)
    assert second.returncode == 0, second.stderr
    assert "resumed from checkpoint_000002 at step 8 (epoch 1)" in second.stdout
    # Step 9 ran in both: after an exact resume it computes the very same loss.
    step9 = [line for out in (first.stdout, second.stdout) for line in out.splitlines()
             if line.startswith("step 9 ")]
    assert len(step9) == 2 and step9[0] == step9[1], step9
    assert "done at step 12; kept ['checkpoint_000002', 'checkpoint_000003']" in second.stdout


def stateless_sgd_round_trip(ctx, directory):
    """SGD without momentum keeps no tensors: torch's whole-state load finds no device.
    Neither the save nor the load takes a step or makes gradients (torch's state helpers
    would, with zero gradients on every parameter, to create state SGD never has)."""
    torch.manual_seed(0)
    base, strategy = ctx, "ddp" if ctx.world_size > 1 else "single"
    model, ctx = accel.shard_model(nn.Linear(4, 2), base, strategy=strategy)
    optimizer, ctx = accel.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), ctx)
    accel.backward(model(torch.randn(3, 4)).sum(), optimizer, ctx)
    optimizer.step()
    optimizer.zero_grad()
    steps = []
    optimizer.optimizer.register_step_pre_hook(lambda *_: steps.append("save"))
    accel.save_state(directory, ctx, model=model, optimizer=optimizer)
    fresh, ctx2 = accel.shard_model(nn.Linear(4, 2), base, strategy=strategy)
    fresh_optimizer, ctx2 = accel.wrap_optimizer(torch.optim.SGD(fresh.parameters(), lr=0.5),
                                                 ctx2)
    fresh_optimizer.optimizer.register_step_pre_hook(lambda *_: steps.append("load"))
    accel.load_state(directory, ctx2, model=fresh, optimizer=fresh_optimizer)
    return {"same": all(torch.equal(a, b) for a, b in zip(
                accel.unwrap_model(model, ctx).parameters(),
                accel.unwrap_model(fresh, ctx2).parameters(), strict=True)),
            "lr": fresh_optimizer.param_groups[0]["lr"], "steps": steps,
            "grads": [p.grad for p in [*model.parameters(), *fresh.parameters()]
                      if p.grad is not None]}


@pytest.mark.spawned
@pytest.mark.parametrize("world", [1, 2])
def test_a_stateless_optimizer_round_trips(tmp_path, world):
    ranks = run_world(stateless_sgd_round_trip, world, str(tmp_path / "sgd"), timeout=120)
    assert all(rank == {"same": True, "lr": 0.1, "steps": [], "grads": []}
               for rank in ranks), ranks
