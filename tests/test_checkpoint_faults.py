"""Checkpoints under faults, with real processes, signals and filesystems (no mocks).

SIGKILL at seeded random points during save_state (one process, one rank of two, both
ranks), then an exact resume; two jobs saving into one CheckpointFolder; a full disk
(a 2 MiB tmpfs, as root); files whose headers lie. Ranks are forked from this process,
which has imported torch and the lazily loaded parts already: a world starts in a
fraction of a second instead of seconds.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import accel
from accel.backends import backend_for
from accel.checkpoint import (
    CheckpointFolder,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    load_state,
    save_state,
)
from accel.checkpoint.files import crc32, is_complete
from accel.checkpoint.tree import flatten
from accel.errors import CheckpointSaveError
from accel.testing import free_port

pytestmark = [pytest.mark.spawned, pytest.mark.skipif(
    sys.platform != "linux", reason="forks its ranks and kills them with SIGKILL: Linux only")]

FORK = multiprocessing.get_context("fork") if sys.platform == "linux" else None
# Imported lazily by FSDP and DCP, in seconds: once here, before forking.
WARM = ("torch._dynamo", "torch.distributed.fsdp", "torch.distributed.checkpoint",
        "torch.distributed.checkpoint.state_dict", "accel.backends.fsdp")
KILL_ITERATIONS = 20
MODES = ("one process", "rank 0", "rank 1", "all ranks")


# --------------------------------------------------------------------------- worlds


def start(fn, world_size: int, *args) -> list:
    """Fork `world_size` ranks running `fn(ctx, *args)` (gloo on CPU when more than one)."""
    for name in WARM:
        importlib.import_module(name)
    port = free_port()
    procs = [FORK.Process(target=_rank, args=(fn, rank, world_size, port, args))
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    return procs


def _rank(fn, rank: int, world_size: int, port: int, args: tuple) -> None:
    torch.set_num_threads(1)
    env = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
           "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    # No accel.shutdown: the process ends here, and its closing barrier would have ranks
    # wait on the store of a rank 0 that may already be gone.
    fn(accel.init(device="cpu", env=env, timeout=60), *args)


def wait(procs: list, timeout: float = 60) -> list[int | None]:
    """Join every rank (killing what is left after `timeout`); their exit codes."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    return [proc.exitcode for proc in procs]


def run(fn, world_size: int, *args) -> None:
    codes = wait(start(fn, world_size, *args))
    assert codes == [0] * world_size, f"ranks exited with {codes}"


# --------------------------------------------------------------------------- a training run


def build(ctx):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 96), nn.ReLU(), nn.Linear(96, 5))
    if ctx.is_distributed:
        model, ctx = accel.shard_model(model, ctx, strategy="fsdp")
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=0.01), ctx)
    return model, optimizer, ctx


def train_step(model, optimizer, ctx, step: int) -> None:
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1000 * step + ctx.rank))
    accel.backward(model(x).square().mean(), optimizer, ctx)
    optimizer.step()
    optimizer.zero_grad()


def full_state(model, optimizer, ctx) -> dict[str, torch.Tensor]:
    """Every tensor of the model and optimizer, whole, by key (rank 0; {} elsewhere)."""
    model_state, optimizer_state = backend_for(ctx).get_state_dict(model, optimizer, full=True)
    _, tensors = flatten({"model": model_state, "optimizer": optimizer_state})
    return {key: value.detach().clone() for key, value in tensors.items()}


def where(target: str):
    return CheckpointFolder(target, total_limit=3) if target.endswith("folder") else Path(target)


def resume(target: str, ctx, model, optimizer) -> int:
    try:
        return load_state(where(target), ctx, model=model, optimizer=optimizer, rng=False).step
    except CheckpointNotFoundError:
        return 0


def saver(ctx, target: str, expected: str, ready, seconds) -> None:
    """Resume, train one step, record the state, signal `ready`, save (and time it)."""
    model, optimizer, ctx = build(ctx)
    step = resume(target, ctx, model, optimizer) + 1
    train_step(model, optimizer, ctx, step)
    state = full_state(model, optimizer, ctx)
    record = Path(expected) / f"{step}.safetensors"
    if ctx.is_main_process and not record.exists():  # the same step always has the same state
        save_file(state, str(record) + ".part")
        os.replace(str(record) + ".part", record)
    if ctx.is_main_process:
        ready.set()
    # What a killed peer makes this rank print (gloo's connection errors) is expected.
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    began = time.monotonic()
    save_state(where(target), ctx, model=model, optimizer=optimizer, step=step)
    if ctx.is_main_process:
        seconds.value = time.monotonic() - began


