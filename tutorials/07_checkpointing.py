"""Tutorial 07: checkpoints that resume exactly, survive crashes and keep the disk tidy.

    accel launch -n 2 tutorials/07_checkpointing.py --dir /tmp/run --stop-after 9
    accel launch -n 2 tutorials/07_checkpointing.py --dir /tmp/run     # resumes at step 8
    accel launch -n 2 --max-restarts 3 tutorials/07_checkpointing.py --dir /tmp/run

The loop loads the newest checkpoint when there is one, and saves every few steps into
a `CheckpointFolder`, which numbers checkpoints (checkpoint_000001, ...) and keeps the
newest `total_limit`. A checkpoint holds the model, optimizer (with loss scale and
accumulation), scheduler, the loader's position in its epoch, every rank's random
generators and the step: the resumed run sees the same batches and computes the same
numbers as one that never stopped. Saves are atomic: kill the job at any moment and the
newest complete checkpoint still loads, which is what `--max-restarts` relies on.
The files are safetensors and JSON (no pickle); FSDP checkpoints are sharded and load
on any number of processes.
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import accel


def make_data(num_samples: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(num_samples, 8, generator=generator)
    return TensorDataset(x, x.sum(dim=1, keepdim=True).sin())


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True, help="the checkpoints folder")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--stop-after", type=int, default=None,
                        help="quit after this step, as if the job had been stopped")
    return parser.parse_args()


def main() -> None:
    args = parse()
    ctx = accel.init(seed=0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.1), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = DataLoader(make_data(96), batch_size=8, shuffle=True)

    model, ctx = accel.shard_model(model, ctx)
    optimizer, ctx = accel.wrap_optimizer(optimizer, ctx)
    loader, ctx = accel.distribute_loader(loader, ctx)  # 6 batches per rank and epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    scheduler, ctx = accel.wrap_scheduler(scheduler, ctx, optimizer)
    state = dict(model=model, optimizer=optimizer, scheduler=scheduler, loader=loader)

    folder = accel.CheckpointFolder(args.dir, total_limit=2)
    step = 0
    if folder.latest() is not None:
        info = accel.load_state(folder, ctx, **state)
        step = info.step
        accel.print(f"resumed from {info.path.name} at step {step} (epoch {loader.epoch})",
                    ctx=ctx)

    while step < args.steps:
        for x, y in loader:
            loss = nn.functional.mse_loss(model(x), y)
            accel.backward(loss, optimizer, ctx)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            accel.print(f"step {step}  loss {loss.item():.6f}", ctx=ctx)
            if step % args.save_every == 0:
                path = accel.save_state(folder, ctx, **state)
                accel.print(f"saved {path.name}", ctx=ctx)
            if step == args.stop_after:
                accel.print("stopping early", ctx=ctx)
                accel.shutdown(ctx)
                return
            if step == args.steps:
                break
    kept = [path.name for path in folder.checkpoints()]
    accel.print(f"done at step {step}; kept {kept}", ctx=ctx)
    accel.shutdown(ctx)


if __name__ == "__main__":
    main()
