"""Pipeline parallelism on the mesh: GPipe, 1F1B and interleaved 1F1B on 2 ranks, and PP x
DDP / FSDP2 on 4, each trained to the parameters of one process; checkpoints that load
without a pipeline; an export that transformers loads; the refusals.

A transformers Llama from a config (4 layers, fp32), AdamW with a schedule, gradient
clipping that really clips (the norm over every stage), 5 steps through
distribute_loader: a global batch of 8 cut into 4 microbatches == one process with the
batch of 8, within 1e-5. Two worlds in all (each starts in tens of seconds on a loaded
machine): every 2-rank check shares one, every 4-rank check the other.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

import accel
from accel.errors import (
    IncompatibleOptionsError,
    InvalidArgumentError,
    TransformOrderError,
    UnsupportedError,
)
from accel.testing import run_world

transformers = pytest.importorskip("transformers")

STEPS, BATCH, SEQ, MICROBATCHES, CLIP = 5, 8, 12, 4, 0.5
SCHEDULES = {"gpipe": dict(schedule="gpipe"), "1f1b": dict(schedule="1f1b"),
             "interleaved": dict(schedule="interleaved1f1b", stages_per_rank=2)}


def llama(layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def loader_of(ctx: accel.Context):
    tokens = torch.randint(0, 96, (STEPS * BATCH, SEQ + 1),
                           generator=torch.Generator().manual_seed(3))
    return accel.distribute_loader(
        DataLoader(TensorDataset(tokens), batch_size=BATCH // ctx.dp_size), ctx)


def train(ctx: accel.Context, pipeline: dict | None = None, strategy=None):
    """5 steps; the model, optimizer and Context as the transforms returned them."""
    model = llama()
    if pipeline is not None:
        model, ctx = accel.pipeline_parallel(model, ctx, microbatches=MICROBATCHES,
                                             loss_fn=loss_fn, **pipeline)
    if strategy is not None:
        model, ctx = accel.shard_model(model, ctx, strategy=strategy)
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), ctx)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    scheduler, ctx = accel.wrap_scheduler(schedule, ctx, optimizer)
    loader, ctx = loader_of(ctx)
    for (ids,) in loader:
        inputs, targets = ids[:, :-1], ids[:, 1:]
        if pipeline is not None:
            model.step(inputs, targets)
        else:
            loss_fn(model(input_ids=inputs).logits, targets).backward()
        norm = accel.clip_grad_norm(model, ctx, CLIP, optimizer=optimizer)
        assert norm > CLIP  # clipping really clips: the norm is over every stage
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, ctx


def own_parameters(model, ctx: accel.Context) -> dict[str, torch.Tensor]:
    """This rank's parameters, whole, by the unsplit model's names (meta ones left out)."""
    module = accel.unwrap_model(model, ctx)
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in module.named_parameters() if not p.is_meta}


def merged(ranks: list[dict]) -> dict[str, torch.Tensor]:
    every = {}
    for rank in ranks:
        every.update(rank)
    return every


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def reference(folder) -> dict[str, torch.Tensor]:
    """One process on the whole batch; its checkpoint (full layout) for the pipelines."""
    model, optimizer, ctx = train(accel.Context())
    accel.save_state(folder / "single", ctx, model=model, optimizer=optimizer, rng=False)
    return own_parameters(model, ctx)


def assert_close(result: dict, expected: dict, what: str) -> None:
    assert sorted(result) == sorted(expected), what  # every parameter on some stage
    for name, value in expected.items():
        error = (result[name] - value).abs().max().item()
        assert error <= 1e-5, (what, name, error)


# --------------------------------------------------------------------------- 2 ranks

def message(call) -> str:
    try:
        call()
    except (IncompatibleOptionsError, InvalidArgumentError, TransformOrderError,
            UnsupportedError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def refusals(ctx: accel.Context) -> dict[str, str]:
    pipe, pipe_ctx = accel.pipeline_parallel(llama(), ctx, microbatches=4, loss_fn=loss_fn)
    optimizer, pipe_ctx = accel.wrap_optimizer(torch.optim.SGD(pipe.parameters()), pipe_ctx)
    sharded, sharded_ctx = accel.shard_model(llama(1), ctx, strategy="single")
    batch = torch.zeros(6, SEQ, dtype=torch.long)
    return {
        "split": message(lambda: accel.pipeline_parallel(
            llama(), ctx, split_points=["model.layer.2"], microbatches=4, loss_fn=loss_fn)),
        "stages": message(lambda: accel.pipeline_parallel(
            llama(1), ctx, microbatches=4, loss_fn=loss_fn)),
        "count": message(lambda: accel.pipeline_parallel(
            llama(), ctx, split_points=["model.layers.1", "model.layers.3"], microbatches=4,
            loss_fn=loss_fn)),
        "1f1b": message(lambda: accel.pipeline_parallel(
            llama(), ctx, microbatches=1, loss_fn=loss_fn)),
        "batch": message(lambda: pipe.step(batch, batch)),
        "accumulate": message(lambda: accel.accumulate_grads(pipe, optimizer, pipe_ctx,
                                                             steps=2)),
        "order": message(lambda: accel.pipeline_parallel(
            sharded, sharded_ctx, microbatches=4, loss_fn=loss_fn)),
        "interleaved": message(lambda: accel.pipeline_parallel(
            llama(), ctx, stages_per_rank=2, microbatches=4, loss_fn=loss_fn)),
        "tied": message(lambda: accel.pipeline_parallel(
            gpt2(tied=True), ctx, microbatches=4, loss_fn=loss_fn)),
    }


def gpt2(tied: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96,
                                     n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, tie_word_embeddings=tied)
    return transformers.GPT2LMHeadModel(config)


def sequential() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(96, 16), torch.nn.Linear(16, 32),
                               torch.nn.Tanh(), torch.nn.Linear(32, 96))


FAMILIES = {"gpt2": (gpt2, "auto"), "sequential": (sequential, ["2"])}


def two_sgd_steps(ctx: accel.Context | None, build, split_points) -> dict:
    """GPT-2 (auto split) or an nn.Sequential (split before child "2"): 2 SGD steps."""
    model = build()
    if ctx is not None:
        model, ctx = accel.pipeline_parallel(model, ctx, split_points=split_points,
                                             schedule="gpipe", microbatches=2, loss_fn=loss_fn)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(0, 96, (4, SEQ + 1), generator=torch.Generator().manual_seed(4))
    for _ in range(2):
        if ctx is not None:
            model.step(ids[:, :-1], ids[:, 1:])
        else:
            out = model(ids[:, :-1])
            loss_fn(getattr(out, "logits", out), ids[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
    module = model if ctx is None else accel.unwrap_model(model, ctx)
    return {name: p.detach().clone() for name, p in module.named_parameters() if not p.is_meta}


def bf16_loss(ctx: accel.Context | None, dtype: str = "bf16") -> float | None:
    """A batch's loss under with_amp(dtype), pipelined (2 stages, 2 microbatches) or not."""
    model, amp_ctx = accel.with_amp(llama(), ctx or accel.Context(), dtype=dtype)
    ids = torch.randint(0, 96, (4, SEQ + 1), generator=torch.Generator().manual_seed(6))
    if ctx is None:  # the same two microbatches, one after the other
        return sum(loss_fn(model(input_ids=ids[half, :-1]).logits, ids[half, 1:]).item()
                   for half in (slice(0, 2), slice(2, 4))) / 2
    model, amp_ctx = accel.pipeline_parallel(model, amp_ctx, microbatches=2, loss_fn=loss_fn)
    loss = model.step(ids[:, :-1], ids[:, 1:])
    return None if loss is None else loss.item()


