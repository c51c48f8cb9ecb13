"""The XLA backend on PJRT's CPU device: tutorial 02 unchanged, SPMD over 2 virtual devices,
checkpoints between XLA and plain CPU.

Every run is a fresh process: torch_xla reads PJRT_DEVICE / CPU_NUM_DEVICES once, at import,
and SPMD cannot be switched off again in a process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "xla_worker.py"
TUTORIAL = REPO / "tutorials" / "02_custom_training_loop.py"
EPOCH_LINE = re.compile(r"epoch (\d+)\s+loss ([\d.]+)\s+accuracy ([\d.]+)")
# XLA's CPU compiler fuses and reorders fp32 arithmetic differently from eager torch.
LOSS_TOLERANCE = 2e-3
PARAM_TOLERANCE = 1e-5


def run(args: list[str], *, xla_devices: int | None, settings: dict | None = None) -> str:
    """Run `python args` with PJRT's CPU device (xla_devices of them), or without XLA;
    `settings`: ACCEL_* variables, as `accel launch` would pass them."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PJRT_DEVICE", "CPU_NUM_DEVICES", "XLA_USE_SPMD")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **(settings or {}))
    if xla_devices is not None:
        env.update(PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(xla_devices))
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout


def epochs(output: str) -> list[tuple[float, float]]:
    found = [(float(loss), float(acc)) for _, loss, acc in EPOCH_LINE.findall(output)]
    assert len(found) == 4, output
    return found


def test_tutorial_02_runs_unchanged_on_xla_and_matches_cpu_eager():
    on_xla = run([str(TUTORIAL)], xla_devices=1)  # no launch setting: fp32
    eager = run([str(TUTORIAL)], xla_devices=None)
    assert "device=xla:0" in on_xla and "backend=xla" in on_xla
    assert "device=cpu" in eager
    xla_epochs, eager_epochs = epochs(on_xla), epochs(eager)
    assert xla_epochs[-1][0] < xla_epochs[0][0] and xla_epochs[-1][1] > 0.9
    for (xla_loss, xla_acc), (cpu_loss, cpu_acc) in zip(xla_epochs, eager_epochs, strict=True):
        assert abs(xla_loss - cpu_loss) <= LOSS_TOLERANCE
        assert abs(xla_acc - cpu_acc) <= 0.008  # at most 2 of 250 predictions differ


def test_tutorial_02_learns_in_bf16_on_xla():
    output = run([str(TUTORIAL)], xla_devices=1, settings={"ACCEL_MIXED_PRECISION": "bf16"})
    assert "with_amp(bf16)" in output and "device=xla:0" in output
    found = epochs(output)
    assert found[-1][0] < found[0][0] and found[-1][1] > 0.9


def train(mode: str, out: Path, xla_devices: int) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    out.mkdir()
    run([str(WORKER), mode, str(out)], xla_devices=xla_devices)
    return json.loads((out / "report.json").read_text()), load_file(out / "params.safetensors")


def test_spmd_over_two_devices_shards_and_matches_one_device(tmp_path):
    single, single_params = train("replica", tmp_path / "single", xla_devices=1)
    fsdp, fsdp_params = train("fsdp", tmp_path / "fsdp", xla_devices=2)
    data, data_params = train("dp", tmp_path / "dp", xla_devices=2)

    assert set(single["specs"].values()) <= {"", "{replicated}"}
    # FSDP-style: dim 0 of every parameter split over the 2 devices.
    assert fsdp["specs"] == {"0.weight": "{devices=[2,1]0,1}", "0.bias": "{devices=[2]0,1}",
                             "2.weight": "{devices=[2,1]0,1}", "2.bias": "{devices=[2]0,1}"}
    assert set(data["specs"].values()) == {"{replicated}"}
    # distribute_loader shards each batch along its batch dimension over the mesh.
    assert fsdp["batch_spec"] == data["batch_spec"] == "{devices=[2,1]0,1}"
    for report in (single, fsdp, data):
        assert report["losses"][-1] < report["losses"][0]
    for params in (fsdp_params, data_params):
        for name, value in single_params.items():
            assert (params[name] - value).abs().max().item() <= PARAM_TOLERANCE, name

    # Checkpoints: XLA -> safetensors -> plain CPU model, and a CPU state -> XLA, exactly;
    # loading keeps the SPMD sharding; sharded state round-trips through DCP + SPMD planners.
    for report in (single, fsdp, data):
        assert report["to_cpu_equal"] and report["back_equal"]
    assert fsdp["specs_after_load"] == fsdp["specs"]
    assert fsdp["sharded_equal"] and data["sharded_equal"]


def test_init_refuses_several_xla_processes_on_the_cpu_device():
    code = ("import accel, accel.errors as e\n"
            "try:\n    accel.init(device='xla', env={'RANK': '0', 'WORLD_SIZE': '2'})\n"
            "except e.UnsupportedError as exc:\n    print('refused:', exc)\n")
    output = run(["-c", code], xla_devices=1)
    assert "refused:" in output and "SPMD" in output


@pytest.mark.parametrize("strategy", ["fsdp", "mesh"])
def test_bad_mesh_is_refused_with_the_fix(strategy):
    config = ("XLA(fsdp=True, mesh_shape=(2,), axis_names=('data',))" if strategy == "fsdp"
              else "XLA(mesh_shape=(3,))")
    code = ("import torch, accel, accel.errors as e\nfrom accel import XLA\n"
            "ctx = accel.init(device='xla')\n"
            f"try:\n    accel.shard_model(torch.nn.Linear(2, 2), ctx, strategy={config})\n"
            "except e.IncompatibleOptionsError as exc:\n    print('refused:', exc)\n")
    output = run(["-c", code], xla_devices=2)
    assert "refused:" in output
    assert ("fsdp_axis" in output) if strategy == "fsdp" else ("device count" in output)


def test_accel_launch_xla_runs_the_script_in_a_spawned_worker(tmp_path):
    out = tmp_path / "launched"
    out.mkdir()
    # PJRT's CPU device has one device per host: torch_xla spawns one worker.
    output = run(["-m", "accel", "launch", "--xla", str(WORKER), "replica", str(out)],
                 xla_devices=1)
    report = json.loads((out / "report.json").read_text())
    assert report["device"] == "xla:0" and report["losses"][-1] < report["losses"][0], output
    failing = tmp_path / "fails.py"
    failing.write_text("import sys\nsys.exit(3)\n")
    env_run = subprocess.run([sys.executable, "-m", "accel", "launch", "--xla", str(failing)],
                             cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PJRT_DEVICE": "CPU", "PYTHONPATH": str(REPO)})
    assert env_run.returncode == 1 and "exited with 3" in env_run.stderr
