"""Tutorial 11: accel inside Ray Train: Ray starts the workers, accel does the rest.

    pip install 'accel[ray]'
    python tutorials/11_ray_train.py --storage /tmp/ray_results
    python tutorials/11_ray_train.py --storage /tmp/ray_results --strategy fsdp --fail-at-step 10

`ray.train.torch.TorchTrainer` starts one worker process per slot and the
torch.distributed process group between them; `accel.Context.from_process_group()`
adopts that group, and accel's transforms run on it as they do under `accel launch`.
The checkpoints are accel's (`save_state`: sharded with FSDP, with the loader's position
and every rank's random state), handed to Ray with `ray.train.report(checkpoint=...)`.
When a worker dies, Ray tears the group down and starts a new one
(`FailureConfig(max_failures=1)`), where `ray.train.get_checkpoint()` gives `load_state`
the newest checkpoint Ray registered: the run ends with the parameters of a run that never
failed, bit for bit. `--fail-at-step N` kills worker 1 in step N of the first attempt.

Ray registers a checkpoint once every worker's report of that round has reached its
controller (polled every 2 s), so a worker that dies right after a report may take that
round with it; the run then resumes from the round before, with the same end result. Never
from further back: each worker holds one unread report at most (its next report waits for
the controller to take the last), so every round before the newest is registered.

On a cluster: `--address auto` joins the running Ray cluster; `save_state` needs a folder
every worker sees (`--scratch` on a shared filesystem), and Ray's storage (`--storage`)
must be shared too (NFS, or s3://...). `prepare` and `train_step` are plain accel code
that runs the same without Ray: only `train_func` and `main` use it.
"""

import argparse
import os
import shutil
import signal
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import accel


def make_data(num_samples: int = 96) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(num_samples, 8, generator=generator)
    return TensorDataset(x, x.sum(dim=1, keepdim=True).sin())


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.1), nn.Tanh(), nn.Linear(32, 1))


def prepare(ctx: accel.Context, strategy: str):
    """Model, optimizer and loader on this world: the same on every attempt."""
    accel.set_seed(0, ctx)  # the same initial weights on every rank
    model, ctx = accel.shard_model(make_model(), ctx,
                                   strategy=accel.FSDP() if strategy == "fsdp" else strategy)
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), ctx)
    loader, ctx = accel.distribute_loader(DataLoader(make_data(), batch_size=8, shuffle=True),
                                          ctx)
    return model, optimizer, loader, ctx


def train_step(model, optimizer, batch, ctx: accel.Context) -> float:
    """One optimizer step; the loss averaged over the ranks."""
    x, y = batch
    loss = nn.functional.mse_loss(model(x), y)
    accel.backward(loss, optimizer, ctx)
    optimizer.step()
    optimizer.zero_grad()
    return accel.reduce(loss.detach(), ctx).item()


def train_func(config: dict) -> None:
    """What every Ray worker runs, inside the process group Ray started."""
    import ray.train

    ctx = accel.Context.from_process_group()
    model, optimizer, loader, ctx = prepare(ctx, config["strategy"])
    state = dict(model=model, optimizer=optimizer, loader=loader)
    step = 0
    checkpoint = ray.train.get_checkpoint()  # None on the first attempt
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            step = accel.load_state(path, ctx, **state).step
    resumed_from = step
    scratch = Path(config["scratch"])
    while step < config["steps"]:
        for batch in loader:
            _maybe_fail(ctx, step + 1, config, scratch / "failed-once")
            loss = train_step(model, optimizer, batch, ctx)
            step += 1
            if step % config["save_every"] == 0 or step == config["steps"]:
                # Every rank writes its part, into a folder every rank sees.
                path = accel.save_state(scratch / f"step_{step:06d}", ctx, **state)
                # Every worker reports (Ray's barrier); rank 0 hands over the folder,
                # which Ray copies into its storage and then deletes here.
                ray.train.report(
                    {"step": step, "loss": loss, "resumed_from": resumed_from},
                    checkpoint=(ray.train.Checkpoint.from_directory(str(path))
                                if ctx.is_main_process else None),
                    delete_local_checkpoint_after_upload=ctx.is_main_process)
            if step == config["steps"]:
                break


def _maybe_fail(ctx: accel.Context, step: int, config: dict, marker: Path) -> None:
    """Worker 1 is killed (SIGKILL: no cleanup, no exception, as the OOM killer or a lost
    machine ends it) in step `fail_at_step` of the first attempt."""
    if ctx.rank == 1 and step == config["fail_at_step"] and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--storage", required=True, help="Ray's storage_path")
    parser.add_argument("--scratch", default=None,
                        help="where save_state writes before Ray copies (default: a temp dir)")
    parser.add_argument("--name", default="accel_ray")
    parser.add_argument("--address", default=None, help="a Ray cluster; default: a local one")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--fail-at-step", type=int, default=None)
    return parser.parse_args()


def main() -> None:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    args = parse()
    scratch = args.scratch or tempfile.mkdtemp(prefix="accel-ray-")
    if args.address:
        ray.init(address=args.address)
    else:  # a local cluster with one CPU per worker
        ray.init(num_cpus=args.workers, include_dashboard=False)
    try:
        trainer = TorchTrainer(
            train_func,
            train_loop_config={"strategy": args.strategy, "steps": args.steps,
                               "save_every": args.save_every, "scratch": scratch,
                               "fail_at_step": args.fail_at_step},
            scaling_config=ScalingConfig(num_workers=args.workers),
            run_config=RunConfig(name=args.name, storage_path=args.storage,
                                 failure_config=FailureConfig(max_failures=1)),
        )
        result = trainer.fit()
    finally:
        ray.shutdown()  # stops the local cluster's processes
        if args.scratch is None:  # ours: Ray moved the checkpoints out, the folder is left
            shutil.rmtree(scratch, ignore_errors=True)
    metrics = result.metrics
    print(f"finished at step {metrics['step']}, loss {metrics['loss']:.6f}, "
          f"last attempt resumed from step {metrics['resumed_from']}")
    print(f"final checkpoint: {result.checkpoint.path}")


if __name__ == "__main__":
    main()