def two_ranks(ctx: accel.Context, folder) -> dict:
    out = {name: two_sgd_steps(ctx, *family) for name, family in FAMILIES.items()}
    out["bf16"] = bf16_loss(ctx)
    for name, options in SCHEDULES.items():
        model, optimizer, trained = train(ctx, options)
        out[name] = own_parameters(model, trained)
        if name == "gpipe":  # one process's checkpoint, whole tensors, sent to each stage
            accel.load_state(folder / "single", trained, model=model, optimizer=optimizer,
                             rng=False)
            out["from_single"] = own_parameters(model, trained)
        if name == "1f1b":
            accel.save_state(folder / "pp2", trained, model=model, optimizer=optimizer,
                             rng=False)
            accel.save_model(model, folder / "export", trained)
    # The last run (interleaved: 4 stages, other blocks on each rank) reloads that checkpoint.
    accel.load_state(folder / "pp2", trained, model=model, optimizer=optimizer, rng=False)
    out["resumed"] = own_parameters(model, trained)
    fresh, fresh_ctx = accel.pipeline_parallel(llama(), ctx, microbatches=4, loss_fn=loss_fn)
    accel.load_model(fresh, folder / "export", fresh_ctx)  # whole tensors, sent to each stage
    out["loaded"] = own_parameters(fresh, fresh_ctx)
    out["refusals"] = refusals(ctx)
    return out


