"""`optimizer.sync_gradients` is latched per micro-batch, as Accelerate's is.

It is decided at a micro-batch's first forward and holds until the next micro-batch's
first forward, so it reads the same before and after `optimizer.step()` (and
`zero_grad()`). transformers' `*_no_trainer.py` scripts read it after the step to count
real updates and to checkpoint; ported literally, that loop must count every update
once and save only at the end of a cycle (save_state refuses the middle of one).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import accel
from accel.testing import run_world

K = 4          # micro-batches per optimizer update
SAMPLES = 40   # 2 ranks x batch 2: 10 micro-batches per rank and epoch (cycles 4, 4, 2)
EPOCHS = 2
CHECKPOINTING_STEPS = 2


def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, 4, generator=gen)
    return TensorDataset(x, x[:, :2] - x[:, 2:])


def train_like_no_trainer(ctx: accel.Context, out_dir: str) -> dict:
    """The loop of transformers' `run_*_no_trainer.py`, written with accel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    model, ctx = accel.shard_model(model, ctx)  # DDP on 2 processes
    optimizer, ctx = accel.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), ctx)
    loader, ctx = accel.distribute_loader(DataLoader(dataset(), batch_size=2, shuffle=True),
                                          ctx, seed=0)
    model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx, steps=K,
                                                   loader=loader)
    readings, saved, completed_steps = [], [], 0
    for _ in range(EPOCHS):
        model.train()
        for x, y in loader:
            loss = nn.functional.mse_loss(model(x), y)
            accel.backward(loss, optimizer, ctx)
            before = optimizer.sync_gradients
            optimizer.step()
            after_step = optimizer.sync_gradients
            optimizer.zero_grad()
            readings.append((before, after_step, optimizer.sync_gradients,
                             not optimizer.step_was_skipped))
            # Checks if the optimizer has performed an optimization step behind the scenes
            if optimizer.sync_gradients:
                completed_steps += 1
            if completed_steps % CHECKPOINTING_STEPS == 0 and optimizer.sync_gradients:
                output_dir = Path(out_dir) / f"step_{completed_steps}"
                saved.append(accel.save_state(output_dir, ctx, model=model,
                                              optimizer=optimizer, loader=loader).name)
        model.eval()
        with torch.no_grad():  # an evaluation forward between epochs starts no micro-batch
            model(x)
    return {"readings": readings, "saved": saved, "completed_steps": completed_steps,
            "real_steps": optimizer.real_steps}


def expected_boundaries(batches_per_epoch: int) -> list[bool]:
    """The micro-batches that end a cycle: every K-th, and the epoch's last."""
    return [(i + 1) % K == 0 or i == batches_per_epoch - 1
            for i in range(batches_per_epoch)] * EPOCHS


def check_run(result: dict, batches_per_epoch: int) -> None:
    boundaries = expected_boundaries(batches_per_epoch)
    assert len(result["readings"]) == len(boundaries)
    for index, (before, after_step, after_zero, stepped) in enumerate(result["readings"]):
        # The same answer before and after step() and zero_grad(), on every micro-batch,
        # and it is whether the step really updated the parameters.
        assert before == after_step == after_zero == stepped == boundaries[index], index
    steps = sum(boundaries)
    assert result["completed_steps"] == result["real_steps"] == steps
    assert result["saved"] == [f"step_{n}" for n in range(CHECKPOINTING_STEPS, steps + 1,
                                                          CHECKPOINTING_STEPS)]


def test_one_process_reads_the_same_before_and_after_step(tmp_path):
    result = train_like_no_trainer(accel.Context(), str(tmp_path))
    check_run(result, batches_per_epoch=SAMPLES // 2)  # 20 micro-batches: 5 full cycles


@pytest.mark.spawned
def test_two_ranks_read_the_same_before_and_after_step(tmp_path):
    results = run_world(train_like_no_trainer, 2, str(tmp_path))
    for result in results:
        check_run(result, batches_per_epoch=SAMPLES // 4)  # 10: cycles of 4, 4 and 2
    assert results[0]["saved"] == ["step_2", "step_4", "step_6"]


def accumulating(steps: int) -> tuple:
    model = nn.Linear(2, 1)
    optimizer, ctx = accel.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                          accel.Context())
    return accel.accumulate_grads(model, optimizer, ctx, steps=steps)


def test_before_the_first_forward_it_answers_for_the_micro_batch_to_come():
    _, optimizer, _ = accumulating(1)
    assert optimizer.sync_gradients  # steps=1: every micro-batch ends its cycle
    model, optimizer, ctx = accumulating(2)
    assert not optimizer.sync_gradients
    accel.backward(model(torch.ones(1, 2)).sum(), optimizer, ctx)
    optimizer.step()
    assert not optimizer.sync_gradients  # still the first micro-batch's answer
    accel.backward(model(torch.ones(1, 2)).sum(), optimizer, ctx)
    assert optimizer.sync_gradients  # the second micro-batch's forward decided
