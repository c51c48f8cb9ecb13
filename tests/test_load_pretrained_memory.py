"""Peak memory of load_pretrained: a ~2 GB checkpoint into FSDP2 on the meta device, 2 ranks.

Each rank (a real process) resets its peak resident set (/proc/self/clear_refs), loads,
and reads the peak back (VmHWM): the growth must stay within its own shard, plus the
largest tensor of the checkpoint, plus 128 MiB. The checkpoint (a wide Llama, fp32,
2.2 GB in 5 files with an index) is written tensor by tensor into a temporary folder
from the model's shapes, never whole in memory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import accel
from accel.testing import run_world

transformers = pytest.importorskip("transformers")
if not sys.platform.startswith("linux"):
    pytest.skip("reads /proc/self", allow_module_level=True)

MiB = 1 << 20


def wide_config():
    return transformers.LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=False)


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def load_and_measure(ctx, folder: str) -> dict:
    import gc

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(wide_config())
    model, ctx = accel.shard_model(model, ctx, strategy=accel.FSDP(keep_meta=True))
    gc.collect()
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from now
    model, ctx = accel.load_pretrained(model, ctx, folder)
    peak = status("VmHWM")
    shard = sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes
                for t in (*model.parameters(), *model.buffers()))
    # a value from the file, where this rank holds it: the load really happened
    weight = model.model.layers[7].mlp.down_proj.weight
    return {"growth": peak - before, "shard": shard, "rows": weight.to_local().shape[0],
            "sample": weight.to_local()[-1, -3:].clone()}


@pytest.mark.spawned
@pytest.mark.timeout(900)
def test_peak_memory_is_the_shard_plus_one_tensor(tmp_path):
    from accel.checkpoint.weights import spec_of, write_safetensors_shards

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(wide_config())
    specs = [spec_of(name, tensor) for name, tensor in model.state_dict().items()]
    shapes, generator = {spec.name: spec.shape for spec in specs}, torch.Generator()
    write_safetensors_shards(specs, lambda name: torch.rand(shapes[name], generator=generator),
                             tmp_path, max_shard_size=500 * MiB)
    largest = max(spec.nbytes for spec in specs)
    assert sum(spec.nbytes for spec in specs) > 2 * 1024 * MiB
    results = run_world(load_and_measure, 2, str(tmp_path), timeout=600)
    from safetensors import safe_open

    index = {}
    for file in tmp_path.glob("*.safetensors"):
        with safe_open(os.fspath(file), "pt") as handle:
            index.update({name: file for name in handle.keys()})
    name = "model.layers.7.mlp.down_proj.weight"
    with safe_open(os.fspath(index[name]), "pt") as handle:
        rows = handle.get_slice(name)
        for rank, result in enumerate(results):
            last_row = (rank + 1) * result["rows"] - 1
            assert torch.equal(result["sample"], rows[last_row:last_row + 1, -3:][0])
    for result in results:
        budget = result["shard"] + largest + 128 * MiB
        print(f"growth {result['growth'] / MiB:.0f} MiB, shard {result['shard'] / MiB:.0f} "
              f"MiB, largest tensor {largest / MiB:.0f} MiB")
        assert result["growth"] <= budget, (result["growth"] / MiB, budget / MiB)
