"""Launch settings reach the Context at `init` and are the transforms' defaults.

flag > ACCEL_* variable > config file > default, as `accel launch` resolves them, arrive
in `ctx.settings` with their sources; `with_amp`, `shard_model` and `accumulate_grads`
take them when called without `dtype` / `strategy` / `steps`; an explicit argument that
contradicts one wins with a warning naming both.
"""

from __future__ import annotations

import re
import warnings

import attrs
import pytest
import torch
from helpers import accel_cli
from torch import nn

import accel
from accel import launch_settings
from accel.cli import config
from accel.cli.env import effective_settings
from accel.errors import LaunchEnvironmentError
from accel.launch_settings import SettingOverriddenWarning, read_settings
from accel.testing import fake_world
from accel.transforms import settings
from accel.transforms.amp import AutocastForward


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(launch_settings, "_warned", set())


def launched(flags: dict | None = None, shell: dict | None = None,
             config_file: str = "/dev/null") -> dict[str, str]:
    """The variables `accel launch` gives its processes for these flags, shell and file."""
    resolved = settings.resolve_settings(flags or {}, shell or {}, config_file)
    return {**(shell or {}), **settings.training_environment(resolved)}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def overrides(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, SettingOverriddenWarning)]


# ---- the Context after init ----

def test_init_reads_each_setting_with_its_source():
    env = launched({"mixed_precision": "bf16", "grad_accum_steps": 4},
                   {"ACCEL_STRATEGY": "single"})
    ctx = accel.init(env=env)
    assert ctx.precision == "bf16"  # readable right after init, before with_amp
    assert (ctx.settings.mixed_precision, ctx.settings.source("mixed_precision")) == (
        "bf16", "the command line")
    assert (ctx.settings.strategy, ctx.settings.source("strategy")) == (
        "single", "$ACCEL_STRATEGY")
    assert ctx.settings.grad_accum_steps == 4 and ctx.settings.source("debug") == "default"
    shown = repr(ctx)
    assert "precision=bf16" in shown
    assert "settings: strategy=single ($ACCEL_STRATEGY); mixed_precision=bf16, " \
           "grad_accum_steps=4 (the command line); device=-, debug=False (default)" in shown


def test_a_variable_set_outside_the_launcher_is_its_own_source():
    ctx = accel.init(env={"ACCEL_MIXED_PRECISION": "fp16"})
    assert ctx.precision == "fp16"
    assert ctx.settings.source("mixed_precision") == "$ACCEL_MIXED_PRECISION"
    # The launcher's record no longer describes a variable changed since: not trusted.
    env = {**launched({"mixed_precision": "bf16"}), "ACCEL_MIXED_PRECISION": "fp16"}
    assert accel.init(env=env).settings.source("mixed_precision") == "$ACCEL_MIXED_PRECISION"
    assert accel.Context().settings.source("mixed_precision") == "default"


@pytest.mark.parametrize(("env", "message"), [
    ({"ACCEL_MIXED_PRECISION": "fp4"}, "$ACCEL_MIXED_PRECISION sets mixed_precision to 'fp4'"),
    ({"ACCEL_GRAD_ACCUM_STEPS": "0"}, "grad_accum_steps to 0; it must be >= 1"),
    ({"ACCEL_DEBUG": "maybe"}, "$ACCEL_DEBUG='maybe' is not a boolean"),
])
def test_init_refuses_a_bad_setting_naming_its_variable(env, message):
    with pytest.raises(LaunchEnvironmentError, match=re.escape(message)):
        accel.init(env=env)


# ---- the transforms' defaults ----

def test_with_amp_without_a_launch_setting_is_fp32():
    for options in ({}, {"dtype": None}):  # no argument, and dtype=None (argparse's default)
        model, ctx = accel.with_amp(mlp(), accel.Context(), **options)
        assert ctx.precision == "no" and ctx.applied == ("with_amp(no)",)
        assert not isinstance(model.__dict__.get("forward"), AutocastForward)
        assert model(torch.ones(1, 4)).dtype == torch.float32


