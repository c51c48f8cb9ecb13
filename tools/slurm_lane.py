#!/usr/bin/env python3
"""The SLURM lane: accel under a real one-machine SLURM cluster (slurmctld, slurmd, munged).

    python3 tools/slurm_lane.py [--allow-skip] [--keep] [--python PATH]

Installs Debian's slurm-wlm and munge with apt-get when they are missing (as root; skipped
when already installed), writes a one-node slurm.conf (2 CPUs, process tracking without
cgroups or systemd) into a fresh folder, starts a private munged, slurmctld and slurmd on
free ports, and submits the training script tools/slurm/train.py three ways:

1. tools/slurm/train.sbatch, the guide's script (docs/slurm.md): 2 tasks, `srun accel
   launch`, each task one rank;
2. `srun --ntasks-per-node=1 accel launch -n 2`: one task per node starts its ranks
   through torchrun, with the node count, node index and master address from SLURM;
3. `accel launch` in the batch shell of a 2-task job: -n comes from SLURM.

Each job must print "rank r of 2 connected" for both ranks, and its final parameters must
equal those of `accel launch -n 2` run outside SLURM. The daemons are stopped at the end
(and the folder removed, unless --keep). The jobs run with the dev venv of tools/dev.py
(built if needed), or with the interpreter --python names (accel installed there). When
the packages cannot be installed (not root, no apt-get, no network) the lane prints one
line saying it is SKIPPED and why, and exits 0 only with --allow-skip (3 otherwise), as
tools/xla_lane.py does. Standard library only.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dev import REPO, ensure_venv, venv_python  # noqa: E402  (tools/ is not a package)

PACKAGES = ["slurm-wlm", "munge"]
PROGRAMS = ["munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol",
            "sinfo", "squeue", "scancel"]
SKIPPED_EXIT = 3  # a skip without --allow-skip: distinct from a failure (1)
JOB_TIMEOUT_S = 420  # all jobs together, from their submission
TRAIN = "tools/slurm/train.py"
SBATCH_SCRIPT = "tools/slurm/train.sbatch"
TOLERANCE = 1e-6


def say(message: str) -> None:
    print(f"[slurm-lane] {message}", flush=True)


class LaneSkipped(Exception):
    """SLURM cannot be installed here; the message says why."""


def install() -> None:
    """apt-get install the packages, unless their programs are all there already."""
    missing = [name for name in PROGRAMS if not shutil.which(name)]
    if not missing:
        say("slurm-wlm and munge already installed")
        return
    if os.geteuid() != 0:
        raise LaneSkipped(f"{', '.join(missing)} missing and not root, so apt-get cannot "
                          "install slurm-wlm and munge")
    if not shutil.which("apt-get"):
        raise LaneSkipped(f"{', '.join(missing)} missing and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    started = time.monotonic()
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True,
                                  timeout=600)
        except subprocess.TimeoutExpired:
            raise LaneSkipped(f"{' '.join(command)} took over 600 s") from None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise LaneSkipped(f"{' '.join(command)} failed with exit code "
                              f"{done.returncode}: {' | '.join(tail)}")
    say(f"installed {' '.join(PACKAGES)} in {time.monotonic() - started:.0f} s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """A private one-node SLURM cluster in `root`: its own munge socket, ports and state."""

    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.processes: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
        for name in [n for n in self.env if n.startswith(("SLURM_", "PET_"))]:
            if name != "SLURM_CONF":
                self.env.pop(name)

    def write_config(self) -> None:
        root = self.root
        for sub in ("state", "spool", "log", "munge"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        socket_path = root / "munge" / "munge.socket"
        config = f"""\
