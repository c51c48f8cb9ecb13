"""Tensor parallelism on the mesh: TP alone, with sequence and loss parallelism, and TP x FSDP
/ HSDP as torchtitan composes them, each trained to the parameters of one process.

A transformers Llama from a config (fp32), AdamW, accumulation 2, gradient clipping that
really clips (global norm over 1-D and 2-D DTensors), 5 optimizer steps through
distribute_loader: N data-parallel ranks x batch b x accumulation k == 1 process with
batch N*b*k, within 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from helpers import full_parameters
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torch.utils.data import DataLoader, TensorDataset

import accel
from accel.errors import IncompatibleOptionsError, TransformOrderError, UnsupportedError
from accel.testing import run_world

transformers = pytest.importorskip("transformers")

STEPS, ACCUMULATION, PER_RANK, SEQ = 5, 2, 2, 12


def llama(layers: int = 4, tied: bool = False) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
        tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config)


def tied_llama(layers: int = 4) -> nn.Module:
    """Llama with its LM head tied to the embedding (Llama 3.2 1B, Qwen2 0.5B are)."""
    model = llama(layers, tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def gpt2(layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=96,
                                     n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, eos_token_id=0, bos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def tokens(dp_size: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(3)
    count = STEPS * ACCUMULATION * PER_RANK * dp_size
    return TensorDataset(torch.randint(0, 96, (count, SEQ), generator=gen))


def train(ctx: accel.Context, *, layers: int = 4, per_rank: int = PER_RANK,
          accumulation: int = ACCUMULATION, dp_size: int | None = None, tp: dict | None = None,
          strategy=None, build=llama) -> dict:
    """5 AdamW steps on a Llama (or `build`); `tp` holds tensor_parallel's options."""
    model = build(layers)
    if tp is not None:
        model, ctx = accel.tensor_parallel(model, ctx, plan="auto", **tp)
    model, ctx = accel.shard_model(model, ctx, strategy=strategy)
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), ctx)
    loader, ctx = accel.distribute_loader(
        DataLoader(tokens(dp_size or ctx.dp_size), batch_size=per_rank), ctx)
    model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx, steps=accumulation,
                                                   loader=loader)
    for (ids,) in loader:
        loss = model(input_ids=ids, labels=ids).loss
        accel.backward(loss, optimizer, ctx)
        accel.clip_grad_norm(model, ctx, 0.5, optimizer=optimizer)
        optimizer.step()
        optimizer.zero_grad()
    assert optimizer.real_steps == STEPS
    return full_parameters(accel.unwrap_model(model, ctx))


def reference(dp_size: int, layers: int = 4, build=llama) -> dict:
    """One process, the global batch of dp_size ranks x PER_RANK x ACCUMULATION at once."""
    return train(accel.Context(), layers=layers, per_rank=dp_size * PER_RANK * ACCUMULATION,
                 accumulation=1, dp_size=dp_size, strategy="single", build=build)


def assert_close(results: list[dict], expected: dict, what: str,
                 tolerance: float = 1e-5) -> None:
    for rank, result in enumerate(results):
        for name, value in expected.items():
            error = (result[name] - value).abs().max().item()
            assert error <= tolerance, (what, rank, name, error)


SP_LP = dict(sequence_parallel=True, loss_parallel=True)


def tp_only(ctx: accel.Context) -> dict:
    return {"tp": train(ctx, tp={}), "tp+sp+lp": train(ctx, tp=SP_LP),
            "tied tp+sp+lp": train(ctx, tp=SP_LP, build=tied_llama)}


def test_tp2_with_and_without_sequence_and_loss_parallel_matches_one_process():
    ranks = run_world(tp_only, 2, mesh={"tp": 2}, timeout=300)
    expected = reference(dp_size=1)
    for variant in ("tp", "tp+sp+lp"):
        assert_close([rank[variant] for rank in ranks], expected, variant)
    tied = reference(dp_size=1, build=tied_llama)
    assert_close([rank["tied tp+sp+lp"] for rank in ranks], tied, "tied embedding and head")


def tp_and_fsdp(ctx: accel.Context) -> dict:
    return {"tp x fsdp": train(ctx, tp={}, strategy=accel.FSDP()),
            "tp+sp x fsdp": train(ctx, tp=SP_LP, strategy=accel.FSDP()),
            "tied tp+sp x fsdp": train(ctx, tp=SP_LP, strategy=accel.FSDP(), build=tied_llama)}


def test_tp2_x_fsdp2_matches_one_process():
    ranks = run_world(tp_and_fsdp, 4, mesh={"dp_shard": 2, "tp": 2}, timeout=400)
    expected = reference(dp_size=2)
    for variant in ("tp x fsdp", "tp+sp x fsdp"):
        assert_close([rank[variant] for rank in ranks], expected, variant)
    tied = reference(dp_size=2, build=tied_llama)
    assert_close([rank["tied tp+sp x fsdp"] for rank in ranks], tied, "tied, tp x fsdp")


def tp_and_hsdp(ctx: accel.Context) -> dict:
    return train(ctx, layers=2, tp=SP_LP, strategy=accel.FSDP())


def test_tp2_x_hsdp_2x2_on_eight_ranks_matches_one_process():
    ranks = run_world(tp_and_hsdp, 8, mesh={"dp_replicate": 2, "dp_shard": 2, "tp": 2},
                      timeout=600)
    assert_close(ranks, reference(dp_size=4, layers=2), "tp x hsdp")


