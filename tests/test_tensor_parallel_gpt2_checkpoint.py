"""GPT-2 under tensor_parallel(plan="auto", sequence_parallel=True, loss_parallel=True) x
FSDP: its checkpoint loads on one process with the same parameters and Adam moments (the
fused q|k|v strided shard, the vocabulary-sharded tied embedding and head, the norms'
replicated DTensors included), and save_model gives a model that from_pretrained loads
with identical logits.
"""

from __future__ import annotations

import pytest
import torch
from helpers import full_parameters
from test_tensor_parallel_checkpoint import assert_close, snapshot
from torch.utils.data import DataLoader, TensorDataset

import accel
from accel.testing import run_world

transformers = pytest.importorskip("transformers")

SEQ, BATCH, STEPS = 10, 4, 2


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=0, bos_token_id=0))


def prepare(ctx: accel.Context, tp: bool, strategy):
    model = gpt2()
    if tp:
        model, ctx = accel.tensor_parallel(model, ctx, plan="auto", sequence_parallel=True,
                                           loss_parallel=True)
    model, ctx = accel.shard_model(model, ctx, strategy=strategy)
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), ctx)
    return model, optimizer, ctx


def train_and_save(ctx: accel.Context, folder: str) -> dict:
    model, optimizer, ctx = prepare(ctx, tp=True, strategy=accel.FSDP())
    data = TensorDataset(torch.randint(0, 96, (BATCH * STEPS * ctx.dp_size, SEQ),
                                       generator=torch.Generator().manual_seed(5)))
    loader, ctx = accel.distribute_loader(DataLoader(data, batch_size=BATCH), ctx)
    for (ids,) in loader:
        accel.backward(model(input_ids=ids, labels=ids).loss, optimizer, ctx)
        optimizer.step()
        optimizer.zero_grad()
    accel.save_state(folder, ctx, model=model, optimizer=optimizer, rng=False)
    accel.save_model(model, f"{folder}-export", ctx)
    return snapshot(model, optimizer, ctx)


def test_gpt2_tp_x_fsdp_checkpoint_loads_on_one_process_and_exports(tmp_path):
    folder = str(tmp_path / "checkpoint")
    saved = run_world(train_and_save, 4, folder, mesh={"dp_shard": 2, "tp": 2},
                      timeout=400)[0]
    model, optimizer, ctx = prepare(accel.Context(), tp=False, strategy="single")
    accel.load_state(folder, ctx, model=model, optimizer=optimizer, rng=False)
    loaded = snapshot(model, optimizer, ctx)
    assert_close(loaded["params"], saved["params"], 0.0, "params")
    assert_close(loaded["moments"], saved["moments"], 0.0, "adam moments")
    exported = transformers.GPT2LMHeadModel.from_pretrained(f"{folder}-export")
    assert_close(full_parameters(exported), saved["params"], 0.0, "exported")
    ids = torch.arange(SEQ).unsqueeze(0)
    assert torch.equal(exported(input_ids=ids).logits, model(input_ids=ids).logits)
