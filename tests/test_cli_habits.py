"""What users bring from torchrun and Accelerate: their flags, and commands that print only
what they promise (`accel estimate-memory`), tutorial 05 under `accel launch`."""

from __future__ import annotations

import json
import textwrap

import pytest
from helpers import REPO, accel_cli

from accel.cli import launch
from accel.cli.main import build_parser, main
from accel.errors import IncompatibleOptionsError, LaunchEnvironmentError


def resolved_options(*flags: str) -> launch.LaunchOptions:
    """The launch options `accel launch FLAGS script.py` would use (no processes)."""
    args = build_parser("launch").parse_args(["launch", *flags, "script.py"])
    return launch.launch_options(launch.resolve(args, launch.command_line_settings(args)))


def training_values(*flags: str) -> dict:
    args = build_parser("launch").parse_args(["launch", *flags, "script.py"])
    return launch.command_line_settings(args)


@pytest.mark.parametrize("flag", ["-n", "--num-processes", "--nproc_per_node",
                                  "--nproc-per-node", "--num_processes"])
def test_every_spelling_of_the_process_count(flag):
    assert resolved_options(flag, "3").num_processes == 3


def test_accelerate_machine_flags_mean_what_they_mean_there():
    options = resolved_options("--num_processes", "8", "--num_machines", "2", "--machine_rank",
                               "1", "--main_process_ip", "node0", "--main_process_port",
                               "29600")
    # Accelerate's --num_processes counts all machines: 4 per machine on 2.
    assert (options.num_processes, options.num_nodes, options.node_rank) == (4, 2, 1)
    assert (options.master_addr, options.master_port) == ("node0", 29600)


def test_torchrun_spellings_of_the_rest():
    options = resolved_options("--nproc_per_node", "2", "--nnodes", "2", "--node_rank", "1",
                               "--master_addr", "n0", "--master_port", "29700",
                               "--max_restarts", "2", "--rdzv_id", "job")
    assert (options.num_processes, options.num_nodes, options.node_rank) == (2, 2, 1)
    assert (options.master_addr, options.master_port, options.max_restarts,
            options.rdzv_id) == ("n0", 29700, 2, "job")


def test_training_setting_aliases():
    values = training_values("--mixed_precision", "bf16", "--gradient_accumulation_steps", "4")
    assert (values["mixed_precision"], values["grad_accum_steps"]) == ("bf16", 4)


def test_a_total_that_does_not_fit_the_machines_is_refused():
    with pytest.raises(IncompatibleOptionsError, match="disagree over 2 machine"):
        resolved_options("--num_processes", "8", "-n", "2", "--num_machines", "2",
                         "--main_process_ip", "n0")
    with pytest.raises(LaunchEnvironmentError, match="multiple of the number of machines"):
        resolved_options("--num_processes", "3", "--num_machines", "2",
                         "--main_process_ip", "n0")


@pytest.mark.parametrize(("typed", "nearest"), [
    ("--num_procs", "--num_processes"), ("--mixed-precison", "--mixed-precision"),
    ("--master-adress", "--master-addr"), ("--grad_acum_steps", "--grad_accum_steps"),
])
def test_an_unknown_flag_is_refused_with_the_nearest_one(typed, nearest, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["launch", typed, "2", "train.py"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert f"unrecognized arguments: {typed}" in error
    assert f"did you mean {nearest}?" in error


def test_help_documents_the_aliases(capsys):
    with pytest.raises(SystemExit):
        main(["launch", "--help"])
    text = capsys.readouterr().out
    for alias in ("--nproc_per_node", "--num_machines", "--main_process_ip", "--multi_gpu",
                  "--mixed_precision", "--machine_rank", "--main_process_port"):
        assert alias in text


@pytest.mark.spawned
def test_a_launch_typed_the_accelerate_way_runs(tmp_path):
    script = tmp_path / "show.py"
    script.write_text(textwrap.dedent("""
        import json
        import accel
        ctx = accel.init()
        if ctx.is_main_process:
            print("SEEN", json.dumps({"world": ctx.world_size,
                                      "precision": accel.training_settings().mixed_precision}))
        accel.shutdown(ctx)
    """))
    result = accel_cli("launch", "--multi_gpu", "--num_processes", "2", "--mixed_precision",
                       "bf16", str(script))
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("SEEN ")]
    assert json.loads(line[5:]) == {"world": 2, "precision": "bf16"}
    assert "--multi_gpu has no effect" in result.stderr


def test_estimate_memory_prints_only_its_table(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 4,
        "vocab_size": 1000}))
    result = accel_cli("estimate-memory", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no torchao, pytree or transformers warnings
    lines = result.stdout.splitlines()
    assert lines[0].startswith("LlamaModel: 146,240 parameters")
    assert lines[1].split() == ["dtype", "total", "size", "largest", "layer", "training",
                                "with", "Adam"]


@pytest.mark.spawned
def test_tutorial_05_under_launch_applies_its_transform_on_the_launched_ranks():
    result = accel_cli("launch", "-n", "2", "tutorials/05_unit_testing_a_transform.py")
    assert result.returncode == 0, result.stderr
    assert "scale_lr_with_world on 2 launched processes: lr 0.2 on every rank" in result.stdout
    assert (REPO / "tutorials" / "05_unit_testing_a_transform.py").read_text().count(
        "accel launch -n 2 tutorials/05_unit_testing_a_transform.py") == 1