def gpt2_tp(ctx: accel.Context) -> dict:
    strategy = accel.FSDP() if ctx.dp_size > 1 else None
    return {"tp": train(ctx, layers=2, tp={}, strategy=strategy, build=gpt2),
            "tp+sp+lp": train(ctx, layers=2, tp=SP_LP, strategy=strategy, build=gpt2),
            "4 layers, fp64": in_float64(train, ctx, tp={}, strategy=strategy, build=gpt2)}


def in_float64(function, *args, **kwargs):
    """`function` with models built in float64: what fp32 rounding hides is exact there."""
    torch.set_default_dtype(torch.float64)
    try:
        return function(*args, **kwargs)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize(("mesh", "world"), [({"tp": 2}, 2), ({"dp_shard": 2, "tp": 2}, 4)],
                         ids=["tp2", "tp2 x fsdp2"])
def test_gpt2_auto_plan_with_sequence_and_loss_parallel_matches_one_process(mesh, world):
    ranks = run_world(gpt2_tp, world, mesh=mesh, timeout=300)
    expected = reference(dp_size=world // 2, layers=2, build=gpt2)
    for variant in ("tp", "tp+sp+lp"):
        assert_close([rank[variant] for rank in ranks], expected, f"gpt2 {variant} {mesh}")
    # 4 layers in fp32 differ by up to 3e-5 in a few weights (Adam dividing fp32 rounding
    # by tiny gradients' moments); in float64 the same run is exact to rounding.
    exact = in_float64(reference, dp_size=world // 2, build=gpt2)
    assert_close([rank["4 layers, fp64"] for rank in ranks], exact, "gpt2 fp64", 1e-12)


# --------------------------------------------------------------------------- errors

def refusals(ctx: accel.Context) -> list[str]:
    """Each wrong use on a real tp mesh, with the message accel gives."""
    def message(call) -> str:
        try:
            call()
        except (IncompatibleOptionsError, TransformOrderError, UnsupportedError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return "no error"

    odd = llama(1)
    odd.config.num_key_value_heads = 3
    sharded, sharded_ctx = accel.shard_model(llama(1), ctx, strategy=accel.FSDP())
    return [
        message(lambda: accel.tensor_parallel(odd, ctx)),
        message(lambda: accel.tensor_parallel(nn.Sequential(nn.Linear(4, 4)), ctx)),
        message(lambda: accel.tensor_parallel(llama(1), ctx, plan={
            "model.layers.*.attn.q": ColwiseParallel()})),
        message(lambda: accel.tensor_parallel(llama(1), ctx, plan={
            "model.layers.*.mlp.*_proj": ColwiseParallel(),
            "model.layers.0.mlp.down_proj": RowwiseParallel()})),
        message(lambda: accel.tensor_parallel(sharded, sharded_ctx)),
        message(lambda: gpt2_sp(ctx)(input_ids=torch.zeros(1, 5, dtype=torch.long))),
        message(lambda: accel.tensor_parallel(tied_llama(1), ctx, plan={
            "model.embed_tokens": ColwiseParallel(), "lm_head": ColwiseParallel()})),
    ]


def gpt2_sp(ctx: accel.Context) -> nn.Module:
    return accel.tensor_parallel(gpt2(1), ctx, plan="auto", sequence_parallel=True)[0]


def test_wrong_uses_are_refused_with_the_fix():
    messages = run_world(refusals, 2, mesh={"tp": 2}, timeout=300)[0]
    assert "num_key_value_heads=3, which the tp degree 2 does not divide" in messages[0]
    assert "UnsupportedError" in messages[1] and "no plan for Sequential" in messages[1]
    assert "['model.layers.*.attn.q'] match no module" in messages[2]
    assert "matches two patterns" in messages[3]
    assert "must come before shard_model" in messages[4]
    assert "pad the sequence length to a multiple of 2" in messages[5]
    assert ("model.embed_tokens.weight and lm_head.weight are one tied parameter" in messages[6]
            and "(Shard(dim=1),) of (96, 32) and (Shard(dim=0),) of (96, 32)" in messages[6])


def test_tensor_parallel_needs_a_tp_dimension():
    with pytest.raises(IncompatibleOptionsError, match="needs a 'tp' dimension"):
        accel.tensor_parallel(llama(1), accel.Context())


def composed(ctx: accel.Context) -> dict:
    """with_amp(bf16) before tensor_parallel, gather_for_metrics over the data ranks."""
    model, ctx = accel.with_amp(llama(2), ctx, dtype="bf16")
    model, ctx = accel.tensor_parallel(model, ctx, plan="auto", sequence_parallel=True)
    model, ctx = accel.shard_model(model, ctx, strategy=accel.FSDP())
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), ctx)
    data = TensorDataset(torch.arange(24).reshape(12, 2) % 96)
    loader, ctx = accel.distribute_loader(DataLoader(data, batch_size=3), ctx)
    losses, seen = [], []
    for (ids,) in loader:
        loss = model(input_ids=ids, labels=ids).loss
        accel.backward(loss, optimizer, ctx)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accel.reduce(loss.detach().float(), ctx).item())
        seen.append(accel.gather_for_metrics(ids[:, 0], ctx, loader=loader))
    return {"losses": losses, "seen": torch.cat(seen).tolist(), "precision": ctx.precision}


def test_bf16_and_gather_for_metrics_compose_with_tp_x_fsdp():
    ranks = run_world(composed, 4, mesh={"dp_shard": 2, "tp": 2}, timeout=300)
    assert all(rank["precision"] == "bf16" for rank in ranks)
    assert all(rank["losses"] == ranks[0]["losses"] for rank in ranks)  # one loss per step
    # every sample once: tp peers share a batch, gather_for_metrics takes the dp ranks
    assert sorted(ranks[0]["seen"]) == sorted((torch.arange(0, 24, 2) % 96).tolist())
