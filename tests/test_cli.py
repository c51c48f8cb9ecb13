"""The `accel` command line: option resolution in-process, `accel launch` with real processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import REPO, accel_cli

from accel.cli import launch
from accel.cli._worker import NOT_CONNECTED_EXIT_CODE
from accel.cli.env import collect_environment, format_report
from accel.cli.main import main
from accel.errors import LaunchEnvironmentError
from accel.transforms import settings


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


CONNECTED_SCRIPT = """
    import sys
    import torch
    import accel
    from accel.runtime import ops

    ctx = accel.init()
    total = ops.reduce(torch.tensor([ctx.rank + 1.0]), ctx, op="sum")  # an all_reduce
    print(f"rank {ctx.rank} of {ctx.world_size}: sum {total.item():g} args {sys.argv[1:]}")
    accel.shutdown(ctx)
"""


# ---- option layers and the torchrun command line (in-process, no processes) ----

def test_flag_beats_config_file_beats_default():
    options = launch.launch_options(settings.merge_layers(
        ("the command line", {"num_processes": 4, "master_port": None}),
        ("config file", {"num_processes": 2, "master_port": 29600, "max_restarts": 1}),
    ))
    assert (options.num_processes, options.master_port, options.max_restarts) == (4, 29600, 1)
    assert (options.num_nodes, options.node_rank, options.allow_unconnected) == (1, 0, False)


@pytest.mark.parametrize(("values", "message"), [
    ({"num_procs": 2}, "unknown option 'num_procs'; known options: allow_unconnected"),
    ({"num_processes": "2"}, "sets num_processes to '2', but it must be of type int"),
    ({"num_processes": True}, "must be of type int"),
    ({"num_processes": 0}, "num_processes to 0; it must be >= 1"),
    ({"num_nodes": 2, "node_rank": 2, "master_addr": "n0"}, "node_rank 2 is outside the 2"),
    ({"num_nodes": 2}, "needs a meeting point: pass --master-addr"),
])
def test_bad_options_name_the_problem_and_the_source(values, message):
    with pytest.raises(LaunchEnvironmentError, match=re.escape(message)):
        launch.launch_options(settings.merge_layers(("config file 'run.toml'", values)))


def test_config_file_errors(tmp_path):
    with pytest.raises(LaunchEnvironmentError, match="does not exist"):
        settings.load_config(tmp_path / "missing.toml")
    broken = write(tmp_path / "broken.toml", "num_processes = \n")
    with pytest.raises(LaunchEnvironmentError, match="is not valid TOML"):
        settings.load_config(broken)
    assert settings.load_config(write(tmp_path / "ok.toml", "num_processes = 3\n")) == {
        "num_processes": 3}


def test_bad_launch_is_one_line_on_stderr_and_exit_code_2(tmp_path, capsys):
    script = write(tmp_path / "train.py", "")
    config = write(tmp_path / "run.toml", "num_procs = 2\n")
    assert main(["launch", "--config", str(config), str(script)]) == 2
    assert "accel launch: error: config file" in capsys.readouterr().err
    assert main(["launch", str(tmp_path / "typo.py")]) == 2
    assert "typo.py' does not exist; pass a script path" in capsys.readouterr().err


def test_torchrun_arguments_route_the_target_through_the_worker():
    options = launch.LaunchOptions(num_processes=2, master_port=29700)
    argv = launch.torchrun_arguments(options, "pkg.train", ["--lr", "1"], module=True)
    assert argv[:4] == ["--nproc-per-node=2", "--nnodes=1", "--node-rank=0",
                        "--max-restarts=0"]
    assert "--master-port=29700" in argv
    assert argv[-6:] == ["--module", launch.WORKER_MODULE, "-m", "pkg.train", "--lr", "1"]
    unchecked = launch.LaunchOptions(num_processes=2, allow_unconnected=True)
    assert launch.torchrun_arguments(unchecked, "train.py", ["x"])[-2:] == ["train.py", "x"]
    assert launch.WORKER_MODULE not in launch.torchrun_arguments(unchecked, "train.py", [])


def test_worker_sees_the_join_mark_of_its_own_rank_only(tmp_path):
    # A fresh process: this one may have run process groups for other tests, and torch
    # remembers a destroyed group's backend (which has_joined counts as joined).
    (tmp_path / "joined-1").touch()
    probe = (f"from accel.cli._worker import has_joined as h; d = {str(tmp_path)!r}; "
             "print(h(1, 2, d), h(0, 2, d), h(0, 2, None))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert result.stdout.split() == ["True", "False", "False"], result.stderr


# ---- accel env ----

def test_env_report_in_process(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    import torch

    assert report["packages"]["torch"] == torch.__version__
    assert report["launch"]["launcher"] == "torchrun" and report["launch"]["rank"] == 1
    assert report["cpu"]["count"] >= 1 and report["memory_gib"] > 0


def test_env_report_shows_a_broken_launch_environment_instead_of_crashing():
    report = collect_environment({"RANK": "x", "WORLD_SIZE": "2"})
    assert "RANK='x' is not an integer" in report["launch"]["error"]
    assert "RANK='x'" in format_report(report)


@pytest.mark.spawned
def test_env_command_prints_versions_and_launcher():
    slurm = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}
    done = accel_cli("env", extra_env=slurm)
    assert done.returncode == 0, done.stderr
    import torch

    assert re.search(rf"^torch: +{re.escape(torch.__version__)}$", done.stdout, re.M)
    assert re.search(r"^deepspeed: +\S", done.stdout, re.M)
    assert "launcher=slurm" in done.stdout


# ---- accel launch (real processes) ----

@pytest.mark.spawned
def test_launch_connects_the_ranks_and_passes_script_arguments(tmp_path):
    script = write(tmp_path / "connected.py", CONNECTED_SCRIPT)
    # --log is a prefix of several torchrun flags and --max-r of one: both reach the script.
    done = accel_cli("launch", "-n", "2", str(script), "--lr", "0.5", "data dir", "--log",
                     "--max-r", "3")
    assert done.returncode == 0, done.stderr
    for rank in (0, 1):
        assert (f"rank {rank} of 2: sum 3 args ['--lr', '0.5', 'data dir', '--log', "
                "'--max-r', '3']") in done.stdout


@pytest.mark.spawned
def test_ranks_that_never_join_fail_the_launch_unless_allowed(tmp_path):
    script = write(tmp_path / "alone.py", 'print("an unconnected copy")\n')
    done = accel_cli("launch", "-n", "2", str(script))
    assert done.returncode == NOT_CONNECTED_EXIT_CODE
    assert "ran without joining the other 1 rank" in done.stderr
    assert "so 2 independent copies ran; call accel.init()" in done.stderr
    allowed = accel_cli("launch", "-n", "2", "--allow-unconnected", str(script))
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.count("an unconnected copy") == 2


@pytest.mark.spawned
def test_script_using_torch_distributed_directly_counts_as_joined(tmp_path):
    # The common torchrun script: init, work, destroy the group before returning.
    script = write(tmp_path / "plain_torch.py", """
        import torch.distributed as dist
        dist.init_process_group("gloo")
        dist.barrier()
        dist.destroy_process_group()
        print("plain torch done")
    """)
    done = accel_cli("launch", "-n", "2", str(script))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("plain torch done") == 2


@pytest.mark.spawned
def test_module_form_with_config_file_and_flag_override(tmp_path):
    write(tmp_path / "pkg" / "__init__.py", "")
    write(tmp_path / "pkg" / "train.py", CONNECTED_SCRIPT)
    config = write(tmp_path / "run.toml", "num_processes = 2\n")
    from_config = accel_cli("launch", "--config", str(config), "-m", "pkg.train", "a", "-b",
                            pythonpath=(tmp_path,))
    assert from_config.returncode == 0, from_config.stderr
    assert "rank 1 of 2: sum 3 args ['a', '-b']" in from_config.stdout
    overridden = accel_cli("launch", "--config", str(config), "-n", "1", "-m", "pkg.train",
                           pythonpath=(tmp_path,))
    assert overridden.returncode == 0, overridden.stderr
    assert overridden.stdout.strip() == "rank 0 of 1: sum 1 args []"


@pytest.mark.spawned
def test_a_failing_rank_exit_code_is_the_launch_exit_code(tmp_path):
    script = write(tmp_path / "fails.py", """
        import sys
        import accel
        ctx = accel.init()
        accel.shutdown(ctx)
        sys.exit(7 if ctx.rank == 1 else 0)
    """)
    done = accel_cli("launch", "-n", "2", str(script))
    assert done.returncode == 7
    assert "accel launch: rank 1 exited with code 7" in done.stderr


@pytest.mark.spawned
def test_tutorial_01_trains_on_two_processes():
    done = accel_cli("launch", "-n", "2", "tutorials/01_first_distributed_run.py")
    assert done.returncode == 0, done.stderr
    assert "training on 2 process(es)" in done.stdout
    losses = [float(loss) for loss in re.findall(r"^epoch \d+/\d+ +loss ([\d.]+)$",
                                                  done.stdout, re.M)]
    assert len(losses) == 8, done.stdout  # printed by the main process only
    assert losses[-1] < 0.5 * losses[0]
    assert losses == sorted(losses, reverse=True)
