"""What each process of `accel test` runs: the checks, on the launch's settings.

Usage (by `accel test`, through `accel launch`): `python -m accel.cli._selftest_checks
--expect-world N --dir FOLDER`. Every transform takes its default, which is the launch's
setting (`ctx.settings`), exactly as in a training script: the checks run what a script
of this configuration would run. Rank 0 prints one PASS/FAIL line per check; the exit
code is 1 when a check failed on any rank.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import accel
from accel.backends import engine_of
from accel.process_group import resolve_device

#: samples per rank and micro-batch of the training check; its tolerances per precision.
BATCH = 4
TOLERANCE = {"no": 1e-5, "bf16": 2e-2, "fp16": 5e-3, "fp8": 5e-2}
Outcome = tuple[str, bool, str]


def check_device() -> None:
    """The configured device (`--device`, else detected) holds a tensor on this rank."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        device = resolve_device(None, local_rank, os.environ)
        torch.ones(1, device=device).add_(1).cpu()
    except Exception as exc:  # noqa: BLE001 - accel's or torch's words, with the setting
        configured = os.environ.get("ACCEL_DEVICE")
        where = f"the configured device {configured!r} ($ACCEL_DEVICE, from --device or " \
                "the config file)" if configured else "the detected device"
        raise AssertionError(f"{where} cannot hold a tensor here: "
                             f"{type(exc).__name__}: {exc}") from exc


def check_collectives(ctx: accel.Context, expect_world: int) -> str:
    """reduce, gather, broadcast and gather_object give the values every rank expects."""
    if ctx.world_size != expect_world:
        raise AssertionError(f"{ctx.world_size} processes joined, the launch asked for "
                             f"{expect_world}")
    n = ctx.world_size
    mine = torch.tensor([float(ctx.rank + 1)], device=ctx.device)
    total = accel.reduce(mine, ctx, op="sum", ranks="all").item()
    _expect("reduce(sum)", total, n * (n + 1) / 2)
    gathered = accel.gather(mine, ctx, ranks="all").tolist()
    _expect("gather", gathered, [float(r + 1) for r in range(n)])
    sent = accel.broadcast(mine.clone(), ctx, src=0).item()
    _expect("broadcast", sent, 1.0)
    names = accel.gather_object([f"rank{ctx.rank}"], ctx, ranks="all")
    _expect("gather_object", names, [f"rank{r}" for r in range(n)])
    return f"reduce, gather, broadcast, gather_object on {n} processes ({ctx.device.type})"


def _expect(what: str, got: Any, expected: Any) -> None:
    if got != expected:
        raise AssertionError(f"{what} gave {got}, expected {expected}")


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # With momentum: the checkpoint check then has optimizer state to carry.
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)


def check_training(ctx: accel.Context, state: dict[str, Any]) -> str:
    """One optimizer step with the configured precision, strategy and accumulation equals
    one process's step on the whole batch (N processes x b x k = 1 x N*b*k)."""
    model, ctx = accel.with_amp(build_model().to(ctx.device), ctx)
    model, ctx = accel.shard_model(model, ctx)
    optimizer, ctx = accel.wrap_optimizer(make_optimizer(model), ctx)
    model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx)
    steps, n = optimizer.accumulation.steps, ctx.dp_size
    inputs, targets = _data(n * BATCH * steps, ctx.device)
    for micro in range(steps):
        rows = slice((micro * n + ctx.dp_rank) * BATCH, (micro * n + ctx.dp_rank + 1) * BATCH)
        loss = nn.functional.mse_loss(model(inputs[rows]), targets[rows])
        accel.backward(loss, optimizer, ctx)
        optimizer.step()
        optimizer.zero_grad()
    state.update(model=model, optimizer=optimizer, ctx=ctx)
    trained = _full_weights(model, ctx)
    how = f"{engine_of(ctx).name}, {ctx.precision}, {steps} micro-batch(es)"
    if trained is None:  # ranks other than 0 receive no full copy
        return how
    worst = _worst_difference(trained, _reference(inputs, targets, ctx))
    if worst > TOLERANCE[ctx.precision]:
        raise AssertionError(f"{how}: parameters differ from one process on the whole batch "
                             f"by {worst:.2e} (tolerance {TOLERANCE[ctx.precision]:.0e})")
    return f"{how}: equals one process on the whole batch (max difference {worst:.1e})"


