"""estimate_memory and `accel estimate-memory`: from config.json files and factories, offline."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import accel_cli
from torch import nn

from accel.cli.main import main
from accel.errors import InvalidArgumentError
from accel.inference.estimate import estimate_memory


def small_mlp() -> nn.Module:
    """A factory for `test_inference_estimate:small_mlp` (3,000 + 1,010 parameters)."""
    return nn.Sequential(nn.Linear(100, 30, bias=False), nn.ReLU(), nn.Linear(100, 10))


def test_a_factory_is_built_on_meta_and_counted():
    estimate = estimate_memory(small_mlp)
    assert estimate.parameters == 3000 + 1010
    assert estimate.largest_layer == "0"
    rows = {row.dtype: row for row in estimate.rows}
    assert rows["float32"].total_bytes == 4010 * 4
    assert rows["bfloat16"].total_bytes == 4010 * 2
    assert rows["int4"].total_bytes == 2005
    assert rows["float32"].largest_layer_bytes == 3000 * 4
    assert rows["float32"].training_bytes == rows["bfloat16"].training_bytes == 4010 * 16
    assert rows["int8"].training_bytes is None
    assert estimate_memory("test_inference_estimate:small_mlp").parameters == 4010


def test_errors_name_the_problem():
    with pytest.raises(InvalidArgumentError, match="module:function"):
        estimate_memory("no-such-file.json")
    with pytest.raises(InvalidArgumentError, match="cannot import"):
        estimate_memory("no_such_module_xyz:build")
    with pytest.raises(InvalidArgumentError, match="no attribute"):
        estimate_memory("test_inference_estimate:nothing")
    with pytest.raises(InvalidArgumentError, match="unknown dtypes"):
        estimate_memory(small_mlp, dtypes=["float8"])
    with pytest.raises(InvalidArgumentError, match="not a torch.nn.Module"):
        estimate_memory(lambda: 3)


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers",
                               reason="reading a config.json builds the model with transformers")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_config_json_gives_the_exact_parameter_count(transformers, tmp_path, kind):
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=3, n_embd=96, n_head=4, vocab_size=1000,
                                         n_positions=128)
        config.architectures = ["GPT2LMHeadModel"]
        real = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=160,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, vocab_size=500)
        config.architectures = ["LlamaForCausalLM"]
        real = transformers.LlamaForCausalLM(config)
    config.save_pretrained(tmp_path)
    estimate = estimate_memory(tmp_path / "config.json")
    assert estimate.model == type(real).__name__
    assert estimate.parameters == sum(p.numel() for p in real.parameters())  # tied once
    tensors = {id(t): t for t in [*real.parameters(), *real.buffers()]}.values()
    float32 = next(row for row in estimate.rows if row.dtype == "float32")
    assert float32.total_bytes == sum(t.numel() * t.element_size() for t in tensors)
    assert estimate_memory(tmp_path).parameters == estimate.parameters  # the folder works too


def test_cli_prints_a_table_and_json(transformers, tmp_path):
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300)
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(tmp_path)
    expected = sum(p.numel() for p in transformers.GPT2LMHeadModel(config).parameters())
    result = accel_cli("estimate-memory", str(tmp_path / "config.json"), extra_env={
        "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert f"GPT2LMHeadModel: {expected:,} parameters" in result.stdout
    for column in ("dtype", "total size", "largest layer", "training with Adam"):
        assert column in result.stdout


def test_cli_json_and_errors_in_process(capsys):
    assert main(["estimate-memory", "test_inference_estimate:small_mlp", "--json",
                 "--dtypes", "float16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == 4010
    assert [row["dtype"] for row in report["rows"]] == ["float16"]
    assert report["rows"][0]["total_bytes"] == 4010 * 2
    assert main(["estimate-memory", "nowhere_xyz:build"]) == 2
    assert "cannot import" in capsys.readouterr().err


def test_a_module_instance_is_used_as_is():
    model = nn.Linear(4, 4).to(torch.float16)
    assert estimate_memory(model, dtypes=["float32"]).rows[0].total_bytes == 20 * 4
