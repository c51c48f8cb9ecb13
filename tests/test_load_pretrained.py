"""load_pretrained: a transformers checkpoint (save_pretrained of a Llama with tied embeddings,
as a sharded index) into a model on the meta device, alone and sharded (FSDP2, HSDP,
TP x FSDP, ZeRO-3), on real gloo processes.

Each sharded load is exported with save_model and compared, tensor by tensor, with one
process's `from_pretrained` of the same folder: equal, bit for bit. A checkpoint of another
model is refused with every difference named, and the model is left as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

import accel
from accel.errors import (
    CheckpointMismatchError,
    IncompatibleOptionsError,
    TransformOrderError,
    UnsupportedError,
    UntrustedCheckpointError,
)
from accel.testing import run_world

transformers = pytest.importorskip("transformers")


def llama_config():
    return transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
        tie_word_embeddings=True, rope_theta=500.0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A pretrained Llama (sharded into several files, with an index), and a GPT-2."""
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(llama_config()).save_pretrained(
        root / "llama", max_shard_size="40KB")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=4, vocab_size=96, n_positions=64)).save_pretrained(
        root / "gpt2")
    return {"llama": root / "llama", "gpt2": root / "gpt2", "root": root}


def reference(folder: Path) -> dict[str, torch.Tensor]:
    loaded = transformers.LlamaForCausalLM.from_pretrained(folder)
    return {name: tensor.clone() for name, tensor in loaded.state_dict().items()}


def exported(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def assert_equal_to_reference(export: Path, expected: dict[str, torch.Tensor]) -> None:
    loaded = transformers.LlamaForCausalLM.from_pretrained(export)
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def meta_llama() -> nn.Module:
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(llama_config())


def rotary_ok(model: nn.Module) -> bool:
    rotary = accel.unwrap_model(model, accel.Context()).model.rotary_emb
    expected = transformers.LlamaForCausalLM(llama_config()).model.rotary_emb.inv_freq
    return (torch.equal(rotary.inv_freq, expected)
            and torch.equal(rotary.original_inv_freq, expected))


# --------------------------------------------------------------------------- one process


def test_a_meta_model_is_filled_with_ties_and_buffers(folders):
    model = meta_llama()
    model, ctx = accel.load_pretrained(model, accel.Context(), folders["llama"])
    expected = reference(folders["llama"])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one tensor
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert rotary_ok(model)
    assert "load_pretrained(llama)" in repr(ctx)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    plain = transformers.LlamaForCausalLM.from_pretrained(folders["llama"])
    assert torch.equal(model(ids).logits, plain(ids).logits)


def test_dtype_converts_parameters_and_keeps_buffers(folders):
    model, _ = accel.load_pretrained(meta_llama(), accel.Context(), folders["llama"],
                                     dtype="bf16")
    expected = reference(folders["llama"])
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # as transformers keeps it
    for name, param in model.named_parameters():
        assert torch.equal(param, expected[name].to(torch.bfloat16)), name


def test_a_single_safetensors_file(folders, tmp_path):
    model = transformers.LlamaForCausalLM(llama_config())
    model.save_pretrained(tmp_path)  # one model.safetensors
    target = meta_llama()
    accel.load_pretrained(target, accel.Context(), tmp_path / "model.safetensors")
    assert torch.equal(target.model.layers[1].mlp.up_proj.weight,
                       model.model.layers[1].mlp.up_proj.weight)


def test_another_models_checkpoint_is_refused_and_the_model_untouched(folders):
    model = transformers.LlamaForCausalLM(llama_config())
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as raised:
        accel.load_pretrained(model, accel.Context(), folders["gpt2"])
    message = str(raised.value)
    assert "model.layers.0.self_attn.q_proj.weight" in message  # missing
    assert "transformer.h.0.attn.c_attn.weight" in message  # unexpected
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    meta = meta_llama()
    with pytest.raises(CheckpointMismatchError):
        accel.load_pretrained(meta, accel.Context(), folders["gpt2"])
    assert all(t.is_meta for t in (*meta.parameters(), *meta.buffers()))


def test_a_shape_difference_is_named(folders):
    config = llama_config()
    config.intermediate_size = 48
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    with pytest.raises(CheckpointMismatchError, match=r"up_proj.weight.*\[64, 32\].*\[48, 32\]"):
        accel.load_pretrained(model, accel.Context(), folders["llama"])
    assert all(p.is_meta for p in model.parameters())


def test_an_index_naming_a_file_outside_its_folder_is_refused(folders, tmp_path):
    (tmp_path / "secret.safetensors").write_bytes(b"")
    folder = tmp_path / "evil"
    folder.mkdir()
    index = json.loads((folders["llama"] / "model.safetensors.index.json").read_text())
    index["weight_map"] = {name: "../secret.safetensors" for name in index["weight_map"]}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UntrustedCheckpointError):
        accel.load_pretrained(meta_llama(), accel.Context(), folder)


