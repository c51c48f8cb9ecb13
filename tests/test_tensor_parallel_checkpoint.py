"""A checkpoint of a TP 2 x FSDP 2 run loads on the same mesh, on FSDP 4, on TP 2 and on one
process, and the next steps follow the uninterrupted run (bitwise on the same mesh);
save_model of it loads with from_pretrained.

The global batch stays 8 samples per step on every mesh (dp ranks x per-rank batch), so
every mesh sees the same samples in each step.
"""

from __future__ import annotations

import pytest
import torch
from helpers import full_parameters
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

import accel
from accel.testing import run_world

transformers = pytest.importorskip("transformers")

GLOBAL_BATCH, BEFORE, AFTER, SEQ = 8, 2, 3, 10


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=64))


def prepare(ctx: accel.Context, tp: bool, strategy):
    model = llama()
    if tp:
        model, ctx = accel.tensor_parallel(model, ctx, plan="auto", sequence_parallel=True)
    model, ctx = accel.shard_model(model, ctx, strategy=strategy)
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), ctx)
    gen = torch.Generator().manual_seed(4)
    data = TensorDataset(torch.randint(0, 96, (GLOBAL_BATCH * (BEFORE + AFTER), SEQ),
                                       generator=gen))
    loader, ctx = accel.distribute_loader(
        DataLoader(data, batch_size=GLOBAL_BATCH // ctx.dp_size), ctx)
    return model, optimizer, loader, ctx


def steps(model, optimizer, batches, ctx, count: int) -> None:
    """`count` optimizer steps on the next batches of the iterator `batches`."""
    for _, (ids,) in zip(range(count), batches, strict=False):
        accel.backward(model(input_ids=ids, labels=ids).loss, optimizer, ctx)
        optimizer.step()
        optimizer.zero_grad()


def snapshot(model, optimizer, ctx) -> dict:
    """Whole parameters and optimizer state (rank 0's CPU for the latter), by name."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(model, optimizer.optimizer, options=options).get("state", {})
    moments = {f"{name}.{key}": (value.full_tensor() if isinstance(value, DTensor)
                                 else value).clone()
               for name, entry in state.items() for key, value in entry.items()
               if key in ("exp_avg", "exp_avg_sq", "step")}
    return {"params": full_parameters(accel.unwrap_model(model, ctx)), "moments": moments}


def save_then_continue(ctx: accel.Context, folder: str) -> dict:
    """TP 2 x FSDP 2: BEFORE steps, save, AFTER more steps (the uninterrupted run)."""
    model, optimizer, loader, ctx = prepare(ctx, tp=True, strategy=accel.FSDP())
    batches = iter(loader)  # one epoch across the save: a new iterator would start over
    steps(model, optimizer, batches, ctx, BEFORE)
    accel.save_state(folder, ctx, model=model, optimizer=optimizer, rng=False)
    saved = snapshot(model, optimizer, ctx)
    accel.save_model(model, f"{folder}-export", ctx)
    steps(model, optimizer, batches, ctx, AFTER)
    return {"saved": saved, "end": full_parameters(accel.unwrap_model(model, ctx))}


def load_then_continue(ctx: accel.Context, folder: str, tp: bool, strategy) -> dict:
    model, optimizer, loader, ctx = prepare(ctx, tp=tp, strategy=strategy)
    accel.load_state(folder, ctx, model=model, optimizer=optimizer, rng=False)
    loaded = snapshot(model, optimizer, ctx)
    loader = accel.skip_first_batches(loader, BEFORE)
    steps(model, optimizer, iter(loader), ctx, AFTER)
    return {"loaded": loaded, "end": full_parameters(accel.unwrap_model(model, ctx))}


def assert_close(got: dict, want: dict, tolerance: float, what: str) -> None:
    assert got.keys() == want.keys(), what
    for name, value in want.items():
        error = (got[name] - value).abs().max().item()
        assert error <= tolerance, (what, name, error)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tp") / "checkpoint")
    return folder, run_world(save_then_continue, 4, folder, mesh={"dp_shard": 2, "tp": 2},
                             timeout=400)[0]


@pytest.mark.parametrize(("mesh", "world", "tp", "strategy"), [
    ({"dp_shard": 2, "tp": 2}, 4, True, accel.FSDP()),
    ({"dp_shard": 4}, 4, False, accel.FSDP()),
    ({"tp": 2}, 2, True, None),
    (None, 1, False, "single"),
], ids=["same-mesh", "fsdp4", "tp2", "one-process"])
def test_checkpoint_of_tp_x_fsdp_loads_on_another_mesh_and_continues(original, mesh, world,
                                                                     tp, strategy):
    folder, run = original
    if world == 1:
        result = load_then_continue(accel.Context(), folder, tp, strategy)
    else:
        result = run_world(load_then_continue, world, folder, tp, strategy, mesh=mesh,
                           timeout=400)[0]
    assert_close(result["loaded"]["params"], run["saved"]["params"], 0.0, "params")
    assert_close(result["loaded"]["moments"], run["saved"]["moments"], 0.0, "adam moments")
    # the same mesh repeats the same sums: bitwise; another sums in another order
    same = mesh == {"dp_shard": 2, "tp": 2}
    assert_close(result["end"], run["end"], 0.0 if same else 1e-5, "after the next steps")


def test_save_model_of_tp_x_fsdp_loads_with_from_pretrained(original):
    folder, run = original
    loaded = transformers.LlamaForCausalLM.from_pretrained(f"{folder}-export")
    assert_close(full_parameters(loaded), run["saved"]["params"], 0.0, "exported")
    reference = llama()
    reference.load_state_dict(run["saved"]["params"])
    ids = torch.arange(SEQ).unsqueeze(0)
    assert torch.equal(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)
