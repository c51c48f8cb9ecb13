"""`accel config`, the settings precedence (flag > env > config file > default), `accel env`."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from helpers import REPO, accel_cli
from hypothesis import given
from hypothesis import strategies as st

from accel.cli import config
from accel.cli.main import main
from accel.errors import IncompatibleOptionsError, LaunchEnvironmentError
from accel.testing import LAUNCH_VARIABLES
from accel.transforms import settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def asker(answers: list[str]) -> tuple[config.Asker, io.StringIO]:
    out = io.StringIO()
    return config.Asker(io.StringIO("".join(a + "\n" for a in answers)).readline,
                        out.write), out


# ---- writing TOML ----

@given(st.text())
def test_any_string_survives_the_toml_writer(value):
    assert tomllib.loads(f"x = {config.toml_value(value)}")["x"] == value


def test_written_file_reads_back_as_the_same_settings(tmp_path):
    values = {"num_processes": 2, "master_addr": 'node "0"', "strategy": "deepspeed",
              "allow_unconnected": True, "deepspeed_stage": 3,
              "deepspeed_offload_params": False}
    path = config.write_config(values, tmp_path / "deep" / "run.toml")
    assert settings.load_config(path) == values
    assert "[deepspeed]\nstage = 3\noffload_params = false\n" in path.read_text()


def test_write_config_refuses_what_launch_would_refuse(tmp_path):
    with pytest.raises(IncompatibleOptionsError, match=r"only apply to strategy 'fsdp'"):
        config.write_config({"strategy": "ddp", "fsdp_cpu_offload": True}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---- the questionnaire (in-process) ----

def test_questionnaire_defaults_bad_answers_and_engine_questions():
    ask, out = asker(["2", "5", "1", "", "node0", "70000", "", "", "zero", "deepspeed",
                      "4", "3", "maybe", "y", "", "bf16", "0", "2", ""])
    values = config.questionnaire(ask, detected_processes=4)
    assert values == {
        "num_nodes": 2, "node_rank": 1, "master_addr": "node0", "master_port": 29500,
        "num_processes": 4, "strategy": "deepspeed", "deepspeed_stage": 3,
        "deepspeed_offload_optimizer": True, "deepspeed_offload_params": False,
        "mixed_precision": "bf16", "grad_accum_steps": 2, "max_restarts": 0,
    }
    transcript = out.getvalue()
    assert "5 is out of range: it must be >= 0 and <= 1" in transcript
    assert "an answer is needed here" in transcript           # the address has no default
    assert "70000 is out of range" in transcript
    assert "'zero' is not one of ddp, deepspeed, fsdp, single, xla" in transcript
    assert "'4' is not one of 1, 2, 3" in transcript
    assert "'maybe' is not yes or no" in transcript
    assert "0 is out of range: it must be >= 1" in transcript  # accumulation steps
    assert "Processes per machine [4]: " in transcript        # the detected default


def test_questionnaire_one_machine_defaults_and_answers_ending_early():
    ask, _ = asker([""] * 6)
    assert config.questionnaire(ask, detected_processes=1) == {
        "num_nodes": 1, "num_processes": 1, "strategy": "single", "mixed_precision": "no",
        "grad_accum_steps": 1, "max_restarts": 0}
    ask, _ = asker(["1", "2", "fsdp"])
    with pytest.raises(LaunchEnvironmentError, match="answers ended before the question "
                       "'FSDP: free gathered"):
        config.questionnaire(ask, detected_processes=1)


def test_default_config_for_the_detected_hardware(tmp_path, capsys):
    path = tmp_path / "default.toml"
    assert main(["config", "--default", "--output", str(path)]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    from accel.cli.launch import default_num_processes

    written = settings.load_config(path)
    nproc = default_num_processes()
    assert written["num_processes"] == nproc
    assert written["strategy"] == ("ddp" if nproc > 1 else "single")


# ---- the precedence table, case by case (in-process) ----

# (flag, environment variable, config file) -> expected value and source; None: not set.
PRECEDENCE_CASES = [
    ((4, 3, 2), 4, "the command line"),
    ((4, None, 2), 4, "the command line"),
    ((4, 3, None), 4, "the command line"),
    ((None, 3, 2), 3, "$ACCEL_NUM_PROCESSES"),
    ((None, 3, None), 3, "$ACCEL_NUM_PROCESSES"),
    ((None, None, 2), 2, "config file"),
    ((None, None, None), None, "default"),
]


def _layers(tmp_path, name, flag, env_value, file_value, env_var):
    path = tmp_path / "run.toml"
    path.write_text("" if file_value is None else f"{name} = {json.dumps(file_value)}\n")
    env = {} if env_value is None else {env_var: str(env_value)}
    return ({} if flag is None else {name: flag}), env, str(path)


@pytest.mark.parametrize(("layers", "expected", "source"), PRECEDENCE_CASES)
def test_precedence_for_num_processes(tmp_path, layers, expected, source):
    flags, env, path = _layers(tmp_path, "num_processes", *layers, "ACCEL_NUM_PROCESSES")
    resolved = settings.resolve_settings(flags, env, path)
    assert resolved["num_processes"] == expected
    assert resolved.sources["num_processes"].startswith(source)


@pytest.mark.parametrize(("layers", "expected", "source"), [
    (tuple(v and {4: "fp8", 3: "fp16", 2: "bf16"}[v] for v in layers),
     expected and {4: "fp8", 3: "fp16", 2: "bf16"}[expected],
     source.replace("NUM_PROCESSES", "MIXED_PRECISION"))
    for layers, expected, source in PRECEDENCE_CASES])
def test_precedence_for_mixed_precision(tmp_path, layers, expected, source):
    flags, env, path = _layers(tmp_path, "mixed_precision", *layers, "ACCEL_MIXED_PRECISION")
    resolved = settings.resolve_settings(flags, env, path)
    assert resolved["mixed_precision"] == (expected or "no")   # the default is "no"
    assert resolved.sources["mixed_precision"].startswith(source)
    # What the launched processes receive, and read back, is the winner.
    passed = settings.training_environment(resolved)
    assert passed["ACCEL_MIXED_PRECISION"] == (expected or "no")
    assert settings.training_settings(passed).mixed_precision == (expected or "no")


def test_which_config_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert settings.find_config_file(None, {}) is None         # no default file yet
    default = tmp_path / ".cache" / "accel" / "config.toml"
    config.write_config({"num_processes": 2}, default)
    assert settings.find_config_file(None, {}) == str(default)
    named = str(tmp_path / "named.toml")
    assert settings.find_config_file(None, {"ACCEL_CONFIG_FILE": named}) == named
    assert settings.find_config_file("flag.toml", {"ACCEL_CONFIG_FILE": named}) == "flag.toml"
    with pytest.raises(LaunchEnvironmentError, match="named.toml' does not exist"):
        settings.resolve_settings({}, {"ACCEL_CONFIG_FILE": named})


@pytest.mark.parametrize(("env", "message"), [
    ({"ACCEL_NUM_PROCESSES": "two"}, "$ACCEL_NUM_PROCESSES='two' is not an integer"),
    ({"ACCEL_MIXED_PRECISION": "fp4"}, "$ACCEL_MIXED_PRECISION sets mixed_precision to "
                                       "'fp4'; choose one of no, fp16, bf16, fp8"),
    ({"ACCEL_DEBUG": "maybe"}, "$ACCEL_DEBUG='maybe' is not a boolean"),
    ({"ACCEL_DEEPSPEED_STAGE": "3"}, "deepspeed_stage ($ACCEL_DEEPSPEED_STAGE) only apply "
                                     "to strategy 'deepspeed', but strategy is None"),
])
def test_bad_environment_values_name_the_variable(env, message):
    with pytest.raises((LaunchEnvironmentError, IncompatibleOptionsError),
                       match=re.escape(message)):
        settings.resolve_settings({}, env, None if "ACCEL_CONFIG_FILE" in env else "/dev/null")


def test_unknown_table_in_config_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[zero]\nstage = 3\n")
    with pytest.raises(LaunchEnvironmentError, match=r"unknown table \[zero\]"):
        settings.load_config(path)


def test_training_settings_build_the_strategy_objects():
    import accel

    deep = settings.training_settings({"ACCEL_STRATEGY": "deepspeed",
                                       "ACCEL_DEEPSPEED_STAGE": "3",
                                       "ACCEL_DEEPSPEED_OFFLOAD_OPTIMIZER": "1"})
    assert deep.strategy_config() == accel.DeepSpeed(stage=3, offload_optimizer=True)
    fsdp = settings.training_settings({"ACCEL_STRATEGY": "fsdp",
                                       "ACCEL_FSDP_CPU_OFFLOAD": "true"})
    assert fsdp.strategy_config() == accel.FSDP(cpu_offload=True)
    assert settings.training_settings({"ACCEL_STRATEGY": "ddp"}).strategy_config() == accel.DDP()
    assert settings.training_settings({}).strategy_config() is None


# ---- show and env report where each value came from ----

def test_config_show_and_env_report_values_with_sources(tmp_path, monkeypatch, capsys):
    path = config.write_config({"num_processes": 2, "mixed_precision": "bf16"},
                               tmp_path / "run.toml")
    monkeypatch.setenv("ACCEL_CONFIG_FILE", str(path))
    monkeypatch.setenv("ACCEL_MIXED_PRECISION", "fp16")
    assert main(["config", "show"]) == 0
    shown = capsys.readouterr().out
    assert f"config file: {path}\n" in shown and 'mixed_precision = "bf16"' in shown
    assert re.search(rf"^num_processes +2 +config file {re.escape(str(path))}$", shown, re.M)
    assert re.search(r"^mixed_precision +fp16 +\$ACCEL_MIXED_PRECISION$", shown, re.M)
    assert re.search(r"^grad_accum_steps +1 +default$", shown, re.M)
    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["settings"]
    assert report["config_file"] == str(path)
    assert report["values"]["num_processes"] == {"value": 2, "source": f"config file {path}"}
    assert report["values"]["mixed_precision"] == {"value": "fp16",
                                                   "source": "$ACCEL_MIXED_PRECISION"}
    assert main(["env"]) == 0
    assert re.search(r"^  mixed_precision: +fp16 \(\$ACCEL_MIXED_PRECISION\)$",
                     capsys.readouterr().out, re.M)


def test_env_report_shows_a_broken_config_instead_of_crashing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCEL_CONFIG_FILE", str(tmp_path / "gone.toml"))
    assert main(["env"]) == 0
    assert "settings:" in capsys.readouterr().out
    assert main(["config", "show"]) == 2
    assert "gone.toml' does not exist" in capsys.readouterr().err


# ---- acceptance: questionnaire on stdin -> file -> accel launch (real processes) ----

def answer_config_questions(answers: str, *args: str) -> subprocess.CompletedProcess:
    """`accel config ARGS` in a fresh process, the answers piped to its stdin."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "accel", "config", *args], input=answers,
                          capture_output=True, text=True, env=env, timeout=120)