@pytest.fixture(scope="module")
def pp2(folder, reference) -> tuple[list[dict], object]:
    return run_world(two_ranks, 2, folder, mesh={"pp": 2}, timeout=600), folder


@pytest.mark.spawned
def test_pp2_gpipe_1f1b_and_interleaved_match_one_process(pp2, reference):
    ranks, _ = pp2
    for name in SCHEDULES:
        assert_close(merged([rank[name] for rank in ranks]), reference, name)
    # each rank holds its own stages: no parameter lives on both
    assert not set(ranks[0]["1f1b"]) & set(ranks[1]["1f1b"])


@pytest.mark.spawned
def test_one_process_checkpoint_loads_into_a_pipeline(pp2, reference):
    got = merged([rank["from_single"] for rank in pp2[0]])
    assert sorted(got) == sorted(reference)
    assert all(torch.equal(got[name], value) for name, value in reference.items())


@pytest.mark.spawned
def test_a_checkpoint_of_2_stages_reloads_into_4_and_an_export_into_a_pipeline(pp2):
    ranks, _ = pp2
    saved = merged([rank["1f1b"] for rank in ranks])
    for what in ("resumed", "loaded"):  # save_state -> load_state, save_model -> load_model
        got = merged([rank[what] for rank in ranks])
        assert sorted(got) == sorted(saved), what
        assert all(torch.equal(got[name], saved[name]) for name in saved), what


@pytest.mark.spawned
def test_gpt2_auto_split_and_a_sequential_split_by_name_match_one_process(pp2):
    ranks, _ = pp2
    for name, family in FAMILIES.items():
        assert_close(merged([rank[name] for rank in ranks]), two_sgd_steps(None, *family), name)


@pytest.mark.spawned
def test_bf16_runs_each_stage_under_autocast(pp2):
    ranks, _ = pp2
    assert ranks[0]["bf16"] is None  # the loss is on the last stage's rank
    expected = bf16_loss(None)
    assert abs(ranks[1]["bf16"] - expected) < 1e-6
    assert abs(bf16_loss(None, dtype="no") - expected) > 1e-6  # fp32 would not pass


@pytest.mark.spawned
def test_pp2_checkpoint_loads_without_a_pipeline_on_one_process(pp2):
    ranks, folder = pp2
    model = llama()
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=3e-3),
                                          accel.Context())
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # as saved: initial_lr
    info = accel.load_state(folder / "pp2", ctx, model=model, optimizer=optimizer, rng=False)
    assert info.step == STEPS and info.world_size == 2
    trained = merged([rank["1f1b"] for rank in ranks])
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), trained[name]), name
        assert int(optimizer.state[param]["step"]) == STEPS, name  # Adam's state came too


@pytest.mark.spawned
def test_save_model_exports_one_model_that_from_pretrained_loads(pp2):
    ranks, folder = pp2
    loaded = transformers.LlamaForCausalLM.from_pretrained(folder / "export")
    expected = llama()
    expected.load_state_dict(merged([rank["1f1b"] for rank in ranks]))
    ids = torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected(input_ids=ids).logits)