def runner(ctx, target: str | None, until: int, out: str) -> None:
    """Resume from `target` (None: start afresh), train to step `until`, save, write the state."""
    model, optimizer, ctx = build(ctx)
    start_at = resume(target, ctx, model, optimizer) if target else 0
    for step in range(start_at + 1, until + 1):
        train_step(model, optimizer, ctx, step)
    if target:
        save_state(where(target), ctx, model=model, optimizer=optimizer, step=until)
    state = full_state(model, optimizer, ctx)
    if ctx.is_main_process:
        save_file(state, out)


def loaded_state(path: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """Load a checkpoint (either layout) into one fresh process-local setup: step, state."""
    model, optimizer, ctx = build(accel.Context())
    info = load_state(path, ctx, model=model, optimizer=optimizer, rng=False)
    return info.step, full_state(model, optimizer, ctx)


def same(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# --------------------------------------------------------------------------- SIGKILL


def kill(procs: list, mode: str, delay: float) -> None:
    """Kill the ranks of `mode` after `delay` s; then the rest, as a launcher does."""
    time.sleep(delay)
    victims = {"rank 0": procs[:1], "rank 1": procs[1:]}.get(mode, procs)
    for proc in victims:
        os.kill(proc.pid, signal.SIGKILL)
    time.sleep(0.02)
    for proc in procs:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
    wait(procs)


def check_after_kill(target: str, expected: Path, previous: int) -> int:
    """What a killed save left: every complete checkpoint loads and holds a state that was
    saved; none is torn; the newest step did not go back. Returns the newest step."""
    if target.endswith("folder"):
        folder = where(target)
        assert folder.numbered() == folder.checkpoints(), "a torn or empty numbered folder"
        paths = folder.checkpoints()
        assert not previous or paths, "the previous checkpoint was lost"
    else:
        paths = [Path(target)] if previous or is_complete(Path(target)) else []
    newest = previous
    for path in paths:
        step, state = loaded_state(path)
        assert same(state, load_file(expected / f"{step}.safetensors")), (path, step)
        newest = max(newest, step)
    assert newest >= previous
    return newest


def timed_save(target: str, expected: Path, world_size: int, ready, seconds) -> float:
    """Run a whole save; how long it took, seen from here (from `ready` to its end)."""
    seconds.value = 0.0
    procs = start(saver, world_size, target, str(expected), ready, seconds)
    assert ready.wait(60), "the saver did not reach save_state"
    began = time.monotonic()
    while not seconds.value and any(proc.is_alive() for proc in procs):
        time.sleep(0.001)
    took = time.monotonic() - began
    assert wait(procs) == [0] * world_size
    return took


def test_sigkill_at_random_points_of_save_then_exact_resume(tmp_path):
    began = time.monotonic()
    targets = {"one process": str(tmp_path / "ckpt"), "ranks": str(tmp_path / "folder")}
    expected = {name: tmp_path / f"{name} states" for name in targets}  # step -> state
    ready, seconds = FORK.Event(), FORK.Value("d", 0.0)
    duration = {}
    for name, target in targets.items():  # a first, whole save: how long a save takes
        expected[name].mkdir()
        duration[name] = timed_save(target, expected[name], 1 if name == "one process" else 2,
                                    ready, seconds)
    newest = dict.fromkeys(targets, 1)
    chosen = random.Random(20240607)
    for iteration in range(KILL_ITERATIONS):
        mode = MODES[iteration % len(MODES)]
        name = "one process" if mode == "one process" else "ranks"
        ready.clear()
        procs = start(saver, 1 if name == "one process" else 2, targets[name],
                      str(expected[name]), ready, seconds)
        assert ready.wait(60), "the saver did not reach save_state"
        kill(procs, mode, chosen.uniform(0, duration[name]))
        newest[name] = check_after_kill(targets[name], expected[name], newest[name])
    for name, target in targets.items():  # resume from what is left, to a later step
        until, world = newest[name] + 2, 1 if name == "one process" else 2
        run(runner, world, target, until, str(tmp_path / f"{name}-resumed.safetensors"))
        run(runner, world, None, until, str(tmp_path / f"{name}-reference.safetensors"))
        assert same(load_file(tmp_path / f"{name}-resumed.safetensors"),
                    load_file(tmp_path / f"{name}-reference.safetensors")), name
        # The resumed save removed what the killed ones left (their owners are gone).
        assert not list(Path(target).parent.glob(f"{Path(target).name}*.tmp-*"))
        assert not list(Path(target).glob("*.tmp-*"))
    print(f"{KILL_ITERATIONS} kills, newest steps {newest}, save durations "
          f"{ {k: round(v, 3) for k, v in duration.items()} } s, "
          f"{time.monotonic() - began:.1f} s in all")


# --------------------------------------------------------------------------- two writers


class Tag:
    """An extra object naming the job and the save."""

    def __init__(self, job: int = -1, number: int = -1):
        self.job, self.number = job, number

    def state_dict(self):
        return {"job": self.job, "number": self.number}

    def load_state_dict(self, state):
        self.job, self.number = state["job"], state["number"]


def writer(ctx, root: str, job: int, saves: int, log: str, go) -> None:
    """Save `saves` times into the folder at `root`, logging each returned path."""
    model = nn.Linear(16, 16)
    go.wait(30)
    for number in range(saves):
        with torch.no_grad():
            model.weight.fill_(job * 100 + number)
        path = save_state(CheckpointFolder(root, total_limit=3), ctx, model=model, rng=False,
                          tag=Tag(job, number))
        with open(log, "a") as out:
            out.write(json.dumps({"path": str(path), "job": job, "number": number}) + "\n")


def test_two_jobs_saving_into_one_folder(tmp_path):
    root, go = tmp_path / "shared", FORK.Event()
    logs = [tmp_path / f"job{job}.jsonl" for job in (0, 1)]
    procs = [proc for job in (0, 1) for proc in start(writer, 1, str(root), job, 15,
                                                       str(logs[job]), go)]
    go.set()
    assert wait(procs) == [0, 0]
    saves = [json.loads(line) for log in logs for line in log.read_text().splitlines()]
    assert len(saves) == 30
    assert len({save["path"] for save in saves}) == 30, "a number was handed out twice"
    order = "".join(str(save["job"]) for save in sorted(saves, key=lambda save: save["path"]))
    print(f"saves in number order, by job: {order}")
    for save in saves:  # every reported save loads as what that job saved, or was rotated
        path = Path(save["path"])
        if path.exists():
            model, tag = nn.Linear(16, 16), Tag()
            load_state(path, accel.Context(), model=model, rng=False, tag=tag)
            assert (tag.job, tag.number) == (save["job"], save["number"])
            assert torch.all(model.weight == save["job"] * 100 + save["number"])
    folder = CheckpointFolder(root)
    assert folder.numbered() == folder.checkpoints() and len(folder.checkpoints()) == 3
    assert all(any(path.iterdir()) for path in folder.numbered()), "an empty numbered folder"
    assert not list(root.glob("*.tmp-*"))


# --------------------------------------------------------------------------- disk full


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root, as in CI), unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def assert_names_space(error: BaseException, target: Path) -> None:
    message = str(error)
    assert isinstance(error, OSError) and str(target) in message, message
    assert "free and the checkpoint needs about" in message and "MiB" in message, message
    assert "No space left on device" in message, message


def test_disk_full_removes_the_partial_save_and_names_the_space(small_disk):
    ctx = accel.Context()
    small, big = nn.Linear(4, 3), nn.Linear(1000, 1000)  # 4 MB of weights: cannot fit
    path = save_state(small_disk / "ckpt", ctx, model=small, rng=False)
    with pytest.raises(CheckpointSaveError) as failure:
        save_state(path, ctx, model=big, rng=False)
    assert_names_space(failure.value, path)
    assert failure.value.errno == 28
    assert sorted(p.name for p in small_disk.iterdir()) == ["ckpt"]  # nothing partial left
    restored = nn.Linear(4, 3)
    load_state(path, ctx, model=restored, rng=False)  # the previous checkpoint is intact
    assert torch.equal(restored.weight, small.weight)
    folder = CheckpointFolder(small_disk / "run")
    with pytest.raises(CheckpointSaveError):
        save_state(folder, ctx, model=big, rng=False)
    assert list(folder.root.iterdir()) == []


def full_disk_saver(ctx, root: str, out: str) -> None:
    model = nn.Sequential(nn.Linear(600, 600), nn.Linear(600, 600))  # 2.9 MB, sharded
    model, ctx = accel.shard_model(model, ctx, strategy="fsdp")
    try:
        save_state(Path(root) / "ckpt", ctx, model=model, rng=False)
        outcome = "saved"
    except CheckpointSaveError as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    Path(f"{out}{ctx.rank}").write_text(outcome)


def test_disk_full_under_fsdp_fails_on_every_rank(small_disk, tmp_path):
    run(full_disk_saver, 2, str(small_disk), str(tmp_path / "rank"))
    for rank in (0, 1):
        outcome = (tmp_path / f"rank{rank}").read_text()
        assert outcome.startswith("CheckpointSaveError"), outcome
        assert str(small_disk / "ckpt") in outcome and "needs about" in outcome, outcome
    assert list(small_disk.iterdir()) == []


# --------------------------------------------------------------------------- lying headers


def lie_in_header(file: Path) -> None:
    """Make the safetensors `file` claim one tensor is twice its size, and every tensor after
    it is where it was plus that (the data is unchanged)."""
    data = file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    entries = sorted((entry["data_offsets"], key) for key, entry in header.items()
                     if key != "__metadata__")
    name = next(key for _, key in entries if header[key]["shape"])
    begin, end = header[name]["data_offsets"]
    header[name]["shape"][0] *= 2
    for (first, last), key in entries:
        if first >= begin:
            grown = end - begin
            header[key]["data_offsets"] = [first + (grown if key != name else 0), last + grown]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-(len(encoded) + 8) % 8)
    file.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + length:])