PRINTS_SETTINGS = """
    import os
    import accel
    from accel.transforms.settings import training_settings

    ctx = accel.init()
    s = training_settings()
    print(f"rank {ctx.rank}/{ctx.world_size} precision={s.mixed_precision} "
          f"accum={s.grad_accum_steps} strategy={s.strategy_config()!r} "
          f"debug={ctx.debug} env={os.environ['ACCEL_MIXED_PRECISION']}")
    accel.shutdown(ctx)
"""


@pytest.mark.spawned
def test_questionnaire_answers_on_stdin_drive_accel_launch(tmp_path):
    path = tmp_path / "run.toml"
    # machines, processes, strategy, 3 FSDP questions, precision, accumulation, restarts
    answers = "1\n2\nfsdp\n\nyes\n\nbf16\n4\n\n"
    written = answer_config_questions(answers, "--output", str(path))
    assert written.returncode == 0, written.stderr
    assert settings.load_config(path) == {
        "num_nodes": 1, "num_processes": 2, "strategy": "fsdp", "mixed_precision": "bf16",
        "grad_accum_steps": 4, "max_restarts": 0, "fsdp_reshard_after_forward": True,
        "fsdp_cpu_offload": True, "fsdp_activation_checkpointing": False}
    script = tmp_path / "show.py"
    script.write_text(textwrap.dedent(PRINTS_SETTINGS))
    # The file sets 2 processes, bf16, 4 steps; the environment beats the file for the
    # precision, a flag beats both for the accumulation; debug comes from a flag.
    done = accel_cli("launch", "--config", str(path), "--grad-accum-steps", "8", "--debug",
                     str(script), extra_env={"ACCEL_MIXED_PRECISION": "fp16"})
    assert done.returncode == 0, done.stderr
    # The two ranks share one pipe: a report may start mid-line, so find each one.
    lines = sorted(re.findall(r"rank \d/2 .*?env=(?:no|fp16|bf16|fp8)", done.stdout))
    strategy = "FSDP(shard_units=None, reshard_after_forward=True, mixed_precision=None, " \
               "cpu_offload=True, activation_checkpointing=False"
    assert len(lines) == 2, done.stdout
    for rank, line in enumerate(lines):
        assert line.startswith(f"rank {rank}/2 precision=fp16 accum=8 ")
        assert strategy in line
        assert line.endswith("debug=True env=fp16")