def _data(rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(rows, 8, generator=generator)
    return inputs.to(device), torch.randn(rows, 4, generator=generator).to(device)


def _reference(inputs: torch.Tensor, targets: torch.Tensor,
               ctx: accel.Context) -> dict[str, torch.Tensor]:
    """The same step on one process, whole batch, the same autocast as the run."""
    model = build_model().to(ctx.device)
    lowered = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
    with torch.autocast(ctx.device.type, dtype=lowered.get(ctx.precision, torch.float32),
                        enabled=ctx.precision != "no"):
        outputs = model(inputs)
    nn.functional.mse_loss(outputs.float(), targets).backward()
    make_optimizer(model).step()
    return {name: p.detach().cpu() for name, p in model.state_dict().items()}


def _full_weights(model: nn.Module, ctx: accel.Context) -> dict[str, torch.Tensor] | None:
    """Every weight whole on rank 0 (any engine: gathered shards, ZeRO partitions)."""
    full, _ = engine_of(ctx).get_state_dict(model, None, full=True)
    if not ctx.is_main_process:
        return None
    return {name: tensor.detach().float().cpu() for name, tensor in full.items()}


def _worst_difference(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    if set(got) != set(expected):
        raise AssertionError(f"weights {sorted(got)} do not match the model's "
                             f"{sorted(expected)}")
    return max((got[name] - expected[name]).abs().max().item() for name in expected)


def check_checkpoint(ctx: accel.Context, state: dict[str, Any], folder: Path) -> str:
    """save_state, one more step, load_state: the weights are those saved, bit for bit."""
    if "model" not in state:
        raise AssertionError("skipped: the training step failed")
    model, optimizer, ctx = state["model"], state["optimizer"], state["ctx"]
    path = accel.save_state(folder / "checkpoint", ctx, model=model, optimizer=optimizer)
    saved = _full_weights(model, ctx)
    steps = optimizer.accumulation.steps
    inputs, targets = _data(BATCH * steps, ctx.device)
    for micro in range(steps):  # move the weights away from the saved ones
        rows = slice(micro * BATCH, (micro + 1) * BATCH)
        accel.backward(nn.functional.mse_loss(model(inputs[rows]), targets[rows]),
                       optimizer, ctx)
        optimizer.step()
        optimizer.zero_grad()
    accel.load_state(path, ctx, model=model, optimizer=optimizer)
    loaded = _full_weights(model, ctx)
    if saved is not None and _worst_difference(loaded, saved) != 0:
        raise AssertionError("the weights loaded differ from those saved")
    return f"save_state, load_state in {path.parent}: the weights come back exactly"


def run_checks(ctx: accel.Context, expect_world: int, folder: Path) -> list[Outcome]:
    state: dict[str, Any] = {}
    checks: list[tuple[str, Callable[[], str]]] = [
        ("collectives", lambda: check_collectives(ctx, expect_world)),
        ("training step", lambda: check_training(ctx, state)),
        ("checkpoint round trip", lambda: check_checkpoint(ctx, state, folder)),
    ]
    outcomes = []
    for name, check in checks:
        try:
            outcomes.append((name, True, check()))
        except Exception as exc:  # noqa: BLE001 - every failure is a FAIL line, not a crash
            outcomes.append((name, False, _describe(exc)))
    return outcomes


def _describe(exc: Exception) -> str:
    if isinstance(exc, AssertionError):
        return str(exc)
    where = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})"


def report(per_rank: dict[int, list[Outcome]]) -> bool:
    """One line per check: PASS with the first rank's detail, or FAIL with each failing
    rank's."""
    passed = True
    for index, (name, _, detail) in enumerate(next(iter(per_rank.values()))):
        failures = [(rank, outcomes[index][2]) for rank, outcomes in per_rank.items()
                    if not outcomes[index][1]]
        if failures:
            passed = False
            for rank, why in failures:
                print(f"FAIL  {name} (rank {rank}): {why}", flush=True)
        else:
            print(f"PASS  {name}: {detail}", flush=True)
    return passed


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="accel test (rank)")
    parser.add_argument("--expect-world", type=int, required=True)
    parser.add_argument("--dir", required=True)
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    for name, check in (("device", check_device), ("init", accel.init)):
        try:
            ctx = check()
        except Exception as exc:  # noqa: BLE001 - the settings' first failure: say which
            print(f"FAIL  {name} (rank {rank}): {_describe(exc)}", file=sys.stderr, flush=True)
            return 1
    if ctx.is_main_process:
        print(f"PASS  init: {ctx.world_size} processes on {ctx.device.type} "
              f"({ctx.dist_backend})", flush=True)
    try:
        outcomes = run_checks(ctx, args.expect_world, Path(args.dir))
        try:
            per_rank = dict(enumerate(accel.gather_object([outcomes], ctx, ranks="all")))
        except Exception:  # noqa: BLE001 - no agreement possible: each rank says its own
            per_rank = {ctx.rank: outcomes}
            print(f"(rank {ctx.rank} alone: the ranks could not exchange their results)",
                  flush=True)
        # Rank 0 reports and fails the run for everyone, unless each rank speaks alone.
        speaks = ctx.is_main_process or len(per_rank) == 1
        passed = report(per_rank) if speaks else True
    finally:
        accel.shutdown(ctx)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
