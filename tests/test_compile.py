"""compile_model: per-block torch.compile that trains to eager's parameters under DDP and
FSDP2 with accumulation, compiles a block class once, and never shows `_orig_mod.`.

A transformers Llama from a config (fp32, use_cache=False), AdamW, accumulation 2, five
optimizer steps: 2 ranks x batch 2 x accumulation 2 compiled == 1 eager process with
batch 8, within 1e-5. The 2-rank runs use the aot_eager backend (dynamo and AOT
autograd capture the graphs, DDP's optimizer splits them; no C++ build, which takes
minutes per rank on 2 shared cores); one single-process test runs inductor for real.
"""

from __future__ import annotations

import pytest
import torch
from helpers import full_parameters, tiny_llama, train_tokens
from safetensors import safe_open
from torch import nn

import accel
from accel.errors import (
    IncompatibleOptionsError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    TransformOrderError,
)
from accel.testing import run_world
from accel.transforms.compile import CompiledForward

transformers = pytest.importorskip("transformers")

STEPS, ACCUMULATION, PER_RANK, SEQ = 5, 2, 2, 12
FAST = {"backend": "aot_eager"}


def train(ctx: accel.Context, *, strategy=None, compile_kwargs: dict | None = None,
          per_rank: int = PER_RANK, accumulation: int = ACCUMULATION) -> dict:
    model = tiny_llama()
    if compile_kwargs is not None:
        model, ctx = accel.compile_model(model, ctx, **compile_kwargs)
    return train_tokens(model, ctx, strategy=strategy, steps=STEPS, per_rank=per_rank,
                        accumulation=accumulation, seq=SEQ)


def reference(dp_size: int) -> dict:
    """One eager process, the global batch of dp_size ranks x PER_RANK x ACCUMULATION."""
    return train(accel.Context(), strategy="single", per_rank=dp_size * PER_RANK * ACCUMULATION,
                 accumulation=1)


def assert_close(result: dict, expected: dict, what: str, tolerance: float = 1e-5) -> None:
    assert result.keys() == expected.keys(), what
    for name, value in expected.items():
        error = (result[name] - value).abs().max().item()
        assert error <= tolerance, (what, name, error)


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def fresh_graphs() -> int:
    """graphs() after forgetting every compiled frame: an earlier test's graph of the
    same forward (same code, same backend) would otherwise be reused, not counted."""
    torch._dynamo.reset()
    return graphs()


def compiled_ranks(ctx: accel.Context) -> dict:
    before = graphs()
    ddp = train(ctx, strategy="ddp", compile_kwargs=FAST)
    ddp_graphs = graphs() - before
    fsdp = train(ctx, strategy=accel.FSDP(), compile_kwargs=FAST)
    return {"ddp": ddp, "fsdp": fsdp, "ddp graphs": ddp_graphs}


def test_compiled_ddp_and_fsdp2_with_accumulation_match_one_eager_process():
    ranks = run_world(compiled_ranks, 2, timeout=400)
    expected = reference(dp_size=2)
    for rank in ranks:
        assert_close(rank["ddp"], expected, "ddp")
        assert_close(rank["fsdp"], expected, "fsdp")
        assert rank["ddp graphs"] == 1  # two layers, one compiled block


def test_inductor_compiles_a_block_class_once_and_trains_like_eager():
    before = fresh_graphs()
    # one compile thread: inductor's pool of 2+ would outlive the test (and contend)
    with torch._inductor.config.patch(compile_threads=1):
        compiled = train(accel.Context(), strategy="single", compile_kwargs={})  # inductor
    assert graphs() - before == 1  # the second layer reused the first one's code
    assert_close(compiled, train(accel.Context(), strategy="single"), "inductor")


def tensor_parallel_ranks(ctx: accel.Context) -> dict:
    model, tp_ctx = accel.tensor_parallel(tiny_llama(), ctx, plan="auto")
    model, tp_ctx = accel.compile_model(model, tp_ctx, **FAST)
    trained = train_tokens(model, tp_ctx, strategy=None, steps=STEPS, per_rank=PER_RANK,
                           accumulation=ACCUMULATION, seq=SEQ)
    # full recomputation of DTensor blocks: refused before anything is compiled
    model, tp_ctx = accel.tensor_parallel(tiny_llama(), ctx, plan="auto")
    model, tp_ctx = accel.checkpoint_activations(model, tp_ctx, policy="full")
    with pytest.raises(IncompatibleOptionsError) as refused:
        accel.compile_model(model, tp_ctx, **FAST)
    return {"params": trained, "full recomputation": str(refused.value)}


def test_compiled_tensor_parallel_blocks_match_one_eager_process():
    """TP2: every block's projections are DTensors inside the compiled code; the
    embedding's all-reduced output enters the first block (a view of a collective's
    tensor, which compile_model hands over as a tensor of its own). Full recomputation
    of such blocks, which torch's AOT autograd cannot compile, is refused up front."""
    ranks = run_world(tensor_parallel_ranks, 2, mesh={"tp": 2}, timeout=300)
    expected = reference(dp_size=1)
    for rank in ranks:
        assert_close(rank["params"], expected, "tp2 compiled")
        assert ("block 'model.layers.0' holds tensor_parallel's DTensor parameters and "
                "recomputes its whole forward" in rank["full recomputation"])
        assert "checkpoint_activations(policy='selective')" in rank["full recomputation"]


