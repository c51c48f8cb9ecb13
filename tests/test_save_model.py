"""save_model / load_model / `accel merge-weights`: Hugging Face-style safetensors export."""

from __future__ import annotations

import fractions
import importlib.util
import json
import weakref
from pathlib import Path

import pytest
import torch
from helpers import accel_cli
from safetensors import safe_open
from torch import nn

import accel
from accel.checkpoint import export, save_state
from accel.checkpoint.export import load_model, save_model
from accel.checkpoint.weights import (
    INDEX_NAME,
    WEIGHTS_NAME,
    CorruptCheckpointError,
    TensorSpec,
    plan_shards,
    write_safetensors_shards,
)
from accel.context import Context
from accel.errors import AccelError, InvalidArgumentError
from accel.testing import run_world

transformers = pytest.importorskip("transformers")

TOKENS = torch.arange(24).reshape(2, 12) % 96


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=96,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


# --------------------------------------------------------------------------- one process


def test_sharded_export_is_what_transformers_reads(tmp_path):
    model = tiny_gpt2()
    save_model(model, tmp_path / "out", Context(), max_shard_size="60KB")
    out = tmp_path / "out"
    index = json.loads((out / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    # tied lm_head is written once, under the embedding's name, as transformers does
    assert "lm_head.weight" not in index["weight_map"]
    assert "transformer.wte.weight" in index["weight_map"]
    sizes = 0
    for file in files:
        with safe_open(out / file, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            sizes += sum(handle.get_tensor(k).nbytes for k in handle.keys())
    assert index["metadata"]["total_size"] == sizes
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert torch.equal(logits(reloaded), logits(model))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_small_model_is_one_file_and_overwrite_leaves_no_stale_shard(tmp_path):
    out = tmp_path / "out"
    save_model(tiny_gpt2(0), out, Context(), max_shard_size="60KB")
    model = tiny_gpt2(1)
    save_model(torch.compile(model), out, Context())  # the compiled wrapper is stripped
    assert sorted(p.name for p in out.iterdir()) == ["config.json", WEIGHTS_NAME]
    fresh = tiny_gpt2(2)
    assert load_model(fresh, out / WEIGHTS_NAME, Context()) == ([], [])
    assert torch.equal(logits(fresh), logits(model))
    assert fresh.lm_head.weight is fresh.transformer.wte.weight


def test_writer_holds_one_gathered_tensor_at_a_time(tmp_path):
    specs = [TensorSpec(f"t{i}", (256, 64), torch.float32) for i in range(6)]
    peak_alive = _write_counting(specs, lambda spec: torch.full(spec.shape, 1.0), tmp_path)
    assert peak_alive == 0  # every earlier tensor was freed before the next was fetched
    assert len(plan_shards(specs, 3 * 256 * 64 * 4)) == 2
    assert len(list(tmp_path.glob("model-*-of-00002.safetensors"))) == 2


def test_a_writer_that_fails_still_fetches_every_tensor(tmp_path):
    # Other ranks gather the remaining tensors with this one: it must not stop taking part.
    specs = [TensorSpec(f"t{i}", (8,), torch.float32) for i in range(5)]
    fetched = []

    def fetch(name):
        fetched.append(name)
        return torch.zeros(8)

    with pytest.raises(OSError):
        write_safetensors_shards(specs, fetch, tmp_path / "absent", max_shard_size=64)
    assert sorted(fetched) == [spec.name for spec in specs]


def _write_counting(specs, make, directory, max_shard_size=3 * 256 * 64 * 4):
    """Write through write_safetensors_shards; the most earlier fetched tensors alive at once."""
    refs, peak = [], [0]
    by_name = {spec.name: spec for spec in specs}

    def fetch(name):
        peak[0] = max(peak[0], sum(ref() is not None for ref in refs))
        tensor = make(by_name[name])
        if tensor is not None:
            refs.append(weakref.ref(tensor))
        return tensor

    write_safetensors_shards(specs, fetch, directory, max_shard_size=max_shard_size)
    return peak[0]


def test_load_errors_name_the_problem(tmp_path):
    model = tiny_gpt2()
    save_model(model, tmp_path / "out", Context(), max_shard_size="60KB")
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=64, n_head=2, vocab_size=96, n_positions=32))
    with pytest.raises(InvalidArgumentError, match=r"unexpected transformer\.h\.1\.") as info:
        load_model(other, tmp_path / "out", Context())
    assert "strict=False" in str(info.value)
    result = load_model(other, tmp_path / "out", Context(), strict=False)
    assert result.missing == [] and result.unexpected[0].startswith("transformer.h.1.")
    assert torch.equal(other.transformer.wte.weight, model.transformer.wte.weight)

    wider = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=32))
    with pytest.raises(InvalidArgumentError, match="has shape"):
        load_model(wider, tmp_path / "out", Context())

    shard = sorted((tmp_path / "out").glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    before = model.transformer.wte.weight.clone()
    with pytest.raises(CorruptCheckpointError, match=shard.name):
        load_model(model, tmp_path / "out", Context())
    assert torch.equal(model.transformer.wte.weight, before)  # nothing was loaded
    shard.unlink()
    with pytest.raises(CorruptCheckpointError, match=f"{shard.name} is missing"):
        load_model(model, tmp_path / "out", Context())


def test_foreign_torch_files_load_with_weights_only(tmp_path):
    source, target = nn.Linear(4, 3), nn.Linear(4, 3)
    torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")
    load_model(target, tmp_path, Context())
    assert torch.equal(target.weight, source.weight)

    # any object beyond tensors and containers is refused by weights_only unpickling
    torch.save({"weight": fractions.Fraction(1, 3)}, tmp_path / "evil.pt")
    with pytest.raises(CorruptCheckpointError, match="evil.pt"):
        load_model(target, tmp_path / "evil.pt", Context())
    (tmp_path / "cut.pt").write_bytes((tmp_path / "pytorch_model.bin").read_bytes()[:200])
    with pytest.raises(CorruptCheckpointError, match="cut.pt"):
        load_model(target, tmp_path / "cut.pt", Context())


def test_bad_arguments(tmp_path):
    with pytest.raises(InvalidArgumentError, match="max_shard_size"):
        save_model(nn.Linear(2, 2), tmp_path / "x", Context(), max_shard_size=0)
    with pytest.raises(InvalidArgumentError, match="holds no weights"):
        load_model(nn.Linear(2, 2), tmp_path, Context())


def test_merge_weights_errors_are_one_line(tmp_path):
    missing = accel_cli("merge-weights", str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert missing.returncode == 2 and "nowhere does not exist" in missing.stderr
    save_model(nn.Linear(2, 2), tmp_path / "lin", Context())
    unmatched = accel_cli("merge-weights", str(tmp_path / "lin"), str(tmp_path / "out"),
                          "--prefix", "model.")
    assert unmatched.returncode == 2 and "no tensors whose names start with 'model.'" in (
        unmatched.stderr)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- two processes


def _train_step(model, ctx):
    """One AdamW step (its state is saved by save_state); returns the wrapped optimizer."""
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), ctx)
    model.train()
    accel.backward(model(TOKENS, labels=TOKENS).loss, optimizer, ctx)
    optimizer.step()
    optimizer.zero_grad()
    model.eval()
    return optimizer


