"""Tutorial 04: use one accel function inside a loop or framework you already have.

    accel launch -n 2 tutorials/04_one_transform_in_an_existing_loop.py   (or torchrun)

This script is "somebody else's" training code: it starts the process group, wraps the
model in DDP and steps the optimizer itself. accel takes over nothing. We borrow two
things only: distribute_loader (exact sharding, seeded shuffles, resumable position) and
gather_for_metrics (evaluation over exactly the dataset, without the padding).
`Context.from_process_group()` describes the world the framework started; `accel.shutdown`
is never needed, because accel did not create the group.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import accel


def existing_framework_setup() -> nn.Module:
    dist.init_process_group("gloo")  # the framework owns the process group
    torch.manual_seed(0)
    return DistributedDataParallel(nn.Linear(4, 3))


def main() -> None:
    model = existing_framework_setup()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    ctx = accel.Context.from_process_group()  # adopt the world; accel owns nothing
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(301, 4, generator=generator)  # 301: does not split evenly on purpose
    dataset = TensorDataset(x, x[:, :3].argmax(dim=1))
    train, _ = accel.distribute_loader(DataLoader(dataset, batch_size=10, shuffle=True), ctx)
    evaluation, _ = accel.distribute_loader(DataLoader(dataset, batch_size=32), ctx)

    for _ in range(3):  # the framework's own loop, untouched
        for inputs, labels in train:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), labels).backward()
            optimizer.step()

    correct = seen = 0
    with torch.no_grad():
        for inputs, labels in evaluation:
            predictions, labels = accel.gather_for_metrics(
                (model(inputs).argmax(dim=1), labels), ctx, evaluation)
            correct += (predictions == labels).sum().item()
            seen += len(labels)
    if ctx.is_main_process:
        print(f"evaluated {seen} samples (the dataset has {len(dataset)}): "
              f"accuracy {correct / seen:.3f}")


if __name__ == "__main__":
    main()
    # The framework's job, as before, once the DDP model is gone: a DDP model freed after
    # the group is destroyed can hang its process at exit on gloo (torch's Reducer drops
    # the group's last reference while holding the GIL).
    dist.destroy_process_group()
