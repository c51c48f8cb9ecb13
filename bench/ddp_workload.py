"""The workload every implementation trains: one model, one optimizer, pre-made batches.

Everything here is shared by the three training loops in `ddp_loops.py`, so that the only
thing that differs between them is the training-step machinery.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

#: scenario name -> (gradient accumulation steps, precision)
SCENARIOS: dict[str, tuple[int, str]] = {
    "fp32": (1, "no"),
    "accum4": (4, "no"),
    "bf16": (1, "bf16"),
}


@attrs.frozen
class Workload:
    """Sizes of the model and data: about 6 ms of CPU per step on one core of an AMD EPYC."""

    width: int = 192
    blocks: int = 2
    batch_size: int = 32  # per rank
    num_batches: int = 16  # pre-made per rank, cycled
    seed: int = 1234
    lr: float = 1e-3


class Block(nn.Module):
    """A pre-norm residual MLP block, the feed-forward half of a transformer layer."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


def make_model(work: Workload) -> nn.Module:
    """The same initial weights on every rank and for every implementation."""
    torch.manual_seed(work.seed)
    layers: list[nn.Module] = [Block(work.width) for _ in range(work.blocks)]
    return nn.Sequential(*layers, nn.LayerNorm(work.width), nn.Linear(work.width, work.width))


def make_optimizer(model: nn.Module, work: Workload) -> torch.optim.Optimizer:
    # foreach=True: the multi-tensor path on every implementation (CPU defaults to a loop).
    return torch.optim.AdamW(model.parameters(), lr=work.lr, foreach=True)


def make_batches(work: Workload, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's batches, in memory: a smooth regression target the model can learn."""
    gen = torch.Generator().manual_seed(work.seed * 1000 + rank)
    mixing = torch.randn(work.width, work.width, generator=torch.Generator().manual_seed(0))
    batches = []
    for _ in range(work.num_batches):
        x = torch.randn(work.batch_size, work.width, generator=gen)
        batches.append((x, torch.sin(x @ mixing / work.width**0.5)))
    return batches


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """All parameters in one vector (to check that implementations trained identically)."""
    inner = getattr(model, "module", model)
    return torch.cat([p.detach().reshape(-1).clone() for p in inner.parameters()])


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(output, target)