def _local(tensor):
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).detach().clone()


def _snapshot(model, optimizer):
    """This rank's parameters and optimizer state, in order (FSDP2: its own shards)."""
    params = [_local(p) for p in model.parameters()]
    states = [_local(value) for entry in optimizer.state.values() for value in entry.values()]
    return params + states


def _state_round_trip(model, optimizer, ctx, path):
    """save_state; perturb weights and optimizer state; load_state. Is everything back?"""
    save_state(path, ctx, model=model, optimizer=optimizer)
    expected, expected_logits = _snapshot(model, optimizer), logits(model)
    with torch.no_grad():
        for tensor in [*model.parameters(), *(v for entry in optimizer.state.values()
                                              for v in entry.values())]:
            tensor.add_(1.0)
    assert not torch.equal(logits(model), expected_logits)
    accel.load_state(path, ctx, model=model, optimizer=optimizer)
    got = _snapshot(model, optimizer)
    module = export.unwrap_for_export(model, ctx)
    return (all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
            and torch.equal(logits(model), expected_logits)
            and module.lm_head.weight is module.transformer.wte.weight)  # still tied


def _ddp_world(ctx, out):
    model, ddp_ctx = accel.shard_model(tiny_gpt2(), ctx, strategy="ddp")
    optimizer = _train_step(model, ddp_ctx)
    save_model(model, Path(out) / "ddp", ddp_ctx, max_shard_size="60KB")
    # accel's full layout, tied weights stored once
    restored = _state_round_trip(model, optimizer, ddp_ctx, Path(out) / "state")
    fresh, _ = accel.shard_model(tiny_gpt2(seed=5), ctx, strategy="ddp")
    load_model(fresh, Path(out) / "ddp", ddp_ctx)
    return logits(model.module), logits(fresh.module), restored