def rerecord(checkpoint: Path, name: str) -> None:
    """Make accel.json agree with the file as it is now: only its own header lies."""
    meta_file = checkpoint / "accel.json"
    metadata = json.loads(meta_file.read_text())
    file = checkpoint / name
    metadata["files"][name] = {"bytes": file.stat().st_size, "crc32": crc32(file)}
    meta_file.write_text(json.dumps(metadata))


def edit_record(checkpoint: Path, name: str, field: str, value) -> None:
    meta_file = checkpoint / "accel.json"
    metadata = json.loads(meta_file.read_text())
    metadata["files"][name][field] = value
    meta_file.write_text(json.dumps(metadata))


def sharded_saver(ctx, path: str) -> None:
    model, optimizer, ctx = build(ctx)
    train_step(model, optimizer, ctx, 1)
    save_state(Path(path), ctx, model=model, optimizer=optimizer)


def assert_refused_untouched(path: Path, match: str) -> None:
    model, optimizer, ctx = build(accel.Context())
    train_step(model, optimizer, ctx, 5)
    before = full_state(model, optimizer, ctx)
    with pytest.raises(CorruptCheckpointError, match=match):
        load_state(path, ctx, model=model, optimizer=optimizer, rng=False)
    assert same(full_state(model, optimizer, ctx), before)


