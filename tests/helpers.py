"""Helpers shared by test modules (tests/ is on sys.path through pytest's rootdir)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from accel.testing import LAUNCH_VARIABLES

REPO = Path(__file__).resolve().parent.parent


def accel_cli(*args: str, pythonpath: tuple[Path, ...] = (), extra_env: dict | None = None,
              timeout: float = 180) -> subprocess.CompletedProcess:
    """Run `python -m accel ARGS` as a user would, with this checkout importable, in a
    working directory of its own: what a script writes there (a tutorial's runs/) is not
    left in the checkout. Arguments naming the checkout's files are made absolute."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(map(str, (REPO, *pythonpath)))
    env.update(extra_env or {})
    with tempfile.TemporaryDirectory(prefix="accel-cli-") as cwd:
        return subprocess.run([sys.executable, "-m", "accel", *map(_in_checkout, args)],
                              capture_output=True, text=True, env=env, cwd=cwd,
                              timeout=timeout)


def _in_checkout(arg: str) -> str:
    return str(REPO / arg) if not arg.startswith("-") and (REPO / arg).exists() else arg


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


def tiny_llama(layers: int = 2, hidden: int = 32, **config):
    """A transformers Llama from a config, seeded, without a KV cache (training):
    `config` overrides LlamaConfig fields (intermediate_size is 2 x hidden by default)."""
    import torch
    import transformers

    torch.manual_seed(0)
    options = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                   max_position_embeddings=256, use_cache=False)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**options, **config}))


def train_tokens(model, ctx, *, strategy, steps: int, per_rank: int, accumulation: int,
                 seq: int = 12, lr: float = 1e-3) -> dict:
    """`steps` AdamW steps of a causal LM on seeded tokens through shard_model,
    wrap_optimizer, distribute_loader and accumulate_grads, as a user writes them: the
    whole parameters after them. A step takes per_rank x accumulation samples on each
    data-parallel rank: one process with per_rank = N x b x k and accumulation 1 sees
    the samples N ranks with b and k see."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import accel

    model, ctx = accel.shard_model(model, ctx, strategy=strategy)
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=lr), ctx)
    count = steps * accumulation * per_rank * ctx.dp_size
    data = TensorDataset(torch.randint(0, 96, (count, seq),
                                       generator=torch.Generator().manual_seed(3)))
    loader, ctx = accel.distribute_loader(DataLoader(data, batch_size=per_rank), ctx)
    model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx, steps=accumulation,
                                                   loader=loader)
    for (ids,) in loader:
        accel.backward(model(input_ids=ids, labels=ids).loss, optimizer, ctx)
        optimizer.step()
        optimizer.zero_grad()
    assert optimizer.real_steps == steps
    return full_parameters(accel.unwrap_model(model, ctx))