def _fsdp_world(ctx, out):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    base = ctx
    model, ctx = accel.shard_model(tiny_gpt2(), base, strategy=accel.FSDP())
    optimizer = _train_step(model, ctx)
    # the real FSDP2 gather, counted: no earlier full tensor is alive at the next gather
    specs, fetch = export._full_state_source(model, export.unwrap_for_export(model, ctx), ctx)
    writer_dir = Path(out) / "counted" if ctx.is_main_process else None
    if writer_dir is not None:
        writer_dir.mkdir()
    peak = _write_counting(specs, lambda spec: fetch(spec.name), writer_dir,
                           max_shard_size=60_000)
    save_model(model, Path(out) / "fsdp", ctx, max_shard_size="60KB")
    dcp.save(get_model_state_dict(model), checkpoint_id=Path(out) / "dcp")
    # accel's sharded layout: safetensors shards by DCP's HF writer, tied weights once
    restored = _state_round_trip(model, optimizer, ctx, Path(out) / "state")
    fresh, _ = accel.shard_model(tiny_gpt2(seed=5), base, strategy=accel.FSDP())
    load_model(fresh, Path(out) / "fsdp", ctx)
    local_shards = {name: p.to_local().numel() for name, p in fresh.named_parameters()}
    blocker = Path(out) / "not-a-folder"  # rank 0 cannot create its output folder here
    if ctx.is_main_process:
        blocker.write_text("")
    try:
        save_model(model, blocker / "export", ctx)
        failure = "none"
    except (OSError, AccelError) as exc:
        failure = f"{type(exc).__name__}: {exc}"
    return logits(model), logits(fresh), peak, local_shards, failure, restored


def _saved_names(state: Path) -> tuple[set[str], set[str], dict]:
    """Model and optimizer tensor names of a save_state checkpoint, and what it recorded."""
    from accel.checkpoint.parts import sharded_tensor_specs

    meta = json.loads((state / "accel.json").read_text())
    if meta["layout"] == "sharded":
        names = [set(sharded_tensor_specs(state / part)) for part in ("model", "optimizer")]
    else:
        names = []
        for part in ("model", "optimizer"):
            with safe_open(state / f"{part}.safetensors", framework="pt") as handle:
                names.append(set(handle.keys()))
    return names[0], names[1], meta["saved"]["tied"]


def _check_tied_once(state: Path) -> None:
    model_names, optimizer_names, tied = _saved_names(state)
    assert tied == {"lm_head.weight": "transformer.wte.weight"}
    assert "transformer.wte.weight" in model_names and "lm_head.weight" not in model_names
    assert model_names == set(dict(tiny_gpt2().named_parameters()))  # each tensor once
    # a tied parameter is one parameter: one optimizer entry (exp_avg, exp_avg_sq, step)
    entries = {name.split("/")[1] for name in optimizer_names if name.startswith("state/")}
    assert entries == model_names, entries ^ model_names


def test_ddp_export_loads_in_transformers_and_back(tmp_path):
    trained, reloaded, restored = run_world(_ddp_world, 2, str(tmp_path),
                                            env={"OMP_NUM_THREADS": "1"})[0]
    assert torch.equal(trained, reloaded) and restored
    assert len(list((tmp_path / "ddp").glob("model-*.safetensors"))) > 2
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ddp").eval()
    assert torch.equal(logits(hf), trained)
    assert not torch.equal(trained, logits(tiny_gpt2()))  # the trained weights were saved
    _check_tied_once(tmp_path / "state")
    _check_merge(tmp_path / "state", tmp_path / "merged", trained)


