"""One XLA training run in a fresh process (PJRT reads CPU_NUM_DEVICES once, at import).

    python tests/xla/xla_worker.py MODE OUT_DIR     # MODE: replica | fsdp | dp

Trains a small MLP for a few steps with accel's transforms, then writes to OUT_DIR:
params.safetensors (the trained parameters, through the backend's full state dict),
report.json (losses, the sharding spec of each parameter, checkpoint round-trip checks).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import accel
from accel import XLA
from accel.backends import backend_for, xla


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))


def make_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=generator)
    return DataLoader(TensorDataset(x, (x[:, :2].sum(dim=1) > 0).long()), batch_size=16)


def strategy_for(mode: str) -> XLA:
    return {"replica": XLA(), "fsdp": XLA(fsdp=True),
            "dp": XLA(mesh_shape=(2,), axis_names=("data",))}[mode]


def train(mode: str) -> tuple[nn.Module, accel.Context, list[float], list[str]]:
    ctx = accel.init(device="xla", seed=0)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, ctx = accel.shard_model(model, ctx, strategy=strategy_for(mode))
    optimizer, ctx = accel.wrap_optimizer(optimizer, ctx)
    loader, ctx = accel.distribute_loader(make_loader(), ctx)
    losses, batch_specs = [], []
    for _ in range(3):
        for x, y in loader:
            batch_specs.append(xla.sharding_spec(x))
            loss = nn.functional.cross_entropy(model(x), y)
            accel.backward(loss, optimizer, ctx)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    return model, ctx, losses, batch_specs


def checkpoint_round_trip(model: nn.Module, ctx: accel.Context, out: Path) -> dict:
    """XLA -> safetensors -> plain CPU model, and a CPU state -> the XLA model."""
    backend = backend_for(ctx)
    state, _ = backend.get_state_dict(model, None, full=True)
    save_file(state, out / "params.safetensors")
    cpu_model = make_model()
    cpu_model.load_state_dict(load_file(out / "params.safetensors"))
    to_cpu_equal = all(torch.equal(cpu_model.state_dict()[k], v) for k, v in state.items())
    # ...and back: a different CPU state loaded into the XLA model, read out again.
    other = {k: torch.full_like(v, 0.25) + i for i, (k, v) in enumerate(state.items())}
    backend.set_state_dict(model, None, other, None, full=True)
    reread, _ = backend.get_state_dict(model, None, full=True)
    back_equal = all(torch.equal(reread[k], v) for k, v in other.items())
    specs_after_load = {k: xla.sharding_spec(p) for k, p in model.named_parameters()}
    backend.set_state_dict(model, None, state, None, full=True)  # restore trained values
    return {"to_cpu_equal": to_cpu_equal, "back_equal": back_equal,
            "specs_after_load": specs_after_load}


def sharded_round_trip(model: nn.Module, ctx: accel.Context, out: Path) -> bool:
    """SPMD state through torch.distributed.checkpoint with torch_xla's planners."""
    backend = backend_for(ctx)
    native, _ = backend.get_state_dict(model, None, full=False)
    xla.save_sharded(native, str(out / "dcp"))
    expected, _ = backend.get_state_dict(model, None, full=True)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    target, _ = backend.get_state_dict(model, None, full=False)
    xla.load_sharded(target, str(out / "dcp"))
    loaded, _ = backend.get_state_dict(model, None, full=True)
    return all(torch.equal(loaded[k], v) for k, v in expected.items())


def main(mode: str, out: Path) -> None:
    model, ctx, losses, batch_specs = train(mode)
    report = {"losses": losses, "device": str(ctx.device), "applied": list(ctx.applied),
              "batch_spec": batch_specs[0],
              "specs": {k: xla.sharding_spec(p) for k, p in model.named_parameters()}}
    report.update(checkpoint_round_trip(model, ctx, out))
    if mode != "replica":
        report["sharded_equal"] = sharded_round_trip(model, ctx, out)
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
