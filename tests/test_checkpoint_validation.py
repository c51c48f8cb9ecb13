"""Loading a checkpoint into another setup: every difference in one error, nothing changed.

Each case (a layer of another shape, a missing or extra layer, SGD for AdamW, other param
groups, another scheduler class) is loaded into a trained setup whose every tensor, its
optimizer state_dict and its scheduler state are compared before and after: in one
process (full layout) and under FSDP on 2 ranks (sharded layout). load_model lists every
difference too.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

import accel
from accel.checkpoint import load_model, load_state, save_state
from accel.checkpoint.tree import flatten
from accel.errors import CheckpointMismatchError, InvalidArgumentError
from accel.testing import run_world

#: each case, and what its error must say (one line per difference, all of them).
CASES = {
    "shape": ["model 0.weight: shape [8, 6] in the checkpoint, [9, 6] in this model",
              "model 0.bias: shape [8] in the checkpoint, [9] in this model",
              "model 2.weight: shape [3, 8] in the checkpoint, [3, 9] in this model",
              "optimizer state 0.weight/exp_avg: shape [8, 6] in the checkpoint, [9, 6] here"],
    "missing layer": ["model: the checkpoint has 2.bias, 2.weight, which this one lacks",
                      "optimizer state for 2.weight, which this model lacks"],
    "extra layer": ["model: the checkpoint lacks 3.bias, 3.weight, which this one has",
                    "optimizer: the checkpoint holds no state for 3.weight, 3.bias"],
    "sgd": ["optimizer: AdamW in the checkpoint, SGD here",
            "optimizer state 0.weight: ['exp_avg', 'exp_avg_sq', 'step'] in the checkpoint, "
            "['momentum_buffer'] here"],
    "groups": ["optimizer: 1 param groups in the checkpoint, 2 here",
               "optimizer param group 0: 4 parameters in the checkpoint, 2 here"],
    "scheduler": ["scheduler: StepLR in the checkpoint, CosineAnnealingLR here"],
}


def setup(ctx, case: str = "same"):
    """A model, optimizer and scheduler, trained one step (so the optimizer holds state)."""
    torch.manual_seed(0)
    hidden = 9 if case == "shape" else 8
    layers = [nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, 3)]
    layers = layers[:2] if case == "missing layer" else layers
    layers += [nn.Linear(3, 3)] if case == "extra layer" else []
    model = nn.Sequential(*layers)
    if ctx.is_distributed:
        model, ctx = accel.shard_model(model, ctx, strategy="fsdp")
    params = list(model.parameters())
    if case == "sgd":
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    elif case == "groups":
        optimizer = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}], lr=0.1)
    else:
        optimizer = torch.optim.AdamW(params, lr=0.1)
    optimizer, ctx = accel.wrap_optimizer(optimizer, ctx)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10) if case == "scheduler"
                 else torch.optim.lr_scheduler.StepLR(optimizer, 2))
    scheduler, ctx = accel.wrap_scheduler(scheduler, ctx, optimizer)
    accel.backward(model(torch.randn(4, 6)).square().mean(), optimizer, ctx)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return model, optimizer, scheduler, ctx


def snapshot(model, optimizer, scheduler) -> tuple[dict[str, torch.Tensor], str]:
    """Copies of every tensor (this rank's shards), and every other value as JSON."""
    skeleton, tensors = flatten({"model": model.state_dict(),
                                 "optimizer": optimizer.optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict()})
    local = {key: (value.to_local() if isinstance(value, DTensor) else value).clone()
             for key, value in tensors.items()}
    return local, json.dumps(skeleton, sort_keys=True, default=str)


def unchanged(before, after) -> bool:
    return before[1] == after[1] and before[0].keys() == after[0].keys() and all(
        torch.equal(before[0][key], after[0][key]) for key in before[0])


def try_every_case(ctx, path) -> dict[str, tuple[str, str, bool]]:
    """{case: (error type, message, everything unchanged)}; then the same setup loads."""
    outcomes = {}
    for case in CASES:
        model, optimizer, scheduler, case_ctx = setup(ctx, case)
        before = snapshot(model, optimizer, scheduler)
        try:
            load_state(path, case_ctx, model=model, optimizer=optimizer, scheduler=scheduler,
                       rng=False)
            outcomes[case] = ("loaded", "", True)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            outcomes[case] = (type(exc).__name__, str(exc),
                              unchanged(before, snapshot(model, optimizer, scheduler)))
    model, optimizer, scheduler, same_ctx = setup(ctx)
    load_state(path, same_ctx, model=model, optimizer=optimizer, scheduler=scheduler, rng=False)
    return outcomes


def check(outcomes: dict[str, tuple[str, str, bool]]) -> None:
    for case, lines in CASES.items():
        kind, message, kept = outcomes[case]
        assert kind == "CheckpointMismatchError", (case, kind, message)
        assert kept, f"{case}: the model, optimizer or scheduler changed"
        for line in lines:
            assert f"  - {line}\n" in message, (case, line, message)
        assert "nothing was loaded" in message and "same setup that saved it" in message


def test_another_setup_is_refused_in_one_process_and_nothing_changes(tmp_path):
    model, optimizer, scheduler, ctx = setup(accel.Context())
    path = save_state(tmp_path / "ckpt", ctx, model=model, optimizer=optimizer,
                      scheduler=scheduler)
    saved = json.loads((path / "accel.json").read_text())["saved"]
    assert (saved["optimizer_class"], saved["scheduler_class"]) == ("AdamW", "StepLR")
    outcomes = try_every_case(accel.Context(), path)
    check(outcomes)
    assert outcomes["shape"][1].count("\n  - ") == 9  # every tensor's, not only the first


def fsdp_world(ctx, directory: str) -> dict[str, tuple[str, str, bool]]:
    model, optimizer, scheduler, fsdp_ctx = setup(ctx)
    path = save_state(f"{directory}/ckpt", fsdp_ctx, model=model, optimizer=optimizer,
                      scheduler=scheduler)
    return try_every_case(ctx, path)


@pytest.mark.spawned
def test_another_setup_is_refused_under_fsdp_and_nothing_changes(tmp_path):
    for outcomes in run_world(fsdp_world, 2, str(tmp_path)):  # every rank raised, unchanged
        check(outcomes)
    assert json.loads((tmp_path / "ckpt" / "accel.json").read_text())["layout"] == "sharded"


def test_a_checkpoint_without_the_recorded_classes_still_loads(tmp_path):
    model, optimizer, scheduler, ctx = setup(accel.Context())
    path = save_state(tmp_path / "ckpt", ctx, model=model, optimizer=optimizer,
                      scheduler=scheduler)
    metadata = json.loads((path / "accel.json").read_text())
    for field in ("optimizer_class", "scheduler_class"):  # as an earlier accel wrote it
        del metadata["saved"][field]
    (path / "accel.json").write_text(json.dumps(metadata))
    model2, optimizer2, scheduler2, _ = setup(ctx, "scheduler")  # the class is unknown now
    load_state(path, ctx, model=model2, optimizer=optimizer2, scheduler=scheduler2, rng=False)
    assert torch.equal(model2[0].weight, model[0].weight)


def test_load_model_lists_every_difference_and_copies_nothing(tmp_path):
    torch.manual_seed(0)
    save_file({"0.weight": torch.ones(8, 6), "0.bias": torch.ones(8), "2.weight": torch.ones(3, 8),
               "9.weight": torch.ones(1)}, tmp_path / "w.safetensors")
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 3))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as failure:
        load_model(model, tmp_path / "w.safetensors", accel.Context())
    message = str(failure.value)
    for line in ("missing 2.bias", "unexpected 9.weight",
                 "0.weight in w.safetensors has shape [8, 6], the model's 0.weight has [9, 6]",
                 "0.bias in w.safetensors has shape [8], the model's 0.bias has [9]",
                 "2.weight in w.safetensors has shape [3, 8], the model's 2.weight has [3, 9]",
                 "strict=False"):
        assert line in message, (line, message)
    assert isinstance(failure.value, InvalidArgumentError)  # what callers caught before
    with pytest.raises(CheckpointMismatchError, match="has shape") as failure:
        load_model(model, tmp_path / "w.safetensors", accel.Context(), strict=False)
    assert "missing" not in str(failure.value)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
