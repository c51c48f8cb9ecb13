"""Any engine to any engine: a checkpoint saved under DDP, FSDP2 or ZeRO-1/2/3 loads
under each of them, with the same parameters and optimizer state, bitwise.

DDP and ZeRO write the full layout (whole tensors, rank 0); FSDP2 the sharded one (each
rank's shards through torch DCP). Every engine loads both: a full checkpoint is handed
whole to the engine, which shards it; a sharded one is read piecewise where the engine
has a sharded form (FSDP2, DDP), and whole on rank 0 where it has none (ZeRO, whose flat
partitions are its own). One world of 2 ranks runs all 25 pairs on a tiny model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import accel
from accel.backends import backend_for
from accel.checkpoint import load_state, save_state
from accel.testing import run_world

ENGINES = ("ddp", "fsdp", "zero1", "zero2", "zero3")


def strategy(engine: str):
    return accel.DeepSpeed(stage=int(engine[-1])) if engine.startswith("zero") else engine


def build(ctx, engine: str, seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3))
    model, ctx = accel.shard_model(model, ctx, strategy=strategy(engine))
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=0.05), ctx)
    return model, optimizer, ctx


def train(model, optimizer, ctx, steps: int) -> None:
    generator = torch.Generator().manual_seed(ctx.rank)
    for _ in range(steps):
        accel.backward(model(torch.randn(4, 6, generator=generator)).square().mean(),
                       optimizer, ctx)
        optimizer.step()
        optimizer.zero_grad()


def full_state(model, optimizer, ctx) -> dict[str, torch.Tensor] | None:
    """Every parameter and Adam state tensor whole, by name, on rank 0 (None elsewhere)."""
    model_state, optimizer_state = backend_for(ctx).get_state_dict(model, optimizer, full=True)
    if not ctx.is_main_process:
        return None
    tensors = {f"model/{name}": value.detach().float().clone()
               for name, value in model_state.items()}
    for name, entry in optimizer_state["state"].items():
        tensors.update({f"optimizer/{name}/{key}": torch.as_tensor(value).float().reshape(-1)
                        for key, value in entry.items()})
    return tensors


def every_pair(ctx, directory):
    root = Path(directory)
    saved = {}
    for engine in ENGINES:
        model, optimizer, engine_ctx = build(ctx, engine, seed=0)
        train(model, optimizer, engine_ctx, 2)
        save_state(root / engine, engine_ctx, model=model, optimizer=optimizer, rng=False)
        saved[engine] = full_state(model, optimizer, engine_ctx)
    outcome = {}
    for source in ENGINES:
        for target in ENGINES:
            model, optimizer, engine_ctx = build(ctx, target, seed=1)
            train(model, optimizer, engine_ctx, 1)  # state of its own, to be replaced
            info = load_state(root / source, engine_ctx, model=model, optimizer=optimizer,
                              rng=False)
            loaded = full_state(model, optimizer, engine_ctx)
            if ctx.is_main_process:
                expected = saved[source]
                differs = sorted(key for key in expected if key not in loaded
                                 or not torch.equal(expected[key], loaded[key]))
                outcome[source, target] = (info.metadata["layout"], info.step, differs,
                                           sorted(set(loaded) - set(expected)))
    return outcome


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="deepspeed is not installed (pip install 'accel[deepspeed]')")
def test_every_engine_loads_every_engines_checkpoint_bitwise(tmp_path):
    outcome = run_world(every_pair, 2, str(tmp_path), timeout=600)[0]
    failures = {pair: result for pair, result in outcome.items()
                if result[1] != 2 or result[2] or result[3]}
    assert not failures, failures
    assert {outcome[source, "ddp"][0] for source in ENGINES} == {"full", "sharded"}
    assert len(outcome) == 25
