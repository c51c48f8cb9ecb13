"""Tutorial 02: your own training loop, with every training transform.

    accel launch -n 2 tutorials/02_custom_training_loop.py
    accel launch -n 2 --mixed-precision fp16 --grad-accum-steps 4 \
        tutorials/02_custom_training_loop.py
    accel launch -n 2 --strategy fsdp --mixed-precision bf16 tutorials/02_custom_training_loop.py
    python tutorials/02_custom_training_loop.py            # one process, same code

The loop below is plain PyTorch; the transforms before it decide how it runs: in which
precision (with_amp), on which engine (shard_model: one process, DDP, FSDP2 or DeepSpeed
ZeRO), with which loss scaling (wrap_optimizer), how often the optimizer really steps
(accumulate_grads), how the schedule counts (wrap_scheduler) and which batches each
process reads (distribute_loader). Called without options, the transforms take the
launch's settings (`ctx.settings`: flags, ACCEL_* variables, `--config FILE`), and fp32,
the default engine and no accumulation where none is set. Change a flag, not the loop.

`progress` draws one progress bar (on the main process), and `init_trackers` logs
the metrics once, to runs/RUN_NAME/metrics.jsonl; chart them with `accel plot RUN_DIR`.
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import accel


def make_data(num_samples: int, seed: int) -> TensorDataset:
    """Two-class points: the label says whether the first four features sum above zero."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, 16, generator=generator)
    return TensorDataset(x, (x[:, :4].sum(dim=1) > 0).long())


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--project-dir", default="runs", help="where the metrics go")
    return parser.parse_args()


def main() -> None:
    args = parse()
    ctx = accel.init(seed=0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = DataLoader(make_data(1024, seed=1), batch_size=16, shuffle=True)
    evaluation = DataLoader(make_data(250, seed=2), batch_size=32)

    model, ctx = accel.with_amp(model, ctx)          # --mixed-precision (fp32 if unset)
    model, ctx = accel.shard_model(model, ctx)       # --strategy (DDP on 2+ if unset)
    optimizer, ctx = accel.wrap_optimizer(optimizer, ctx)
    train, ctx = accel.distribute_loader(train, ctx)
    evaluation, ctx = accel.distribute_loader(evaluation, ctx)
    model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx,  # --grad-accum-steps
                                                   loader=train)
    # Schedules count real optimizer steps: batches per process / accumulation. Build
    # them after distribute_loader, whose length is this process's share.
    total_steps = args.epochs * -(-len(train) // ctx.grad_accum_steps)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3,
                                                    total_steps=total_steps)
    scheduler, ctx = accel.wrap_scheduler(scheduler, ctx, optimizer)
    accel.print(ctx, ctx=ctx)
    # Every rank calls it; only the main process writes (the others' trackers do nothing).
    trackers = accel.init_trackers(ctx, ["jsonl"], args.project_dir,
                                   config={**vars(args), **ctx.settings.values()})

    step = 0
    for epoch in range(args.epochs):
        model.train()
        for x, y in accel.progress(train, ctx, desc=f"epoch {epoch + 1}", leave=False):
            loss = nn.functional.cross_entropy(model(x), y)
            accel.backward(loss, optimizer, ctx)
            accel.clip_grad_norm(model, ctx, 1.0, optimizer=optimizer)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            trackers.log({"train/loss": loss.detach(), "lr": scheduler.get_last_lr()[0]}, step)

        model.eval()
        correct = seen = 0
        with torch.no_grad():
            for x, y in evaluation:
                predictions = model(x).argmax(dim=-1)
                # Every sample exactly once: the padding that evened out ranks is dropped.
                predictions, y = accel.gather_for_metrics((predictions, y), ctx, evaluation)
                correct += (predictions == y).sum().item()
                seen += len(y)
        accel.print(f"epoch {epoch + 1}  loss {loss.item():.4f}  accuracy {correct / seen:.3f} "
                    f"({seen} samples)  lr {scheduler.get_last_lr()[0]:.2e}", ctx=ctx)
        trackers.log({"eval/accuracy": correct / seen}, step)
    trackers.finish()
    accel.print(f"metrics in {trackers.run_dir}; chart them: accel plot {trackers.run_dir}",
                ctx=ctx)
    accel.shutdown(ctx)


if __name__ == "__main__":
    main()