@pytest.mark.spawned
def test_wrong_uses_are_refused_with_the_fix(pp2):
    messages = pp2[0][0]["refusals"]
    kinds = {"split": InvalidArgumentError, "stages": IncompatibleOptionsError,
             "count": IncompatibleOptionsError, "1f1b": IncompatibleOptionsError,
             "batch": InvalidArgumentError, "accumulate": IncompatibleOptionsError,
             "order": TransformOrderError, "interleaved": IncompatibleOptionsError,
             "tied": UnsupportedError}
    for case, kind in kinds.items():  # each an accel.errors exception, not a torch one
        assert messages[case].startswith(kind.__name__ + ":"), (case, messages[case])
    assert "split_points ['model.layer.2'] name no block" in messages["split"]
    assert "model.layers.1" in messages["split"]  # the names it has
    assert "2 stages" in messages["stages"] and "has 1 layer to share" in messages["stages"]
    assert "makes 3 stages" in messages["count"] and "give 1 split" in messages["count"]
    assert "microbatches=1 < 2 stages" in messages["1f1b"]
    assert "batch of 6" in messages["batch"] and "microbatches=4" in messages["batch"]
    assert "microbatches are its gradient accumulation" in messages["accumulate"]
    assert "must come before shard_model" in messages["order"]
    assert "use schedule='interleaved1f1b'" in messages["interleaved"]
    assert "tied weights" in messages["tied"] and "tie_word_embeddings=False" in messages["tied"]


def test_auto_split_puts_embeddings_first_and_norm_and_head_last():
    """The plan alone, in this process: no world needed to check where stages begin."""
    from accel.transforms.pipeline_split import family_of, plan_stages

    model = llama()
    blocks = family_of(model).blocks(model)
    first, last = plan_stages(blocks, "auto", 2)
    assert [block.name for block in first] == ["model.embed_tokens", "model.layers.0",
                                                "model.layers.1"]
    assert [block.name for block in last] == ["model.layers.2", "model.layers.3",
                                               "model.norm", "lm_head"]
    by_name = plan_stages(blocks, ["model.layers.1", "model.norm"], 3)
    assert [len(stage) for stage in by_name] == [2, 3, 2]
    with pytest.raises(InvalidArgumentError, match=r"\['model.layers.9'\] name no block"):
        plan_stages(blocks, ["model.layers.9"], 2)
    with pytest.raises(IncompatibleOptionsError, match="has 4 layers to share"):
        plan_stages(blocks, "auto", 5)


def test_pipeline_parallel_needs_a_pp_dimension():
    with pytest.raises(IncompatibleOptionsError, match="needs a 'pp' dimension"):
        accel.pipeline_parallel(llama(1), accel.Context(), microbatches=2, loss_fn=loss_fn)


# --------------------------------------------------------------------------- 4 ranks

def four_ranks(ctx: accel.Context, folder) -> dict:
    out = {}
    for name, strategy in (("ddp", accel.DDP()), ("fsdp", accel.FSDP())):
        model, optimizer, trained = train(ctx, SCHEDULES["1f1b"], strategy)
        out[name] = own_parameters(model, trained)
    # The 2-rank run's checkpoint, resharded over this run's data-parallel ranks.
    accel.load_state(folder / "pp2", trained, model=model, optimizer=optimizer, rng=False)
    out["resumed"] = own_parameters(model, trained)
    return out


@pytest.mark.spawned
def test_pp2_x_ddp2_and_pp2_x_fsdp2_match_one_process_and_reload(pp2, reference):
    two, folder = pp2
    ranks = run_world(four_ranks, 4, folder, mesh={"pp": 2, "dp_shard": 2}, timeout=600)
    for name in ("ddp", "fsdp"):
        assert_close(merged([rank[name] for rank in ranks]), reference, f"pp2 x {name}")
        # the data-parallel ranks of a stage agree
        assert all(torch.equal(ranks[0][name][key], ranks[1][name][key]) for key in ranks[0][name])
    saved = merged([rank["1f1b"] for rank in two])
    for rank in ranks:
        assert all(torch.equal(value, saved[name]) for name, value in rank["resumed"].items())