def test_lying_records_and_headers_are_refused_before_anything_loads(tmp_path):
    model, optimizer, ctx = build(accel.Context())
    train_step(model, optimizer, ctx, 1)
    originals = {}
    for case in ("size", "crc", "header"):
        originals[case] = save_state(tmp_path / case, ctx, model=model, optimizer=optimizer)
    size = originals["size"] / "optimizer.safetensors"
    edit_record(originals["size"], "optimizer.safetensors", "bytes", size.stat().st_size + 8)
    assert_refused_untouched(originals["size"], f"{size}.*truncated")
    edit_record(originals["crc"], "optimizer.safetensors", "crc32", "00000000")
    assert_refused_untouched(originals["crc"], "optimizer.safetensors.*CRC32")
    lie_in_header(originals["header"] / "optimizer.safetensors")
    rerecord(originals["header"], "optimizer.safetensors")
    assert_refused_untouched(originals["header"], "optimizer.safetensors")
    # Sharded (FSDP, 2 ranks): a shard whose header claims more than its file holds.
    run(sharded_saver, 2, str(tmp_path / "sharded"))
    shard = sorted((tmp_path / "sharded" / "optimizer").glob("*.safetensors"))[-1]
    lie_in_header(shard)
    rerecord(tmp_path / "sharded", str(shard.relative_to(tmp_path / "sharded")))
    assert_refused_untouched(tmp_path / "sharded", shard.name)


def test_a_save_error_speaks_of_space_only_when_space_is_short(tmp_path):
    from accel.checkpoint.save import _save_error

    denied = _save_error(tmp_path / "ckpt", tmp_path / ".tmp-ckpt",
                         "rank 1: PermissionError: [Errno 13] Permission denied", free=10**12,
                         needed=10**6, error=None)
    assert "Permission denied" in str(denied) and "Free space" not in str(denied)
    assert "free and the checkpoint needs" not in str(denied)
    full = _save_error(tmp_path / "ckpt", tmp_path / ".tmp-ckpt",
                       f"rank 0: OSError: [Errno 28] {os.strerror(28)}", free=10**12,
                       needed=10**6, error=None)
    assert "Free space" in str(full) and "free and the checkpoint needs" in str(full)
