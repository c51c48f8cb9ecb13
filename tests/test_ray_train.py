"""accel inside Ray Train: tutorial 11 on a local Ray cluster of 2 CPU workers (FSDP2,
sharded checkpoints), worker 1 killed (SIGKILL) in step 10 of the first attempt. Ray
restarts the group (FailureConfig(max_failures=1)), `load_state` resumes from the
checkpoint Ray registered, and the final parameters equal those of an uninterrupted run of
the same functions on 2 gloo processes without Ray, bit for bit. Every process Ray started
is gone afterwards. Skips when Ray is not installed (pip install 'accel[ray]').
"""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, full_parameters

import accel
from accel.testing import LAUNCH_VARIABLES, run_world

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install 'accel[ray]')")

TUTORIAL = REPO / "tutorials" / "11_ray_train.py"
STEPS, SAVE_EVERY, FAIL_AT, STRATEGY = 12, 4, 10, "fsdp"


def tutorial():
    spec = importlib.util.spec_from_file_location("tutorial_11_ray_train", TUTORIAL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def uninterrupted(ctx: accel.Context, strategy: str) -> dict:
    """The tutorial's model, loader and step, STEPS times, without Ray or a failure."""
    lesson = tutorial()
    model, optimizer, loader, ctx = lesson.prepare(ctx, strategy)
    step = 0
    while step < STEPS:
        for batch in loader:
            lesson.train_step(model, optimizer, batch, ctx)
            step += 1
            if step == STEPS:
                break
    return full_parameters(accel.unwrap_model(model, ctx))


def ray_processes(marker: str) -> list[int]:
    """Processes started with `marker` (our RAY_TMPDIR) in their environment."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile, or not ours to read
                continue
    return found


def stop_leftovers(marker: str) -> list[int]:
    """Wait a little for Ray's processes to end; kill (by pid) and return any that stay."""
    deadline = time.monotonic() + 15
    while (left := ray_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def start_tutorial(tmp: Path, ray_tmp: str) -> subprocess.Popen:
    """The tutorial's driver, its output into files (a pipe nobody reads while the run
    without Ray goes on would fill and stall it)."""
    # A cluster of our own (not one RAY_ADDRESS names), under token authentication with a
    # token of this run's: without one Ray would write ~/.ray/auth_token.
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARIABLES and k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(PYTHONPATH=str(REPO), RAY_TMPDIR=ray_tmp,
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               # nothing leaves this machine; no spot-preemption watcher actor; on a busy
               # machine starting 2 workers can pass Ray's 60 s, which would count as the
               # one failure allowed
               RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",
               RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="300")
    with (tmp / "stdout").open("w") as out, (tmp / "stderr").open("w") as err:
        return subprocess.Popen(
            [sys.executable, str(TUTORIAL), "--storage", str(tmp / "storage"), "--scratch",
             str(tmp / "scratch"), "--strategy", STRATEGY, "--steps", str(STEPS),
             "--save-every", str(SAVE_EVERY), "--fail-at-step", str(FAIL_AT)],
            stdout=out, stderr=err, env=env, cwd=REPO)


def ray_worker_context(ctx: accel.Context) -> tuple:
    """What from_process_group makes of the variables Ray Train sets on each worker: here
    2 nodes with one worker each (Ray names the node NODE_RANK, not GROUP_RANK)."""
    env = {"RANK": str(ctx.rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1", "NODE_RANK": str(ctx.rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29500"}
    adopted = accel.Context.from_process_group(env=env)
    return adopted.rank, adopted.local_rank, adopted.node_rank, adopted.num_nodes


def without_ray_on_each_rank(ctx: accel.Context) -> tuple:
    return ray_worker_context(ctx), uninterrupted(ctx, STRATEGY)


@pytest.fixture(scope="module")
def without_ray() -> list[tuple]:
    """Each rank's (ray_worker_context, the uninterrupted run's parameters): one world of
    2 processes serves both tests (starting one costs about 8 s on 2 cores)."""
    return run_world(without_ray_on_each_rank, 2)


@needs_ray
@pytest.mark.spawned
@pytest.mark.timeout(900)
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_ray_train_worker_killed_resumes_to_the_uninterrupted_parameters(tmp_path, request):
    # Ray's sockets live under RAY_TMPDIR: a short path keeps them under the 107-byte limit.
    ray_tmp = tempfile.mkdtemp(prefix="accel-ray-")
    run = start_tutorial(tmp_path, ray_tmp)
    try:
        # The run without Ray, while Ray starts: Ray's start-up leaves the CPUs idle
        # between its polls (about 8 s less on 2 cores).
        expected = request.getfixturevalue("without_ray")[0][1]
        run.wait(timeout=600)
    finally:
        if run.poll() is None:  # the run without Ray failed, or Ray hung: end the driver
            run.kill()
            run.wait()
        leftovers = stop_leftovers(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    stdout = (tmp_path / "stdout").read_text()
    output = stdout + (tmp_path / "stderr").read_text()[-4000:]
    assert run.returncode == 0, output
    assert not leftovers, f"Ray left processes running: {leftovers}"
    assert (tmp_path / "scratch" / "failed-once").exists()  # worker 1 did die
    finished = re.search(r"finished at step (\d+), loss [0-9.]+, last attempt resumed "
                         r"from step (\d+)", stdout)
    assert finished, output
    # Round 8's checkpoint registers only if both reports reached Ray before the kill;
    # round 4's always has: a worker's report of round 8 waited for Ray to take round 4's.
    assert int(finished.group(1)) == STEPS and int(finished.group(2)) in (4, 8), output
    final = re.search(r"final checkpoint: (\S+)", stdout).group(1)

    model = tutorial().make_model()  # the sharded checkpoint, loaded whole in one process
    info = accel.load_state(final, accel.Context(), model=model, rng=False)
    assert info.step == STEPS and info.world_size == 2
    resumed = {name: p.detach() for name, p in model.named_parameters()}
    assert resumed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name


@pytest.mark.spawned
def test_from_process_group_reads_rays_node_rank(without_ray):
    assert [node for node, _ in without_ray] == [(0, 0, 0, 2), (1, 0, 1, 2)]
