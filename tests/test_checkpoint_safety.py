"""Checkpoint safety: no unpickling unasked, no file outside a checkpoint read, and
save_model / `accel merge-weights` never delete a user's files. Real files, no mocks."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import REPO, accel_cli
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from accel.checkpoint import load_model, load_sharded_tensors, load_state, save_model, save_state
from accel.checkpoint.export import _full_state_source
from accel.checkpoint.parts import sharded_tensor_specs
from accel.checkpoint.weights import INDEX_NAME, TORCH_INDEX_NAME, WEIGHTS_NAME, plan_shards
from accel.context import Context
from accel.errors import InvalidArgumentError, UntrustedCheckpointError
from accel.inference import checkpoint_files, load_checkpoint_and_dispatch
from accel.testing import LAUNCH_VARIABLES


def cli_in(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m accel ARGS` run from `cwd` (accel_cli runs from the repository)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "accel", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=180)


def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(4, 3)


# --------------------------------------------------------------------------- no pickle


class _Payload:
    """Unpickled, it creates `marker`: what a crafted .metadata can do (run any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def crafted_dcp_folder(tmp_path: Path) -> tuple[Path, Path]:
    folder, marker = tmp_path / "dcp", tmp_path / "code-ran"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    (folder / "__0_0.distcp").write_bytes(b"")
    return folder, marker


def test_pickled_metadata_is_refused_unless_trusted(tmp_path):
    folder, marker = crafted_dcp_folder(tmp_path)
    for read in (load_sharded_tensors, sharded_tensor_specs):
        with pytest.raises(UntrustedCheckpointError, match="trust_pickle=True") as caught:
            read(folder)
        assert str(folder) in str(caught.value)
    assert not marker.exists()
    # The payload is live: trusting the folder runs it (the refusal is all that stopped it).
    with pytest.raises(Exception):  # noqa: B017 - whatever torch makes of the payload
        load_sharded_tensors(folder, trust_pickle=True)
    assert marker.exists()


def test_merge_weights_refuses_pickled_metadata(tmp_path):
    folder, marker = crafted_dcp_folder(tmp_path)
    done = accel_cli("merge-weights", str(folder), str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    assert "--trust-pickle" in done.stderr and str(folder) in done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_trusted_dcp_folder_loads_and_merges(tmp_path):
    weights = {"weight": torch.randn(3, 4), "bias": torch.randn(3)}
    dcp.save(weights, checkpoint_id=tmp_path / "dcp", no_dist=True)
    loaded = load_sharded_tensors(tmp_path / "dcp", trust_pickle=True)
    assert all(torch.equal(loaded[key], value) for key, value in weights.items())
    done = accel_cli("merge-weights", str(tmp_path / "dcp"), str(tmp_path / "out"),
                     "--trust-pickle")
    assert done.returncode == 0, done.stderr
    model = linear()
    load_model(model, tmp_path / "out", Context())
    assert torch.equal(model.weight, weights["weight"])


# --------------------------------------------------------------------------- paths


class OpenWatch:
    """Whether a file was opened, by any code (Python, Rust, C): Linux inotify."""

    IN_OPEN = 0x20

    def __init__(self, path: Path):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK) if hasattr(libc, "inotify_init1") else -1
        if self.fd < 0 or libc.inotify_add_watch(self.fd, os.fsencode(path), self.IN_OPEN) < 0:
            pytest.skip("inotify is not available here")
        self.opened()  # drain
        with safe_open(path, framework="pt"):  # the watch must see a real open
            pass
        if not self.opened():
            pytest.skip("inotify does not report opens on this filesystem")

    def opened(self) -> bool:
        try:
            return bool(os.read(self.fd, 4096))
        except BlockingIOError:
            return False

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def outside(tmp_path):
    """A valid weights file for `linear()` outside the checkpoint, and a watch on it."""
    path = tmp_path / "elsewhere" / "secret.safetensors"
    path.parent.mkdir()
    save_file({"weight": torch.full((3, 4), 7.0), "bias": torch.full((3,), 7.0)}, path)
    watch = OpenWatch(path)
    yield path, watch
    watch.close()


def index_folder(root: Path, file: str, index_name: str = INDEX_NAME) -> Path:
    root.mkdir(exist_ok=True)
    weight_map = {"weight": file, "bias": file}
    (root / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def escaping_names(tmp_path: Path, secret: Path) -> list[tuple[Path, str]]:
    """Checkpoint folders whose index leads to `secret`: ../, absolute, and symlinks."""
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "sub").symlink_to(secret.parent, target_is_directory=True)
    (linked / "file.safetensors").symlink_to(secret)
    return [(tmp_path / "climbs", f"../elsewhere/{secret.name}"),
            (tmp_path / "absolute", str(secret)),
            (linked, f"sub/{secret.name}"),
            (linked, "file.safetensors")]


@pytest.mark.parametrize("index_name", [INDEX_NAME, TORCH_INDEX_NAME])
def test_load_model_reads_no_file_outside_the_folder(tmp_path, outside, index_name):
    secret, watch = outside
    model = linear()
    before = model.weight.detach().clone()
    for root, name in escaping_names(tmp_path, secret):
        with pytest.raises(UntrustedCheckpointError, match="not inside") as caught:
            load_model(model, index_folder(root, name, index_name), Context())
        assert name in str(caught.value) and index_name in str(caught.value)
    assert not watch.opened()
    assert torch.equal(model.weight, before)


def test_load_checkpoint_and_dispatch_reads_no_file_outside_the_folder(tmp_path, outside):
    secret, watch = outside
    for root, name in escaping_names(tmp_path, secret):
        folder = index_folder(root, name)
        with pytest.raises(UntrustedCheckpointError, match="not inside"):
            checkpoint_files(folder)
        model = linear()
        with pytest.raises(UntrustedCheckpointError, match="not inside"):
            load_checkpoint_and_dispatch(model, folder, device_map="cpu")
        assert not torch.equal(model.weight, torch.full((3, 4), 7.0))
    assert not watch.opened()


def test_files_inside_the_folder_and_a_hub_cache_snapshot_still_load(tmp_path):
    weights = {"weight": torch.full((3, 4), 2.0), "bias": torch.full((3,), 2.0)}
    root = tmp_path / "plain"
    (root / "part").mkdir(parents=True)
    save_file(weights, root / "part" / "w.safetensors")
    # Hugging Face's cache: snapshots/<rev>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    save_file(weights, repo / "blobs" / "0123abcd")
    snapshot = repo / "snapshots" / "rev1"
    snapshot.mkdir(parents=True)
    (snapshot / "model-00001-of-00001.safetensors").symlink_to("../../blobs/0123abcd")
    for folder in (index_folder(root, "part/w.safetensors"),
                   index_folder(snapshot, "model-00001-of-00001.safetensors")):
        model = linear()
        load_model(model, folder, Context())
        assert torch.equal(model.weight, weights["weight"])
        dispatched = load_checkpoint_and_dispatch(linear(), folder, device_map="cpu")
        assert torch.equal(dispatched.weight, weights["weight"])


@pytest.mark.parametrize("escape", ["relative", "absolute"])
def test_load_state_refuses_accel_json_naming_a_file_outside(tmp_path, outside, escape):
    secret, watch = outside
    save_state(tmp_path / "ckpt", Context(), model=linear(), rng=False)
    metadata_file = tmp_path / "ckpt" / "accel.json"
    metadata = json.loads(metadata_file.read_text())
    name = f"../elsewhere/{secret.name}" if escape == "relative" else str(secret)
    metadata["files"][name] = {"bytes": secret.stat().st_size, "crc32": "00000000"}
    metadata_file.write_text(json.dumps(metadata))
    with pytest.raises(UntrustedCheckpointError, match="accel.json"):
        load_state(tmp_path / "ckpt", Context(), model=linear(), rng=False)
    assert not watch.opened()


# --------------------------------------------------------------------------- user files


def add_user_files(folder: Path) -> dict[str, bytes]:
    """A tokenizer, a README and a subfolder beside the weights; their bytes by path."""
    files = {"tokenizer.json": b'{"version": "1.0"}', "README.md": b"# my model\n",
             "extra/notes.txt": b"keep me", "model.bin.bak": b"not ours either"}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def assert_kept(folder: Path, files: dict[str, bytes]) -> None:
    assert {name: (folder / name).read_bytes() for name in files} == files


def weight_files(folder: Path) -> list[str]:
    """What save_model may write there, temporary names included."""
    return sorted(path.name for path in folder.iterdir()
                  if path.name.startswith(("model", "config.json")) and path.is_file()
                  and path.name != "model.bin.bak")


def tiny_gpt2(seed: int) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def shard_size_for(model: nn.Module, count: int) -> int:
    """A max_shard_size that splits `model`'s export into `count` files."""
    specs, _ = _full_state_source(model, model, Context())
    total = sum(spec.nbytes for spec in specs)
    size = next(size for size in range(total // count, total, 1024)
                if len(plan_shards(specs, size)) == count)
    return size


def assert_loads(folder: Path, model: nn.Module) -> None:
    transformers = pytest.importorskip("transformers")
    tokens = torch.arange(12).reshape(2, 6)
    fresh = tiny_gpt2(seed=99)
    load_model(fresh, folder, Context())
    hub = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = model(tokens).logits
        assert torch.equal(fresh(tokens).logits, expected)
        assert torch.equal(hub(tokens).logits, expected)


def test_save_model_keeps_user_files_and_removes_only_its_stale_shards(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    kept = add_user_files(out)
    leftover = out / "model-00002-of-00003.safetensors.tmp-0123456789ab"  # a crashed save's
    leftover.write_bytes(b"half")
    three = tiny_gpt2(seed=1)
    save_model(three, out, Context(), max_shard_size=shard_size_for(three, 3))
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert weight_files(out) == sorted(["config.json", INDEX_NAME, *shards])
    assert_loads(out, three)
    one = tiny_gpt2(seed=2)
    save_model(one, out, Context())  # one file now: the three shards and the index go
    assert weight_files(out) == ["config.json", WEIGHTS_NAME]
    assert_loads(out, one)
    again = tiny_gpt2(seed=3)
    save_model(again, out, Context(), max_shard_size=shard_size_for(again, 3))
    assert WEIGHTS_NAME not in weight_files(out)  # else from_pretrained would prefer it
    assert_loads(out, again)
    assert_kept(out, kept)


def test_save_model_into_the_current_folder_and_not_onto_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kept = add_user_files(tmp_path)
    save_model(linear(), ".", Context())
    assert weight_files(tmp_path) == [WEIGHTS_NAME]
    assert_kept(tmp_path, kept)
    with pytest.raises(InvalidArgumentError, match="README.md is not a folder"):
        save_model(linear(), "README.md", Context())
    assert_kept(tmp_path, kept)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` and the hash of its bytes."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_merge_weights_keeps_user_files_and_replaces_an_earlier_export(tmp_path):
    model = tiny_gpt2(seed=4)
    save_state(tmp_path / "ckpt", Context(), model=model, rng=False)
    out = tmp_path / "export"
    save_model(tiny_gpt2(seed=5), out, Context(), max_shard_size=shard_size_for(model, 3))
    kept = add_user_files(out)
    done = accel_cli("merge-weights", str(tmp_path / "ckpt"), str(out))
    assert done.returncode == 0, done.stderr
    assert f"wrote 1 files to {out}: {WEIGHTS_NAME}" in done.stdout
    # save_model's config.json stays (merge-weights writes none), the old shards go
    assert weight_files(out) == ["config.json", WEIGHTS_NAME]
    assert_loads(out, model)
    assert_kept(out, kept)


def test_merge_weights_into_its_own_checkpoint_is_refused(tmp_path):
    save_state(tmp_path / "ckpt", Context(), model=linear(), rng=False)
    ckpt = tmp_path / "ckpt"
    before = snapshot(ckpt)
    for output in (str(ckpt), f"{ckpt}/model", f"{ckpt}/export/deeper", f"{ckpt}/../ckpt"):
        done = accel_cli("merge-weights", str(ckpt), output)
        assert done.returncode == 2, done.stderr
        assert output in done.stderr and str(ckpt) in done.stderr
        assert "outside the checkpoint" in done.stderr
    file_source = accel_cli("merge-weights", str(ckpt / WEIGHTS_NAME), str(ckpt))
    assert file_source.returncode == 2 and "outside the checkpoint" in file_source.stderr
    assert snapshot(ckpt) == before


def test_merge_weights_to_the_current_folder(tmp_path):
    save_state(tmp_path / "ckpt", Context(), model=linear(), rng=False)
    work = tmp_path / "work"
    work.mkdir()
    kept = add_user_files(work)
    done = cli_in(work, "merge-weights", "../ckpt", ".")
    assert done.returncode == 0, done.stderr
    assert weight_files(work) == [WEIGHTS_NAME]
    assert_kept(work, kept)
    model = nn.Linear(4, 3)
    load_model(model, work, Context())
    assert torch.equal(model.weight, linear().weight)
    # beside a lone pickled file: converted in place, the file stays
    torch.save(linear().state_dict(), work / "pytorch_model.bin")
    (work / WEIGHTS_NAME).unlink()
    converted = cli_in(work, "merge-weights", "pytorch_model.bin", ".")
    assert converted.returncode == 0, converted.stderr
    assert (work / "pytorch_model.bin").is_file() and (work / WEIGHTS_NAME).is_file()