def _check_merge(checkpoint, out, expected, *options):
    done = accel_cli("merge-weights", str(checkpoint), str(out), "--max-shard-size", "100KB",
                     *options)
    assert done.returncode == 0, done.stderr
    assert (out / INDEX_NAME).is_file()
    tiny_gpt2().config.save_pretrained(out)  # a checkpoint holds weights, not the config
    merged = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert torch.equal(logits(merged), expected)
    assert merged.lm_head.weight is merged.transformer.wte.weight


def test_fsdp_export_streams_loads_in_transformers_and_merges(tmp_path):
    results = run_world(_fsdp_world, 2, str(tmp_path), env={"OMP_NUM_THREADS": "1"})
    trained, reloaded, peak, shards, failure, restored = results[0]
    assert failure.startswith("InvalidArgumentError")
    assert results[1][4].startswith("AccelError: rank 0 could not write")  # no hang
    assert torch.equal(trained, reloaded) and peak == 0
    assert restored and results[1][5]
    fc = "transformer.h.0.mlp.c_fc.weight"
    assert shards[fc] < dict(tiny_gpt2().named_parameters())[fc].numel()  # really sharded
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "fsdp").eval()
    assert torch.equal(logits(hf), trained)

    _check_merge(tmp_path / "dcp", tmp_path / "merged_dcp", trained, "--trust-pickle")
    # a save_state checkpoint written by 2 FSDP2 ranks, merged in one process
    _check_tied_once(tmp_path / "state")
    _check_merge(tmp_path / "state", tmp_path / "merged_state", trained)


def _deepspeed_world(ctx, out):
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, ctx = accel.shard_model(model, ctx, strategy=accel.DeepSpeed(stage=3))
    optimizer, ctx = accel.wrap_optimizer(optimizer, ctx)
    model.train()
    accel.backward(model(TOKENS, labels=TOKENS).loss, optimizer, ctx)
    optimizer.step()
    optimizer.zero_grad()
    model.eval()
    save_model(model, Path(out) / "ds", ctx, max_shard_size="60KB")
    trained = logits(model)
    load_model(model, Path(out) / "initial", ctx)  # back to the untrained weights
    return trained, logits(model)


# find_spec, not import: importing deepspeed here would set environment variables.
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_deepspeed_zero3_export_and_load(tmp_path):
    initial = tiny_gpt2()
    save_model(initial, tmp_path / "initial", Context())
    trained, restored = run_world(_deepspeed_world, 2, str(tmp_path), timeout=300,
                                  env={"OMP_NUM_THREADS": "1"})[0]
    torch.testing.assert_close(restored, logits(initial), rtol=0, atol=1e-5)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ds").eval()
    torch.testing.assert_close(logits(hf), trained, rtol=0, atol=1e-5)
    assert not torch.allclose(trained, logits(initial))
    assert "lm_head.weight" not in json.loads((tmp_path / "ds" / INDEX_NAME).read_text())[
        "weight_map"]


class Odd(nn.Module):
    """Tensors at offsets that are not page- or even element-aligned, one empty."""

    def __init__(self):
        super().__init__()
        self.flag = nn.Parameter(torch.tensor([1.0, 0.0, 1.0]).to(torch.bool), requires_grad=False)
        self.small = nn.Parameter(torch.arange(5, dtype=torch.int8), requires_grad=False)
        self.empty = nn.Parameter(torch.empty(0, 4))
        self.big = nn.Parameter(torch.randn(300, 1000))


def test_load_model_copies_from_the_files_mapping_at_any_offset_and_converts(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = Odd()
    state = {name: tensor.detach() for name, tensor in source.state_dict().items()}
    state["big"] = state["big"].to(torch.bfloat16)  # a bf16 file into an fp32 model
    save_file(state, tmp_path / WEIGHTS_NAME, metadata={"format": "pt"})
    target = Odd()
    before = target.big.data_ptr()
    load_model(target, tmp_path, Context())
    assert target.big.data_ptr() == before  # copied into the model's own memory
    for name, value in state.items():
        loaded = target.state_dict()[name]
        assert loaded.dtype == source.state_dict()[name].dtype
        assert torch.equal(loaded, value.to(loaded.dtype)), name