@pytest.mark.parametrize(("policy", "offload"), [("full", True), ("selective", False), (2, False)])
def test_checkpointed_blocks_compile_once_and_train_like_eager(policy, offload):
    """checkpoint_activations then compile_model: the recomputation is inside the compiled
    code, the CPU offload's hooks around it (dynamo does not trace them)."""
    def trained(compiled: bool) -> dict:
        model, ctx = accel.checkpoint_activations(tiny_llama(4), accel.Context(), policy=policy,
                                                  offload=offload)
        if compiled:
            model, ctx = accel.compile_model(model, ctx, **FAST)
        return train_tokens(model, ctx, strategy="single", steps=2, per_rank=2,
                            accumulation=1, seq=SEQ)

    before = fresh_graphs()
    compiled = trained(compiled=True)
    # one graph per forward function: every N-th block is checkpointed, the rest are not
    assert graphs() - before == (2 if isinstance(policy, int) else 1)
    assert_close(compiled, trained(compiled=False), f"{policy}, offload={offload}")


# ------------------------------------------------------------------ names and exports


def test_checkpoints_and_exports_carry_the_models_own_names(tmp_path):
    ctx = accel.Context()
    model, ctx = accel.with_amp(tiny_llama(), ctx, dtype="bf16")
    model, ctx = accel.compile_model(model, ctx, regional=False, **FAST)
    assert isinstance(model.forward, CompiledForward) and model.forward.__name__ == "forward"
    model, ctx = accel.shard_model(model, ctx, strategy="single")
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), ctx)
    ids = torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(0))
    accel.backward(model(input_ids=ids, labels=ids).loss, optimizer, ctx)
    optimizer.step()
    eager = tiny_llama()
    names = [name for name, _ in eager.named_parameters()]
    assert [name for name, _ in accel.unwrap_model(model, ctx).named_parameters()] == names
    assert not any("_orig_mod" in key for key in model.state_dict())

    accel.save_model(model, tmp_path / "export", ctx)
    keys = [key for path in (tmp_path / "export").glob("*.safetensors")
            for key in safe_open(path, "pt").keys()]
    assert keys and not any("_orig_mod" in key for key in keys)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export")
    assert_close(full_parameters(loaded), full_parameters(model), "from_pretrained", 0.0)

    # a checkpoint of the compiled model loads into an eager one, name by name
    accel.save_state(tmp_path / "state", ctx, model=model, optimizer=optimizer)
    eager_ctx = accel.Context()
    eager, eager_ctx = accel.shard_model(eager, eager_ctx, strategy="single")
    eager_optimizer, eager_ctx = accel.wrap_optimizer(
        torch.optim.AdamW(eager.parameters(), lr=1e-2), eager_ctx)
    accel.load_state(tmp_path / "state", eager_ctx, model=eager, optimizer=eager_optimizer)
    assert_close(full_parameters(eager), full_parameters(model), "load_state", 0.0)


def test_with_amp_checkpointing_and_compile_compose_in_order():
    ctx = accel.Context()
    model, ctx = accel.with_amp(tiny_llama(), ctx, dtype="bf16")
    model, ctx = accel.checkpoint_activations(model, ctx, policy="selective")
    model, ctx = accel.compile_model(model, ctx, **FAST)
    assert [step.split("(")[0] for step in ctx.applied] == [
        "with_amp", "checkpoint_activations", "compile_model"]
    ids = torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    eager, _ = accel.with_amp(tiny_llama(), accel.Context(), dtype="bf16")
    eager_loss = eager(input_ids=ids, labels=ids).loss
    eager_loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - eager_loss.item()) < 1e-2
    grads = {name: p.grad for name, p in eager.named_parameters()}
    for name, p in model.named_parameters():  # bf16 autocast: same to bf16's precision
        assert torch.allclose(p.grad, grads[name], atol=2e-2, rtol=5e-2), name


# ----------------------------------------------------------------------------- errors


def test_wrong_orders_and_options_are_refused_with_the_fix():
    model, ctx = accel.compile_model(tiny_llama(), accel.Context(), **FAST)
    with pytest.raises(TransformOrderError, match="already applied"):
        accel.compile_model(model, accel.Context())  # the model knows, whatever the Context
    with pytest.raises(TransformOrderError, match="checkpoint_activations must come before"):
        accel.checkpoint_activations(model, ctx)
    sharded, sharded_ctx = accel.shard_model(tiny_llama(), accel.Context(), strategy="single")
    with pytest.raises(TransformOrderError, match="before shard_model"):
        accel.compile_model(sharded, sharded_ctx)
    with pytest.raises(TransformOrderError, match="already applied"):
        accel.compile_model(torch.compile(tiny_llama()), accel.Context())
    cached = tiny_llama()
    cached.config.use_cache = True
    with pytest.raises(IncompatibleOptionsError, match="use_cache = False"):
        accel.compile_model(cached, accel.Context())
    with pytest.raises(IncompatibleOptionsError, match="matches no module"):
        accel.compile_model(nn.Sequential(nn.Linear(4, 4)), accel.Context())
    with pytest.raises(InvalidArgumentError, match="torch.compile option"):
        accel.compile_model(tiny_llama(), accel.Context(), full_graph=True)
    with pytest.raises(InvalidArgumentTypeError, match="regional must be True or False"):
        accel.compile_model(tiny_llama(), accel.Context(), regional="yes")
    with pytest.raises(InvalidArgumentTypeError, match="blocks must be"):
        accel.compile_model(tiny_llama(), accel.Context(), blocks="layers")


def test_whole_model_compile_is_undone_and_copied_with_the_model():
    import copy

    model, _ = accel.compile_model(tiny_llama(1), accel.Context(), regional=False, **FAST)
    clone = copy.deepcopy(model)
    assert clone.forward.forward.__self__ is clone  # runs on the copy's own parameters
    ids = torch.arange(SEQ).reshape(1, SEQ)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(0.5)
        assert not torch.equal(clone(input_ids=ids).logits, model(input_ids=ids).logits)
    model.forward = model.forward.forward  # undone: eager again
    assert not isinstance(model.forward, CompiledForward)
