"""Helpers shared by test modules (tests/ is on sys.path through pytest's rootdir)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from accel.testing import LAUNCH_VARIABLES

REPO = Path(__file__).resolve().parent.parent


def accel_cli(*args: str, pythonpath: tuple[Path, ...] = (), extra_env: dict | None = None,
              timeout: float = 180) -> subprocess.CompletedProcess:
    """Run `python -m accel ARGS` as a user would, with this checkout importable."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(map(str, (REPO, *pythonpath)))
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "accel", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=timeout)


def train_through_loader(model, ctx, data, *, strategy, batch_size: int, accumulation: int,
                         lr: float, seed: int, epochs: int = 2, clip: float | None = None):
    """Train with the public transforms as a user writes them: shard, wrap, distribute,
    accumulate, then MSE epochs. Returns the unwrapped model and the final Context."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    import accel

    model, ctx = accel.shard_model(model, ctx, strategy=strategy)
    optimizer, ctx = accel.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=lr), ctx)
    loader, ctx = accel.distribute_loader(
        DataLoader(data, batch_size=batch_size, shuffle=True), ctx, seed=seed)
    model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx, steps=accumulation,
                                                   loader=loader)
    for _ in range(epochs):
        for x, y in loader:
            accel.backward(nn.functional.mse_loss(model(x), y), optimizer, ctx)
            if clip is not None:
                accel.clip_grad_norm(model, ctx, clip, optimizer=optimizer)
            optimizer.step()
            optimizer.zero_grad()
    return accel.unwrap_model(model, ctx), ctx


def full_parameters(model) -> dict:
    """Every parameter whole (DTensor shards gathered), detached copies by name."""
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in model.named_parameters()}
