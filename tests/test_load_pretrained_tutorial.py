"""Tutorial 09 runs as documented on 2 processes: fine-tunes, stops, resumes, exports.

The first run writes the stand-in download, builds the Llama on meta, fills it with
load_pretrained under FSDP2 and trains 2 optimizer steps (accumulation 4, bf16,
checkpointed activations, blocks compiled with aot_eager, which goes through dynamo and
AOT autograd like inductor but generates no C++); the second resumes at step 2 and goes
on to 4; the export loads with from_pretrained and differs from the pretrained weights.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers import accel_cli

transformers = pytest.importorskip("transformers")

TUTORIAL = "tutorials/09_finetune_pretrained.py"


def launch(folder, steps: int, *options: str, processes: int = 2):
    result = accel_cli("launch", "-n", str(processes), TUTORIAL, "--dir", str(folder),
                       "--steps", str(steps), "--compile-backend", "aot_eager", *options,
                       timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.spawned
@pytest.mark.timeout(900)
def test_tutorial_09_finetunes_resumes_and_exports(tmp_path):
    first = launch(tmp_path, 2)
    assert ("with_amp(bf16) -> checkpoint_activations('full', 4 blocks) -> compile_model(4 x "
            "LlamaDecoderLayer" in first and "shard_model(fsdp, keep_meta=True) -> "
            "load_pretrained(pretrained) -> wrap_optimizer(AdamW)" in first
            and "accumulate_grads(steps=4)" in first), first
    assert re.findall(r"step (\d+) loss", first) == ["1", "2"], first
    second = launch(tmp_path, 4)
    assert "resumed at step 2" in second, second
    assert re.findall(r"step (\d+) loss", second) == ["3", "4"], second
    assert "from_pretrained:" in second
    pretrained = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "pretrained")
    tuned = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export")
    weights = [(a, b) for a, b in zip(pretrained.parameters(), tuned.parameters(), strict=True)]
    assert all(a.shape == b.shape for a, b in weights)
    assert not all(torch.equal(a, b) for a, b in weights)  # trained from the pretrained start
    # 4 steps of lr 3e-3 move the weights a little, not as far as a random start would be
    first_layer = tuned.model.layers[0].self_attn.q_proj.weight
    start = pretrained.model.layers[0].self_attn.q_proj.weight
    assert (first_layer - start).abs().max() < 0.05  # Adam: at most ~lr per step


@pytest.mark.spawned
@pytest.mark.timeout(900)
def test_tutorial_09_tp_x_fsdp_compiled_on_four_processes(tmp_path):
    """The documented TP 2 x FSDP 2 run: selective recomputation of DTensor blocks,
    compiled once per block class, filled from the pretrained files, exported."""
    out = launch(tmp_path, 2, "--tp", "2", processes=4)
    assert ("with_amp(bf16) -> tensor_parallel(" in out
            and "checkpoint_activations('selective', 4 blocks) -> compile_model(4 x "
            "LlamaDecoderLayer" in out and "load_pretrained(pretrained)" in out), out
    losses = [float(v) for v in re.findall(r"step \d+ loss (\S+)", out)]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses), out
    pretrained = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "pretrained")
    tuned = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export")
    moved = [(a - b).abs().max().item()
             for a, b in zip(pretrained.parameters(), tuned.parameters(), strict=True)]
    assert 0 < max(moved) < 0.05  # trained from the pretrained weights, whole again