ClusterName=accellane
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
# No cgroups and no systemd in a container: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
NodeName={self.host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=lane Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""
        (root / "slurm.conf").write_text(config)
        self.munge_socket = socket_path

    def start(self) -> None:
        root = self.root
        key = root / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True,
                       capture_output=True)
        key.chmod(0o600)
        # --force: munged refuses root and a non-standard setup without it.
        self._spawn(["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                     f"--key-file={key}", f"--pid-file={root}/munge/munged.pid",
                     f"--log-file={root}/log/munged.log",
                     f"--seed-file={root}/munge/munged.seed"])
        self._wait_for(lambda: self.munge_socket.exists(), "munged's socket", 20)
        self._spawn(["slurmctld", "-D", "-i"])
        self._spawn(["slurmd", "-D"])
        self._wait_for(self._node_idle, "the node to be idle", 60)

    def _spawn(self, command: list[str]) -> None:
        log = open(self.root / "log" / f"{command[0]}.stdout", "w")  # noqa: SIM115
        self.processes.append(subprocess.Popen(command, env=self.env, stdout=log,
                                               stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def _node_idle(self) -> bool:
        done = self.run(["sinfo", "-h", "-o", "%t"], check=False)
        return done.stdout.strip() == "idle"

    def _wait_for(self, condition, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[0]} exited with code "
                                       f"{process.returncode} while waiting for {what}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"waited {timeout} s for {what}")
            time.sleep(0.5)

    def run(self, command: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(command, env={**self.env, **kwargs.pop("env", {})}, check=check,
                              capture_output=True, text=True, timeout=60, **kwargs)

    def stop(self) -> None:
        """Cancel what is left, then end the daemons (SIGTERM, SIGKILL after 10 s)."""
        if self.processes:
            self.run(["scancel", "--full", "--partition=lane"], check=False)
            # slurmd's job steps (slurmstepd) end with their jobs: let them, then stop it
            deadline = time.monotonic() + 30
            while self.run(["squeue", "-h"], check=False).stdout.strip():
                if time.monotonic() > deadline:
                    say("jobs still listed after 30 s; stopping the daemons anyway")
                    break
                time.sleep(0.5)
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    def log_tails(self) -> str:
        lines = []
        for log in sorted((self.root / "log").glob("*")):
            lines += [f"--- {log.name}", *log.read_text(errors="replace").splitlines()[-8:]]
        return "\n".join(lines)


def submit(cluster: Cluster, out_dir: Path, name: str, sbatch_args: list[str],
           venv_bin: Path) -> str:
    """Submit one job; returns its id. The job runs in the checkout, with the dev venv."""
    env = {"PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = cluster.run(["sbatch", "--parsable", f"--job-name={name}", f"--chdir={REPO}",
                        f"--output={out_dir}/{name}.out", *sbatch_args], env=env)
    return done.stdout.strip().split(";")[0]


def job_state(cluster: Cluster, job_id: str) -> str:
    done = cluster.run(["scontrol", "show", "job", "-o", job_id], check=False)
    for field in done.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "UNKNOWN"


def wait_for_jobs(cluster: Cluster, jobs: dict[str, str], started: float) -> dict[str, str]:
    """Each job's final state, polled until all end or JOB_TIMEOUT_S after `started`."""
    deadline = started + JOB_TIMEOUT_S
    states: dict[str, str] = {}
    while len(states) < len(jobs):
        for name, job_id in jobs.items():
            state = job_state(cluster, job_id)
            if name not in states and state not in ("PENDING", "RUNNING", "CONFIGURING",
                                                    "COMPLETING", "UNKNOWN"):
                states[name] = state
                say(f"job {job_id} ({name}): {state}, {time.monotonic() - started:.1f} s "
                    "after submission")
        if time.monotonic() > deadline:
            for name, job_id in jobs.items():
                states.setdefault(name, f"TIMEOUT after {JOB_TIMEOUT_S} s")
                cluster.run(["scancel", job_id], check=False)
            break
        time.sleep(1)
    return states


def same_parameters(left: Path, right: Path) -> str:
    """'' when the two JSON parameter files agree within TOLERANCE, else what differs."""
    a, b = json.loads(left.read_text()), json.loads(right.read_text())
    if a.keys() != b.keys():
        return f"different parameter names: {sorted(a)} vs {sorted(b)}"
    for name in a:
        worst = max((abs(x - y) for x, y in zip(a[name], b[name], strict=True)), default=0.0)
        if worst > TOLERANCE:
            return f"{name} differs by {worst:.3g}"
    return ""


def check_job(name: str, state: str, out_dir: Path, reference: Path) -> list[str]:
    log = out_dir / f"{name}.out"
    text = log.read_text(errors="replace") if log.exists() else ""
    problems = [] if state == "COMPLETED" else [f"ended {state}"]
    connected = [f"rank {r} of 2 connected" in text for r in range(2)]
    if not all(connected):
        problems.append(f"not every rank connected ({connected})")
    params = out_dir / f"{name}.json"
    if not params.exists():
        problems.append("wrote no parameters")
    elif difference := same_parameters(params, reference):
        problems.append(f"parameters differ from torchrun's: {difference}")
    if problems:
        say(f"{name} FAILED: {'; '.join(problems)}; its output:\n{text[-3000:]}")
    else:
        say(f"{name}: 2 ranks connected, parameters equal torchrun's")
    return problems


def reference_run(python: Path, out_dir: Path, env: dict[str, str]) -> Path:
    """Plain torchrun with 2 processes outside SLURM: what every job must reproduce."""
    out = out_dir / "torchrun.json"
    done = subprocess.run([str(python), "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", TRAIN, "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"the torchrun reference run failed ({done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    return out


def run_lane(root: Path, python: Path) -> int:
    out_dir = root / "out"
    out_dir.mkdir()
    cluster = Cluster(root)
    cluster.write_config()
    started = time.monotonic()
    try:
        cluster.start()
        say(f"munged, slurmctld and slurmd up in {time.monotonic() - started:.1f} s "
            f"(node {cluster.host}, 2 CPUs)")
        bin_dir = python.parent
        submitted = time.monotonic()
        jobs = {
            "sbatch-script": submit(cluster, out_dir, "sbatch-script", [
                SBATCH_SCRIPT, TRAIN, "--out", f"{out_dir}/sbatch-script.json"], bin_dir),
            "srun-per-node": submit(cluster, out_dir, "srun-per-node", [
                "--ntasks=1", "--cpus-per-task=2", "--wrap",
                f"srun accel launch -n 2 {TRAIN} --out {out_dir}/srun-per-node.json"], bin_dir),
            "batch-shell": submit(cluster, out_dir, "batch-shell", [
                "--ntasks=2", "--wrap",
                f"accel launch {TRAIN} --out {out_dir}/batch-shell.json"], bin_dir),
        }
        say(f"submitted {', '.join(f'{n} ({j})' for n, j in jobs.items())}")
        reference = reference_run(python, out_dir, cluster.env)  # while the jobs queue
        states = wait_for_jobs(cluster, jobs, submitted)
        problems = [p for name in jobs
                    for p in check_job(name, states[name], out_dir, reference)]
        if problems:
            say("daemon logs:\n" + cluster.log_tails())
        return 1 if problems else 0
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        say(f"FAILED: {exc}")
        say("daemon logs:\n" + cluster.log_tails())
        return 1
    finally:
        cluster.stop()
        say("daemons stopped")


def main(argv: list[str]) -> int:
    allow_skip = "--allow-skip" in argv
    keep = "--keep" in argv
    given = argv[argv.index("--python") + 1] if "--python" in argv[:-1] else None
    started = time.monotonic()
    try:
        install()
    except LaneSkipped as exc:
        verdict = ("allowed by --allow-skip" if allow_skip
                   else "failing (pass --allow-skip to accept)")
        say(f"SLURM lane SKIPPED: {exc} [{verdict}]")
        return 0 if allow_skip else SKIPPED_EXIT
    python = Path(given) if given else venv_python(ensure_venv())
    root = Path(tempfile.mkdtemp(prefix="accel-slurm-lane-"))
    try:
        code = run_lane(root, python)
    finally:
        if keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    say(f"total {time.monotonic() - started:.1f} s, exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
