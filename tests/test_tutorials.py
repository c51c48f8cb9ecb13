"""Every tutorial runs as documented, on 2 real processes (01 is covered in test_cli)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
from helpers import REPO, accel_cli


def numbers_after(word: str, text: str) -> list[float]:
    return [float(match) for match in re.findall(rf"{word} ([0-9.]+)", text)]


def test_02_custom_loop_on_two_processes_learns():
    result = accel_cli("launch", "-n", "2", "--mixed-precision", "bf16",
                       "--grad-accum-steps", "2", "tutorials/02_custom_training_loop.py")
    assert result.returncode == 0, result.stderr
    accuracy = numbers_after("accuracy", result.stdout)
    assert len(accuracy) == 4 and accuracy[-1] > 0.8, result.stdout
    assert "(250 samples)" in result.stdout  # every evaluation sample exactly once
    assert "backend=ddp" in result.stdout and "precision=bf16" in result.stdout
    assert "accumulate_grads(steps=2)" in result.stdout


def test_02_same_loop_on_fsdp_changes_only_the_strategy():
    result = accel_cli("launch", "-n", "2", "--strategy", "fsdp", "--mixed-precision", "bf16",
                       "--grad-accum-steps", "2", "tutorials/02_custom_training_loop.py")
    assert result.returncode == 0, result.stderr
    assert "shard_model(fsdp)" in result.stdout and "precision=bf16" in result.stdout
    accuracy = numbers_after("accuracy", result.stdout)
    assert len(accuracy) == 4 and accuracy[-1] > 0.8, result.stdout
    assert "(250 samples)" in result.stdout


def test_02_same_loop_on_deepspeed_changes_only_the_strategy():
    if importlib.util.find_spec("deepspeed") is None:  # importing it sets variables
        pytest.skip("deepspeed is not installed (pip install 'accel[deepspeed]')")
    result = accel_cli("launch", "-n", "2", "--strategy", "deepspeed", "--mixed-precision",
                       "bf16", "--grad-accum-steps", "2", "tutorials/02_custom_training_loop.py",
                       "--epochs", "2")
    assert result.returncode == 0, result.stderr
    assert "shard_model(deepspeed)" in result.stdout and "precision=bf16" in result.stdout
    accuracy = numbers_after("accuracy", result.stdout)
    assert len(accuracy) == 2 and accuracy[-1] > 0.8, result.stdout
    assert "(250 samples)" in result.stdout


def test_02_same_loop_one_process_fp16_accumulation():
    result = accel_cli("launch", "-n", "1", "--mixed-precision", "fp16", "--grad-accum-steps",
                       "4", "tutorials/02_custom_training_loop.py", "--epochs", "2")
    assert result.returncode == 0, result.stderr
    assert "backend=single" in result.stdout and "grad_accum_steps=4" in result.stdout
    assert numbers_after("accuracy", result.stdout)[-1] > 0.7, result.stdout


def test_03_compose_shows_its_trail_and_learns():
    result = accel_cli("launch", "-n", "2", "--mixed-precision", "bf16", "--grad-accum-steps",
                       "2", "tutorials/03_compose_a_pipeline.py")
    assert result.returncode == 0, result.stderr
    assert ("with_amp(bf16) -> shard_model(ddp) -> wrap_optimizer(Adam) -> "
            "distribute_loader(seed=0) -> accumulate_grads(steps=2)") in result.stdout
    losses = numbers_after("loss", result.stdout)
    assert len(losses) == 5 and losses[-1] < losses[0] / 4, result.stdout


def test_04_borrowed_functions_in_a_foreign_loop():
    result = accel_cli("launch", "-n", "2", "tutorials/04_one_transform_in_an_existing_loop.py")
    assert result.returncode == 0, result.stderr
    assert "evaluated 301 samples (the dataset has 301)" in result.stdout
    assert numbers_after("accuracy", result.stdout)[0] > 0.6


def test_05_the_tutorials_own_tests_pass():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tutorials/05_unit_testing_a_transform.py"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed" in result.stdout


def test_08_tensor_parallel_x_fsdp_resumes_on_fsdp4_and_exports(tmp_path):
    first = accel_cli("launch", "-n", "4", "tutorials/08_tensor_parallel_llama.py", "--dir",
                      str(tmp_path), "--mesh", "tp2xfsdp2", "--steps", "3", timeout=300)
    assert first.returncode == 0, first.stderr
    assert "tensor_parallel(tp=2, sequence_parallel) -> shard_model(fsdp)" in first.stdout
    second = accel_cli("launch", "-n", "4", "tutorials/08_tensor_parallel_llama.py", "--dir",
                       str(tmp_path), "--mesh", "fsdp4", "--steps", "5", timeout=300)
    assert second.returncode == 0, second.stderr
    assert "resumed step 3 on mesh dp_shard=4" in second.stdout
    losses = numbers_after("loss", first.stdout + second.stdout)
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.5, losses
    assert "from_pretrained: 90432 parameters" in second.stdout
