"""`accel test`: a short real run on this machine's 2 CPU processes, green with good
settings (the defaults, and FSDP + bf16 + accumulation from a config file), failing
clearly with a broken one."""

from __future__ import annotations

import pytest
import torch
from helpers import accel_cli

CHECKS = ("init", "collectives", "training step", "checkpoint round trip")


def verdicts(stdout: str) -> dict[str, str]:
    """check name -> the PASS/FAIL line rank 0 printed for it."""
    lines = [line for line in stdout.splitlines() if line.startswith(("PASS  ", "FAIL  "))]
    return {line[6:].split(":", 1)[0].split(" (rank")[0]: line for line in lines}


@pytest.mark.spawned
def test_green_on_two_processes_with_the_defaults():
    result = accel_cli("test", "-n", "2", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    seen = verdicts(result.stdout)
    assert sorted(seen) == sorted(CHECKS) and all(v.startswith("PASS") for v in seen.values())
    assert "2 processes on cpu (gloo)" in seen["init"]
    assert "ddp, no, 1 micro-batch(es): equals one process on the whole batch" \
        in seen["training step"]
    assert result.stdout.rstrip().endswith("accel test: every check passed")


@pytest.mark.spawned
def test_green_with_the_strategy_precision_and_accumulation_of_a_config_file(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('num_processes = 2\nstrategy = "fsdp"\nmixed_precision = "bf16"\n'
                      "grad_accum_steps = 2\n")
    result = accel_cli("test", "--config", str(config), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    seen = verdicts(result.stdout)
    assert all(v.startswith("PASS") for v in seen.values()) and len(seen) == len(CHECKS)
    assert "fsdp, bf16, 2 micro-batch(es): equals one process" in seen["training step"]
    assert "strategy=fsdp (config file" in result.stdout


@pytest.mark.spawned
@pytest.mark.skipif(torch.cuda.is_available(), reason="the broken setting is CUDA without CUDA")
def test_a_broken_setting_fails_clearly_and_exits_non_zero():
    result = accel_cli("test", "-n", "2", "--device", "cuda", timeout=300)
    assert result.returncode != 0
    failures = [line for line in result.stderr.splitlines() if line.startswith("FAIL  device")]
    # Each rank says so (the first to fail ends the launch, maybe before the other speaks).
    assert failures, result.stderr
    assert "the configured device 'cuda'" in failures[0]
    assert "cannot hold a tensor" in failures[0]
    assert "PASS" not in result.stdout
    assert "accel test: FAILED" in result.stderr