def test_with_amp_takes_the_launch_precision():
    ctx = accel.init(env=launched({"mixed_precision": "bf16"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, ctx = accel.with_amp(mlp(), ctx)
    assert ctx.applied == ("with_amp(bf16)",) and overrides(caught) == []
    assert model.forward.dtype == torch.bfloat16


def test_an_explicit_dtype_against_the_launch_warns_once_naming_both():
    ctx = accel.init(env=launched({"mixed_precision": "bf16"}))
    with pytest.warns(SettingOverriddenWarning, match=re.escape(
            "with_amp(dtype=...) overrides the launch setting mixed_precision='bf16' (from "
            "the command line) with 'fp16'")):
        _, amp_ctx = accel.with_amp(mlp(), ctx, dtype="fp16")
    assert amp_ctx.precision == "fp16"  # the explicit argument wins
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        accel.with_amp(mlp(), ctx, dtype="fp16")   # the same contradiction: said already
        accel.with_amp(mlp(), ctx, dtype="bf16")   # agrees with the launch
        accel.with_amp(mlp(), accel.Context(), dtype="fp16")  # nothing was configured
    assert overrides(caught) == []


def test_accumulate_grads_takes_the_launch_steps():
    ctx = accel.init(env=launched({"grad_accum_steps": 3}))
    model = mlp()
    optimizer, ctx = accel.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), ctx)
    _, optimizer, accumulated = accel.accumulate_grads(model, optimizer, ctx)
    assert accumulated.grad_accum_steps == 3 and optimizer.accumulation.steps == 3
    model = mlp()
    optimizer, ctx = accel.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                          accel.init(env=launched({"grad_accum_steps": 3})))
    with pytest.warns(SettingOverriddenWarning, match=re.escape(
            "grad_accum_steps=3 (from the command line) with 2")):
        _, _, accumulated = accel.accumulate_grads(model, optimizer, ctx, steps=2)
    assert accumulated.grad_accum_steps == 2


def test_shard_model_takes_the_launch_strategy_and_its_engine_options(tmp_path):
    path = tmp_path / "run.toml"
    config.write_config({"strategy": "fsdp", "fsdp_reshard_after_forward": False}, path)
    launch = read_settings(launched(config_file=str(path)))
    assert launch.fsdp_reshard_after_forward is False  # typed by the launcher
    with fake_world(0, 2) as ctx:
        _, sharded = accel.shard_model(mlp(), attrs.evolve(ctx, settings=launch))
    assert sharded.backend == "fsdp"
    assert sharded.strategy == accel.FSDP(reshard_after_forward=False)
    assert sharded.applied == ("shard_model(fsdp, reshard_after_forward=False)",)
    with fake_world(0, 2) as ctx, pytest.warns(SettingOverriddenWarning, match=re.escape(
            f"strategy='fsdp' (from config file {path}) with 'ddp'")):
        _, sharded = accel.shard_model(mlp(), attrs.evolve(ctx, settings=launch),
                                       strategy="ddp")
    assert sharded.backend == "ddp"


def test_a_launch_precision_that_with_amp_never_applied_is_not_built_for():
    # A script without with_amp: the engine and the loss scaler must not build for fp16
    # while the forward runs in fp32; ctx.precision says what runs, and a warning why.
    ctx = accel.init(env=launched({"mixed_precision": "fp16"}))
    assert ctx.precision == "fp16"
    model = mlp()
    with pytest.warns(SettingOverriddenWarning, match=re.escape(
            "the launch set mixed_precision='fp16' (from the command line), but with_amp was "
            "not applied before wrap_optimizer: the model trains in fp32")):
        optimizer, wrapped = accel.wrap_optimizer(torch.optim.SGD(model.parameters()), ctx)
    assert optimizer.scaler is None and wrapped.precision == "no"
    _, sharded = accel.shard_model(mlp(), ctx)
    assert sharded.precision == "no"
    model, amp_ctx = accel.with_amp(mlp(), ctx)  # applied: kept, and a real loss scaler
    optimizer, amp_ctx = accel.wrap_optimizer(torch.optim.SGD(model.parameters()), amp_ctx)
    assert amp_ctx.precision == "fp16" and optimizer.scaler is not None


