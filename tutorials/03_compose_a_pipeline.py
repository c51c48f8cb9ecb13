"""Tutorial 03: build the preparation once with accel.compose, reuse it everywhere.

    accel launch -n 2 tutorials/03_compose_a_pipeline.py
    accel launch -n 2 --strategy fsdp --mixed-precision fp16 --grad-accum-steps 2 \
        tutorials/03_compose_a_pipeline.py

`compose` chains transforms; each receives the objects its signature names (model,
optimizer, scheduler, loader) and the pipeline returns all of them plus the Context.
The transforms' options default to the launch's settings (`ctx.settings`: precision,
strategy, accumulation steps); options bound with functools.partial
(`partial(accel.accumulate_grads, steps=4)`) fix them in the pipeline instead, so a
pipeline is a value you can build, print, and test.
"""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import accel

prepare = accel.compose(
    accel.with_amp,                         # --mixed-precision; fp32 by default
    accel.shard_model,                      # --strategy; DDP on 2+ processes, else placed
    accel.wrap_optimizer,
    accel.distribute_loader,
    accel.accumulate_grads,                 # --grad-accum-steps; the loader as its link
)


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=generator)
    y = x @ torch.arange(1.0, 9.0).unsqueeze(1) / 10
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 1))
    objects, ctx = prepare(
        accel.init(seed=0),
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        loader=DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True),
    )
    model, optimizer, loader = objects["model"], objects["optimizer"], objects["loader"]
    accel.print(ctx, ctx=ctx)  # the trail: what was applied, in order

    for epoch in range(5):
        for inputs, targets in loader:
            loss = nn.functional.mse_loss(model(inputs), targets)
            accel.backward(loss, optimizer, ctx)
            optimizer.step()
            optimizer.zero_grad()
        accel.print(f"epoch {epoch + 1}  loss {accel.reduce(loss.detach(), ctx).item():.4f}",
                    ctx=ctx)
    accel.shutdown(ctx)


if __name__ == "__main__":
    main()
