"""load_checkpoint_and_dispatch with real transformers models (random weights, built from
configs, no download): sharded safetensors, blocks split between CPU and disk."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from test_inference_dispatch import mapped_file

from accel.errors import InvalidArgumentError, TransformOrderError, UntrustedCheckpointError
from accel.inference import (
    checkpoint_files,
    dispatch_stats,
    infer_device_map,
    init_empty_weights,
    load_checkpoint_and_dispatch,
    remove_dispatch,
)

transformers = pytest.importorskip(
    "transformers", reason="the acceptance tests build transformers models from configs")

GPT2_CPU_DISK = {
    "transformer.wte": "cpu", "lm_head": "cpu", "transformer.wpe": "cpu",
    "transformer.drop": "cpu", "transformer.h.0": "cpu", "transformer.h.1": "cpu",
    "transformer.h.2": "disk", "transformer.h.3": "disk", "transformer.ln_f": "disk",
}


def gpt2_config():
    return transformers.GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=128,
                                   n_positions=64, bos_token_id=0, eos_token_id=0)


def llama_config():
    return transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, bos_token_id=0,
        eos_token_id=0, pad_token_id=0)


def empty(model_class, config):
    with init_empty_weights():
        return model_class(config).eval()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A random GPT-2 and its checkpoint in many shards (save_pretrained, max_shard_size)."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(gpt2_config()).eval()
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder, max_shard_size="100KB")
    return model, folder


def prompt():
    return torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(("prefetch", "release"), [(2, True), (0, True), (2, None)])
def test_gpt2_split_between_cpu_and_disk_matches_the_whole_model(gpt2, prefetch, release):
    reference, folder = gpt2
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(set(checkpoint_files(folder).values())) > 4  # really sharded
    model = load_checkpoint_and_dispatch(empty(transformers.GPT2LMHeadModel, gpt2_config()),
                                         folder, device_map=GPT2_CPU_DISK, prefetch=prefetch,
                                         release_after_use=release)
    try:
        # Same dtype as the checkpoint: disk blocks are read from the shards in place.
        assert mapped_file(model.transformer.h[3].mlp.c_fc.weight).startswith(str(folder))
        assert mapped_file(model.transformer.h[0].mlp.c_fc.weight) is None
        assert model.lm_head.weight is model.transformer.wte.weight
        with torch.no_grad():
            assert torch.equal(model(prompt()).logits, reference(prompt()).logits)
        generate = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        expected = reference.generate(prompt(), **generate)
        assert torch.equal(model.generate(prompt(), **generate), expected)
        stats = dispatch_stats(model)
        if release:  # pages dropped after each use: every pass loads every disk block
            assert (stats.prefetched > 0) == (prefetch > 0) and stats.inline >= 1
            assert stats.in_memory == 0
        else:  # kept mapped; the checkpoint, just written, is in the page cache
            assert not stats.release_after_use and stats.in_memory > 0
    finally:
        remove_dispatch(model)


def test_dtype_conversion_on_the_way_writes_disk_blocks_to_offload_dir(gpt2, tmp_path):
    reference, folder = gpt2
    model = load_checkpoint_and_dispatch(empty(transformers.GPT2LMHeadModel, gpt2_config()),
                                         folder, device_map=GPT2_CPU_DISK, dtype="bfloat16",
                                         offload_dir=tmp_path)
    try:
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert mapped_file(model.transformer.h[3].attn.c_attn.weight).startswith(str(tmp_path))
        expected = copy.deepcopy(reference).to(torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(model(prompt()).logits, expected(prompt()).logits)
    finally:
        remove_dispatch(model)
    with pytest.raises(InvalidArgumentError, match="offload_dir"):
        load_checkpoint_and_dispatch(empty(transformers.GPT2LMHeadModel, gpt2_config()),
                                     folder, device_map=GPT2_CPU_DISK, dtype="bfloat16")


def test_auto_map_with_little_ram_offloads_to_disk(gpt2):
    reference, folder = gpt2
    model = empty(transformers.GPT2LMHeadModel, gpt2_config())
    max_memory = {"cpu": "150KB"}
    device_map = infer_device_map(model, max_memory=max_memory)
    assert set(device_map.values()) == {"cpu", "disk"}
    model = load_checkpoint_and_dispatch(model, folder, max_memory=max_memory)
    try:
        with torch.no_grad():
            assert torch.equal(model(prompt()).logits, reference(prompt()).logits)
    finally:
        remove_dispatch(model)


def test_llama_with_rotary_buffers_from_a_single_file(tmp_path):
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(llama_config()).eval()
    reference.save_pretrained(tmp_path)  # one model.safetensors
    assert (tmp_path / "model.safetensors").is_file()
    model = empty(transformers.LlamaForCausalLM, llama_config())
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "disk",
                  "model.rotary_emb": "cpu", "lm_head": "disk"}
    model = load_checkpoint_and_dispatch(model, tmp_path / "model.safetensors",
                                         device_map=device_map)
    try:
        with torch.no_grad():
            assert torch.equal(model(prompt()).logits, reference(prompt()).logits)
        generate = dict(max_new_tokens=5, do_sample=False)
        assert torch.equal(model.generate(prompt(), **generate),
                           reference.generate(prompt(), **generate))
    finally:
        remove_dispatch(model)


def test_checkpoint_problems_are_named(tmp_path):
    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 2)
    save_file({"weight": linear.weight.data, "bias": linear.bias.data, "extra": torch.ones(1)},
              tmp_path / "a.safetensors")
    with init_empty_weights():
        model = torch.nn.Linear(3, 2)
    with pytest.raises(InvalidArgumentError, match="strict=False"):
        load_checkpoint_and_dispatch(model, tmp_path / "a.safetensors", device_map="cpu")
    model = load_checkpoint_and_dispatch(model, tmp_path, device_map="cpu", strict=False)
    assert torch.equal(model.weight, linear.weight)
    with pytest.raises(TransformOrderError, match="already dispatched"):
        load_checkpoint_and_dispatch(model, tmp_path, device_map="cpu")
    remove_dispatch(model)
    with init_empty_weights():
        wider = torch.nn.Linear(4, 2)
    with pytest.raises(InvalidArgumentError, match="shape"):
        load_checkpoint_and_dispatch(wider, tmp_path, device_map="cpu", strict=False)
    with init_empty_weights():
        more = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(InvalidArgumentError, match="lacks"):
        load_checkpoint_and_dispatch(more, tmp_path, device_map="cpu", strict=False)
    with pytest.raises(InvalidArgumentError, match="safetensors"):
        load_checkpoint_and_dispatch(more, tmp_path / "nothing-here", device_map="cpu")
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"weight": "../a.safetensors", "bias": "../a.safetensors"}}))
    with pytest.raises(UntrustedCheckpointError, match="not inside"):
        checkpoint_files(tmp_path / "index")  # an index never leads outside its folder
