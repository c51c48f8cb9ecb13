"""Context parallelism: sequences split over the cp ranks, ring attention, FSDP over
dp_shard x cp; trained to the parameters of one process on the whole sequences.

A transformers Llama from a config (fp32, grouped-query attention), AdamW, clipping that
clips, through distribute_loader (dict batches; the loader cuts the sequences, adds
global position ids and pre-shifted labels): cp 2 on 2 ranks, and dp_shard 2 x cp 2 with
accumulation 2 on 4 ranks, and tp 2 x cp 2 on 4 ranks, each within 1e-5 of one process
with the global batch.
"""

from __future__ import annotations

import pytest
import torch
from helpers import full_parameters
from torch import nn
from torch.utils.data import DataLoader, Dataset

import accel
from accel.data.sequence import cut_sequences
from accel.errors import (
    IncompatibleOptionsError,
    InvalidArgumentError,
    TransformOrderError,
    UnsupportedError,
)
from accel.testing import run_world

transformers = pytest.importorskip("transformers")

STEPS, PER_RANK, SEQ = 3, 2, 16


def llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


class Tokens(Dataset):
    """Dict samples, as transformers' collators give them."""

    def __init__(self, count: int):
        self.ids = torch.randint(0, 96, (count, SEQ), generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "labels": self.ids[index],
                "attention_mask": torch.ones(SEQ, dtype=torch.long)}


def train(ctx: accel.Context, *, accumulation: int, per_rank: int = PER_RANK) -> dict:
    model = llama()
    if ctx.tp_size > 1:
        model, ctx = accel.tensor_parallel(model, ctx, plan="auto")
    if ctx.cp_size > 1:
        model, ctx = accel.context_parallel(model, ctx)
        model, ctx = accel.shard_model(model, ctx, strategy=accel.FSDP())
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), ctx)
    count = STEPS * accumulation * per_rank * ctx.dp_size
    loader, ctx = accel.distribute_loader(DataLoader(Tokens(count), batch_size=per_rank), ctx)
    model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx, steps=accumulation,
                                                   loader=loader)
    for batch in loader:
        assert batch["input_ids"].shape[1] == SEQ // ctx.cp_size
        accel.backward(model(**batch).loss, optimizer, ctx)
        accel.clip_grad_norm(model, ctx, 0.5, optimizer=optimizer)
        optimizer.step()
        optimizer.zero_grad()
    assert optimizer.real_steps == STEPS
    return full_parameters(accel.unwrap_model(model, ctx))


def reference(dp_size: int, accumulation: int) -> dict:
    return train(accel.Context(), accumulation=1, per_rank=dp_size * PER_RANK * accumulation)


def assert_close(results: list[dict], expected: dict) -> None:
    for rank, result in enumerate(results):
        for name, value in expected.items():
            error = (result[name] - value).abs().max().item()
            assert error <= 1e-5, (rank, name, error)


def cp_only(ctx: accel.Context) -> dict:
    return train(ctx, accumulation=1)


def test_cp2_matches_one_process_on_whole_sequences():
    ranks = run_world(cp_only, 2, mesh={"cp": 2}, timeout=300)
    assert_close(ranks, reference(dp_size=1, accumulation=1))


def dp_and_cp(ctx: accel.Context) -> dict:
    return train(ctx, accumulation=2)


def test_fsdp2_x_cp2_with_accumulation_matches_one_process():
    ranks = run_world(dp_and_cp, 4, mesh={"dp_shard": 2, "cp": 2}, timeout=400)
    assert_close(ranks, reference(dp_size=2, accumulation=2))


def test_tp2_x_cp2_matches_one_process():
    ranks = run_world(cp_only, 4, mesh={"cp": 2, "tp": 2}, timeout=400)
    assert_close(ranks, reference(dp_size=1, accumulation=1))


def test_the_cut_keeps_positions_and_labels_global():
    ids = torch.arange(16).reshape(2, 8)
    parts = [cut_sequences({"input_ids": ids, "labels": ids}, rank, 2) for rank in (0, 1)]
    # head-tail: rank 0 holds chunks 0 and 3 of 4, rank 1 chunks 1 and 2
    assert parts[0]["position_ids"][0].tolist() == [0, 1, 6, 7]
    assert parts[1]["position_ids"][0].tolist() == [2, 3, 4, 5]
    assert parts[0]["shift_labels"][0].tolist() == [1, 2, 7, -100]
    assert parts[1]["shift_labels"][0].tolist() == [3, 4, 5, 6]
    assert int(parts[0]["num_items_in_batch"]) == int(parts[1]["num_items_in_batch"]) == 14


def test_bad_sequences_are_refused_clearly():
    with pytest.raises(InvalidArgumentError, match="multiple of 4"):
        cut_sequences({"input_ids": torch.zeros(1, 6, dtype=torch.long)}, 0, 2)
    padded = {"input_ids": torch.zeros(1, 8, dtype=torch.long),
              "attention_mask": torch.tensor([[1] * 6 + [0] * 2])}
    with pytest.raises(UnsupportedError, match="padding"):
        cut_sequences(padded, 0, 2)
    with pytest.raises(UnsupportedError, match="dict batches"):
        cut_sequences((torch.zeros(1, 8),), 0, 2)


def misuse(ctx: accel.Context) -> list[str]:
    caught = []
    for attempt in (
        lambda: accel.context_parallel(nn.Linear(2, 2), ctx),
        lambda: accel.shard_model(*accel.context_parallel(llama(), ctx), strategy="ddp"),
        lambda: accel.wrap_optimizer(torch.optim.SGD(llama().parameters(), lr=0.1),
                                     accel.context_parallel(llama(), ctx)[1]),
    ):
        try:
            attempt()
        except (UnsupportedError, IncompatibleOptionsError, TransformOrderError) as error:
            caught.append(type(error).__name__)
    return caught


def test_misuse_is_refused_naming_the_fix():
    with pytest.raises(IncompatibleOptionsError, match="'cp' dimension"):
        accel.context_parallel(llama(), accel.Context())
    caught = run_world(misuse, 2, mesh={"cp": 2}, timeout=120)[0]
    assert caught == ["UnsupportedError", "IncompatibleOptionsError", "TransformOrderError"]