class _Frequencies(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("scale", torch.arange(4.0), persistent=False)


def test_a_meta_buffer_nothing_can_recompute_is_an_error_before_any_change(tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in nn.Linear(4, 4).state_dict().items()},
              tmp_path / "model.safetensors")
    with torch.device("meta"):
        model = nn.Sequential()
        model.add_module("freq", _Frequencies())
    renamed = tmp_path / "renamed.safetensors"
    save_file({f"freq.proj.{k}": v.contiguous() for k, v in
               nn.Linear(4, 4).state_dict().items()}, renamed)
    with pytest.raises(UnsupportedError, match="freq.scale"):
        accel.load_pretrained(model, accel.Context(), renamed)
    assert model.freq.proj.weight.is_meta


def test_pickled_weights_are_read_too(tmp_path):
    """A foreign pytorch_model.bin (torch.load with weights_only, memory-mapped)."""
    model = transformers.LlamaForCausalLM(llama_config())
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    target, _ = accel.load_pretrained(meta_llama(), accel.Context(), tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name


def test_persistent_meta_buffers_are_filled(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    source.train()(torch.randn(8, 4))  # running statistics that are not the initial ones
    save_file(source.state_dict(), tmp_path / "model.safetensors")
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    accel.load_pretrained(model, accel.Context(), tmp_path)
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_bad_dtype_is_refused(folders):
    with pytest.raises(accel.errors.InvalidArgumentError, match="dtype"):
        accel.load_pretrained(meta_llama(), accel.Context(), folders["llama"], dtype="int8")


@pytest.mark.parametrize("placements", [
    (Shard(0),), (Shard(1),), (Replicate(), Shard(0)), (Shard(0), Shard(1)),
    (_StridedShard(0, split_factor=2), Shard(0)), (_StridedShard(1, split_factor=2),)],
    ids=str)
def test_each_rank_reads_exactly_the_elements_it_holds(placements):
    """local_index against torch's own layout, on every rank of a (fake) 4 or 2 x 2 mesh,
    with uneven shapes (7 rows, 5 columns), FSDP's strided shard over TP (contiguous rows)
    and a strided shard alone (every other chunk: rows picked one by one)."""
    from torch.distributed.device_mesh import init_device_mesh

    from accel.checkpoint.pretrained import local_index
    from accel.testing import fake_world

    full = torch.arange(35.0).reshape(7, 5)
    for rank in range(4):
        with fake_world(rank, 4):
            mesh = init_device_mesh("cpu", (4,) if len(placements) == 1 else (2, 2))
            target = distribute_tensor(full, mesh, placements, src_data_rank=None)
            index = local_index(target)
            local = target.to_local()
            if index is None:
                assert local.numel() == 0
                continue
            picked = full
            for dim, part in enumerate(index):
                picked = picked[(slice(None),) * dim + (part,)]
            assert torch.equal(picked, local), (rank, index)


# --------------------------------------------------------------------------- worlds


def fsdp_on_meta(ctx, folder: str, gpt2: str, export: str) -> dict:
    model = meta_llama()
    model, ctx = accel.shard_model(model, ctx, strategy=accel.FSDP(keep_meta=True))
    still_meta = all(p.is_meta for p in model.parameters())
    refused = ""
    try:
        accel.load_pretrained(model, ctx, gpt2)
    except CheckpointMismatchError as exc:
        refused = str(exc)
    untouched = all(p.is_meta for p in model.parameters())
    model, ctx = accel.load_pretrained(model, ctx, folder)
    local = model.model.layers[0].mlp.up_proj.weight.to_local().shape
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    accel.save_model(model, export, ctx)
    ids = torch.arange(16).reshape(2, 8)
    logits = model(ids).logits.detach()
    return {"still_meta": still_meta, "refused": refused, "untouched": untouched,
            "local": tuple(local), "tied": tied, "rotary": rotary_ok(model), "logits": logits}


@pytest.mark.spawned
def test_fsdp2_on_meta_two_ranks(folders):
    export = folders["root"] / "fsdp_export"
    results = run_world(fsdp_on_meta, 2, str(folders["llama"]), str(folders["gpt2"]),
                        str(export))
    for result in results:
        assert result["still_meta"] and result["untouched"] and result["tied"]
        assert result["rotary"]
        assert "missing" in result["refused"] and "unexpected" in result["refused"]
        assert result["local"] == (32, 32)  # each rank holds half of the 64 rows
    assert_equal_to_reference(export, reference(folders["llama"]))
    plain = transformers.LlamaForCausalLM.from_pretrained(folders["llama"])
    expected = plain(torch.arange(16).reshape(2, 8)).logits
    for result in results:
        torch.testing.assert_close(result["logits"], expected, rtol=1e-5, atol=1e-6)


def test_keep_meta_is_an_fsdp_option():
    with pytest.raises(IncompatibleOptionsError, match="keep_meta"):
        accel.FSDP(keep_meta="yes")


def assert_world_loaded(export: Path, results: list[dict], folders: dict) -> None:
    for result in results:
        assert result["still_meta"] and result["rotary"] and result["tied"], result
    assert_equal_to_reference(export, reference(folders["llama"]))


def hsdp_then_tp_by_fsdp(ctx, folder: str, root: str) -> list[dict]:
    """4 ranks: HSDP (2 replicas x 2 shards), TP 2 x FSDP 2, TP 2 alone, one after the other."""
    from torch.distributed.device_mesh import init_device_mesh

    results = []
    tp_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
    for name, mesh in (("hsdp", ctx.mesh), ("tp_fsdp", tp_mesh), ("tp", tp_mesh)):
        run_ctx = accel.Context.from_process_group(mesh=mesh)
        model = meta_llama()
        if name.startswith("tp"):
            model, run_ctx = accel.tensor_parallel(model, run_ctx, plan="auto")
        if name != "tp":  # TP alone: replicated over dp_shard, no engine
            model, run_ctx = accel.shard_model(model, run_ctx,
                                               strategy=accel.FSDP(keep_meta=True))
        still_meta = all(p.is_meta for p in model.parameters())
        model, run_ctx = accel.load_pretrained(model, run_ctx, folder)
        accel.save_model(model, Path(root) / name, run_ctx)
        weight = model.model.layers[0].self_attn.q_proj.weight
        results.append({"still_meta": still_meta, "rotary": rotary_ok(model),
                        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
                        "placements": str(weight.placements),
                        "local": tuple(weight.to_local().shape)})
    return results


@pytest.mark.spawned
def test_hsdp_tp_by_fsdp_and_tp_four_ranks(folders):
    worlds = run_world(hsdp_then_tp_by_fsdp, 4, str(folders["llama"]), str(folders["root"]),
                       mesh={"dp_replicate": 2, "dp_shard": 2}, timeout=300)
    for index, name in enumerate(("hsdp", "tp_fsdp", "tp")):
        # tensor_parallel keeps lm_head and the embedding one tensor (both Shard(0) over tp)
        assert_world_loaded(folders["root"] / name, [ranks[index] for ranks in worlds],
                            folders)
    hsdp, tp_fsdp, tp = worlds[0]
    assert hsdp["local"] == (16, 32)  # q_proj's 32 rows over 2 shards (replicated twice)
    assert tp_fsdp["local"] == (8, 32)  # over tp 2, then fsdp 2
    assert tp["local"] == (16, 32)  # over tp 2
    assert "_StridedShard" in tp_fsdp["placements"] or "_S(" in tp_fsdp["placements"]


def zero3(ctx, folder: str, gpt2: str, root: str) -> dict:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    strategy, ids = accel.DeepSpeed(stage=3), torch.arange(16).reshape(2, 8)
    llama = transformers.LlamaForCausalLM  # imported outside zero.Init, as a script's import
    with accel.deepspeed_init(ctx, strategy):
        model = llama(llama_config())
    weight = model.model.layers[0].mlp.up_proj.weight
    before = weight.ds_tensor.clone()
    refused = ""
    try:
        accel.load_pretrained(model, ctx, gpt2)
    except CheckpointMismatchError as exc:
        refused = str(exc)
    untouched = torch.equal(before, weight.ds_tensor)
    model, loaded_ctx = accel.load_pretrained(model, ctx, folder)
    model, loaded_ctx = accel.shard_model(model, loaded_ctx, strategy=strategy)
    accel.save_model(model, Path(root) / "zero3", loaded_ctx)
    ours = model(ids).logits.detach()
    try:  # the engine exists now, with its own master copies
        accel.load_pretrained(model, loaded_ctx, folder)
        late = ""
    except TransformOrderError as exc:
        late = str(exc)
    # transformers' own from_pretrained inside the block
    with accel.deepspeed_init(ctx, strategy):
        inside = is_deepspeed_zero3_enabled()
        hf = llama.from_pretrained(folder)
    partitioned = hf.model.layers[0].mlp.up_proj.weight.ds_tensor.numel()
    hf, _ = accel.shard_model(hf, ctx, strategy=strategy)
    return {"partition": weight.ds_tensor.numel(), "refused": refused, "untouched": untouched,
            "ours": ours, "theirs": hf(ids).logits.detach(), "inside": inside,
            "partitioned": partitioned, "after": is_deepspeed_zero3_enabled(), "late": late,
            "gathered": through_gathered_parameters(ctx, llama, folder, ids),
            "tied": model.module.lm_head.weight is model.module.model.embed_tokens.weight}


def through_gathered_parameters(ctx, llama, folder: str, ids: torch.Tensor) -> torch.Tensor:
    """The path for partitions DeepSpeed keeps elsewhere too (hpZ): rank 0 fills them whole."""
    from accel.backends.deepspeed import partition

    strategy = accel.DeepSpeed(stage=3)
    with accel.deepspeed_init(ctx, strategy):
        model = llama(llama_config())
    direct, partition._in_partition_only = partition._in_partition_only, lambda param: False
    try:
        model, loaded_ctx = accel.load_pretrained(model, ctx, folder)
    finally:
        partition._in_partition_only = direct
    model, _ = accel.shard_model(model, loaded_ctx, strategy=strategy)
    return model(ids).logits.detach()


@pytest.mark.spawned
def test_zero3_load_pretrained_and_transformers_from_pretrained(folders):
    pytest.importorskip("deepspeed")
    results = run_world(zero3, 2, str(folders["llama"]), str(folders["gpt2"]),
                        str(folders["root"]), timeout=300)
    plain = transformers.LlamaForCausalLM.from_pretrained(folders["llama"])
    expected = plain(torch.arange(16).reshape(2, 8)).logits
    for result in results:
        assert result["partition"] == 64 * 32 // 2  # each rank holds half of up_proj
        assert result["untouched"] and "missing" in result["refused"]
        assert result["tied"]
        assert result["inside"] and not result["after"]  # registered for the block only
        assert result["partitioned"] == 64 * 32 // 2  # from_pretrained built it partitioned
        torch.testing.assert_close(result["ours"], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["theirs"], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["gathered"], expected, rtol=1e-5, atol=1e-6)
        assert "before the first forward" in result["late"]
    assert_equal_to_reference(folders["root"] / "zero3", reference(folders["llama"]))