def test_engine_options_set_outside_the_launcher_are_converted_at_shard_model():
    launch = read_settings({"ACCEL_STRATEGY": "fsdp", "ACCEL_FSDP_CPU_OFFLOAD": "yes"})
    assert launch.fsdp_cpu_offload == "yes"  # the variable's text until an engine reads it
    assert settings.launch_strategy(launch) == accel.FSDP(cpu_offload=True)
    with pytest.raises(LaunchEnvironmentError, match=re.escape(
            "$ACCEL_FSDP_CPU_OFFLOAD='often' is not a boolean")):
        settings.launch_strategy(read_settings({"ACCEL_STRATEGY": "fsdp",
                                                "ACCEL_FSDP_CPU_OFFLOAD": "often"}))


# ---- accel env, accel config: the engines declare their options ----

def test_env_report_shows_engine_options_with_sources(tmp_path):
    path = tmp_path / "run.toml"
    config.write_config({"strategy": "deepspeed", "deepspeed_stage": 3}, path)
    report = effective_settings({"ACCEL_DEEPSPEED_OFFLOAD_OPTIMIZER": "1"}, str(path))
    assert report["values"]["deepspeed_stage"] == {"value": 3,
                                                   "source": f"config file {path}"}
    assert report["values"]["deepspeed_offload_optimizer"] == {
        "value": True, "source": "$ACCEL_DEEPSPEED_OFFLOAD_OPTIMIZER"}
    assert "fsdp_cpu_offload" not in report["values"]  # an engine that does not run


def test_config_questions_are_the_engines_declarations():
    import io

    out = io.StringIO()
    asker = config.Asker(io.StringIO("\n" * 3).readline, out.write)
    answers = config._engine_questions(asker, "fsdp")
    assert answers == {option.name: option.ask_default for option in accel.FSDP.settings}
    shown = {True: "yes", False: "no"}
    assert out.getvalue() == "".join(f"{option.question} [{shown[option.ask_default]}]: "
                                     for option in accel.FSDP.settings)


# ---- acceptance: real launches of the tutorials ----

def printed_context(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if "Context(rank 0/2" in line)


@pytest.mark.spawned
def test_tutorial_01_runs_as_the_config_file_says(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('strategy = "fsdp"\nmixed_precision = "bf16"\n')
    done = accel_cli("launch", "-n", "2", "--config", str(path),
                     "tutorials/01_first_distributed_run.py", timeout=300)
    assert done.returncode == 0, done.stderr
    context = printed_context(done.stdout)
    assert "backend=fsdp, precision=bf16" in context
    assert f"strategy=fsdp, mixed_precision=bf16 (config file {path})" in context
    assert "applied: with_amp(bf16) -> shard_model(fsdp) -> wrap_optimizer(Adam)" in context
    losses = [float(x) for x in re.findall(r"loss ([\d.]+)", done.stdout)]
    assert len(losses) == 8 and losses[-1] < losses[0] / 2, done.stdout


@pytest.mark.spawned
def test_tutorial_03_runs_fsdp_in_fp16_from_flags():
    done = accel_cli("launch", "-n", "2", "--mixed-precision", "fp16", "--strategy", "fsdp",
                     "tutorials/03_compose_a_pipeline.py", timeout=300)
    assert done.returncode == 0, done.stderr
    context = printed_context(done.stdout)
    assert "backend=fsdp, precision=fp16" in context
    assert "strategy=fsdp, mixed_precision=fp16 (the command line)" in context
    assert "with_amp(fp16) -> shard_model(fsdp) -> wrap_optimizer(Adam)" in context
    assert "accumulate_grads(steps=1)" in context  # no --grad-accum-steps: the default
    losses = [float(x) for x in re.findall(r"loss ([\d.]+)", done.stdout)]
    assert len(losses) == 5 and losses[-1] < losses[0] / 4, done.stdout
