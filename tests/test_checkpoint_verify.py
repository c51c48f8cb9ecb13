"""Verified loads: XXH3 per 64 MiB segment as written and as read, older CRC32 checkpoints.

The speed itself is measured by bench/checkpoint.py; here: the checksums the writer
computes while streaming are the ones the reader computes on its threads, whatever the
write sizes and segment boundaries; a damaged segment is found; a checkpoint recorded
with CRC32 (format version 1) still loads, and is still checked.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import accel
from accel.checkpoint import CorruptCheckpointError, checksum, load_state, save_state
from accel.checkpoint.files import crc32, file_record


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=6))
def test_streamed_digests_equal_the_readers_whatever_the_write_sizes(data, cuts):
    original = checksum.SEGMENT
    checksum.SEGMENT = 64  # small segments: many boundaries inside a few hundred bytes
    try:
        hasher = checksum.Hasher(checksum.XXH3)
        bounds = sorted({0, len(data), *(cut for cut in cuts if cut < len(data))})
        for start, end in zip(bounds, bounds[1:], strict=False):
            hasher.update(data[start:end])
        read = checksum.digest_of(data, checksum.XXH3)
        assert hasher.value() == read
        assert len(read) == -(-len(data) // 64)  # one digest per (started) segment
    finally:
        checksum.SEGMENT = original


def test_a_flipped_byte_in_any_segment_is_found_and_named(tmp_path, monkeypatch):
    monkeypatch.setattr(checksum, "SEGMENT", 4096)
    ctx = accel.Context()
    model = nn.Linear(64, 64)  # 16 KiB of weights: several segments
    path = save_state(tmp_path / "ckpt", ctx, model=model, rng=False)
    record = json.loads((path / "accel.json").read_text())["files"]["model.safetensors"]
    assert len(record[checksum.XXH3]) > 3 and record == file_record(path / "model.safetensors")
    target = path / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10  # a segment in the middle
    target.write_bytes(bytes(data))
    fresh = nn.Linear(64, 64)
    before = fresh.weight.detach().clone()
    with pytest.raises(CorruptCheckpointError, match=f"{target}.*checksum \\(XXH3-64\\)"):
        load_state(path, ctx, model=fresh, rng=False)
    assert torch.equal(fresh.weight, before)  # refused before anything was loaded


def as_version_1(path):
    """Rewrite a checkpoint's records the way accel wrote them before XXH3: CRC32, v1."""
    meta_file = path / "accel.json"
    metadata = json.loads(meta_file.read_text())
    metadata["format_version"], metadata["checksum"] = 1, "crc32"
    metadata["files"] = {name: {"bytes": (path / name).stat().st_size,
                                "crc32": crc32(path / name)} for name in metadata["files"]}
    meta_file.write_text(json.dumps(metadata))


def test_a_checkpoint_with_crc32_records_loads_and_is_checked(tmp_path):
    ctx = accel.Context()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters()), ctx)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    path = save_state(tmp_path / "old", ctx, model=model, optimizer=optimizer)
    as_version_1(path)
    copy = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    optimizer2, ctx = accel.wrap_optimizer(torch.optim.AdamW(copy.parameters()), ctx)
    info = load_state(path, ctx, model=copy, optimizer=optimizer2)
    assert info.metadata["format_version"] == 1 and info.step == 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), copy.parameters(),
                                                 strict=True))
    shard = path / "optimizer.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=f"{shard}.*checksum \\(CRC32\\)"):
        load_state(path, ctx, model=copy, optimizer=optimizer2)


def test_a_checkpoint_from_a_newer_accel_is_refused_with_the_fix(tmp_path):
    path = save_state(tmp_path / "ckpt", accel.Context(), model=nn.Linear(2, 2), rng=False)
    meta_file = path / "accel.json"
    metadata = json.loads(meta_file.read_text())
    metadata["files"]["model.safetensors"] = {"bytes": os.path.getsize(
        path / "model.safetensors"), "blake9": "00"}
    meta_file.write_text(json.dumps(metadata))
    with pytest.raises(accel.errors.UnsupportedError, match="newer accel; upgrade"):
        load_state(path, accel.Context(), model=nn.Linear(2, 2), rng=False)
