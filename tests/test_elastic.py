"""Elastic multi-node for real: two `accel launch` "nodes" on 127.0.0.1, c10d rendezvous.

Node A hosts the rendezvous; node B is killed mid-run (agent and workers, SIGKILL, as a
lost machine), A's workers fail in the next collective, A re-rendezvouses alone and
resumes from the newest checkpoint on half the ranks; then B starts again, A's agent sees
it waiting, restarts its workers, and both finish on the full world. FSDP's sharded state
and the loader's position reshard at each change (4 -> 2 -> 4 ranks). The global batch is
fixed, so the parameters equal an uninterrupted run's up to the order of float sums.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import REPO
from safetensors.torch import load_file
from torch.utils.data import DataLoader, IterableDataset

import accel
from accel.errors import IncompatibleOptionsError
from accel.testing import LAUNCH_VARIABLES, fake_world, free_port

SCRIPT = REPO / "tests" / "elastic_script.py"
STEPS = 10
PER_NODE = 2  # processes per node: FSDP needs a process group, so at least 2 ranks
PHASE_TIMEOUT_S = 120.0


# ---- the loader's position reshards to another world size (one process, fake worlds) ----

def loader_batches(rank: int, world_size: int, state: dict | None = None, *, steps: int,
                   split: bool, dataset=range(48)) -> tuple[list[list[int]], dict]:
    """`steps` batches of rank `rank` (after loading `state`), and its state then."""
    with fake_world(rank, world_size) as ctx:
        loader, _ = accel.distribute_loader(
            DataLoader(dataset, batch_size=8 if split else 2,
                       shuffle=not isinstance(dataset, IterableDataset)), ctx,
            split_batches=split, seed=3)
        if state is not None:
            loader.load_state_dict(state)
        batches = []
        for batch in loader:
            batches.append(batch.tolist())
            if len(batches) == steps:
                break
        return batches, loader.state_dict()


def test_split_batches_resume_at_any_world_size_with_the_next_global_batches():
    whole, _ = loader_batches(0, 1, steps=6, split=True)
    _, state = loader_batches(0, 2, steps=3, split=True)  # 3 global batches done on 2 ranks
    resumed, _ = loader_batches(0, 1, state, steps=3, split=True)
    assert resumed == whole[3:]
    on_four = [loader_batches(r, 4, state, steps=3, split=True)[0] for r in range(4)]
    assert [sum((b[i] for b in on_four), []) for i in range(3)] == whole[3:]


def test_round_robin_batches_reshard_when_the_new_world_divides_what_was_read():
    _, state = loader_batches(0, 2, steps=3, split=False)  # 6 batches read on 2 ranks
    for rank in range(3):
        uninterrupted, _ = loader_batches(rank, 3, steps=4, split=False)
        assert loader_batches(rank, 3, state, steps=2, split=False)[0] == uninterrupted[2:]
    with pytest.raises(IncompatibleOptionsError, match="which 4 ranks cannot share evenly"):
        loader_batches(0, 4, state, steps=1, split=False)


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(48))


def test_an_iterable_loader_does_not_reshard():
    _, state = loader_batches(0, 2, steps=1, split=False, dataset=Stream())
    with pytest.raises(IncompatibleOptionsError, match="only a map-style loader"):
        loader_batches(0, 1, state, steps=1, split=False, dataset=Stream())


# ---- two nodes, one lost and back ----

def node_command(port: int, tmp: Path, *, host: bool) -> list[str]:
    conf = f"is_host={int(host)},last_call_timeout=1"
    return [sys.executable, "-m", "accel", "launch", "-n", str(PER_NODE), "--nnodes", "1:2",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "elastic-test", "--rdzv-conf", conf, "--max-restarts", "3",
            str(SCRIPT), "--ckpt", str(tmp / "ckpt"), "--out", str(tmp / "out.safetensors"),
            "--log", str(tmp / "log.jsonl"), "--steps", str(STEPS),
            "--gates", f"3@{2 * PER_NODE},6@{PER_NODE}", "--gate-dir", str(tmp)]


class Nodes:
    """The `accel launch` processes of the test, each ended with its workers at the end."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.started: dict[str, subprocess.Popen] = {}
        self.env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
        self.env["PYTHONPATH"] = str(REPO)

    def start(self, name: str, command: list[str]) -> None:
        log = open(self.tmp / f"{name}.txt", "w")  # noqa: SIM115 - closed with the process
        self.started[name] = subprocess.Popen(command, env=self.env, cwd=REPO, stdout=log,
                                              stderr=subprocess.STDOUT)

    def kill(self, name: str) -> None:
        """SIGKILL the agent first (it cannot start new workers then), then its workers."""
        process = self.started[name]
        tree = descendants(process.pid)
        for pid in [process.pid, *tree]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()

    def wait(self, name: str, timeout: float) -> int:
        return self.started[name].wait(timeout=timeout)

    def output(self, name: str) -> str:
        return (self.tmp / f"{name}.txt").read_text(errors="replace")[-4000:]

    def close(self) -> None:
        for name, process in self.started.items():
            if process.poll() is None or descendants(process.pid):
                self.kill(name)


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`, from /proc (torchrun's workers have sessions of
    their own, so a process group would not reach them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def events(tmp: Path) -> list[dict]:
    path = tmp / "log.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def wait_for(tmp: Path, nodes: Nodes, what: str, **match) -> None:
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while not any(all(e.get(k) == v for k, v in match.items()) for e in events(tmp)):
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {n}\n{nodes.output(n)}" for n in nodes.started)
            pytest.fail(f"no {what} ({match}) in {PHASE_TIMEOUT_S} s; events "
                        f"{events(tmp)}\n{logs}")
        time.sleep(0.1)


def uninterrupted(tmp: Path) -> dict[str, torch.Tensor]:
    """The same training, one rank, in this process (FSDP over a group of one)."""
    import elastic_script  # tests/ is on sys.path, as for helpers

    import accel

    args = argparse.Namespace(ckpt=None, log=tmp / "reference.jsonl",
                              steps=STEPS, gates="", gate_dir=None)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return elastic_script.train(accel.Context.from_process_group(), args)
    finally:
        dist.destroy_process_group()


@pytest.mark.spawned
@pytest.mark.timeout(480)
def test_a_lost_node_is_survived_and_a_returning_one_joins(tmp_path):
    port = free_port()
    nodes = Nodes(tmp_path)
    started = time.monotonic()
    try:
        nodes.start("a", node_command(port, tmp_path, host=True))
        nodes.start("b", node_command(port, tmp_path, host=False))
        wait_for(tmp_path, nodes, "gate at step 3 on 2 nodes", event="gate", step=3,
                 world=2 * PER_NODE)
        nodes.kill("b")  # a machine lost: its agent and workers gone at once
        (tmp_path / f"go-3-w{2 * PER_NODE}").touch()
        wait_for(tmp_path, nodes, "resume on node A alone", event="start", step=3,
                 world=PER_NODE, saved_by=2 * PER_NODE)
        wait_for(tmp_path, nodes, "gate at step 6 on node A", event="gate", step=6,
                 world=PER_NODE)
        nodes.start("b-again", node_command(port, tmp_path, host=False))
        wait_for(tmp_path, nodes, "resume on both nodes", event="start", step=6,
                 world=2 * PER_NODE, saved_by=PER_NODE)
        for name in ("a", "b-again"):
            assert nodes.wait(name, PHASE_TIMEOUT_S) == 0, nodes.output(name)
        elapsed = time.monotonic() - started
    finally:
        nodes.close()
    assert [e["world"] for e in events(tmp_path) if e["event"] == "start"] == [4, 2, 4]
    steps = [e["step"] for e in events(tmp_path) if e["event"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # each step once: no save was lost
    elastic = load_file(str(tmp_path / "out.safetensors"))
    reference = uninterrupted(tmp_path)
    assert elastic.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(elastic[name], value, rtol=0, atol=1e-5, msg=name)
    starts = [e["time"] for e in events(tmp_path) if e["event"] in ("start", "gate", "done")]
    phases = ", ".join(f"{b - a:.1f}" for a, b in zip(starts, starts[1:], strict=False))
    print(f"kill-and-rejoin cycle: {elapsed:.1f} s; start/gate/done intervals {phases} s")
