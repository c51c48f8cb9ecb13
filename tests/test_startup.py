"""A fast start: `import accel`, `accel.init()` and `accel launch` load only what they use.

Checked by `sys.modules` in fresh processes, never by time (bench/startup.py measures
the time). Engines, DTensor, checkpointing, inference, tracking and the libraries behind
them (transformers, deepspeed, safetensors, ...) load on first use.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, accel_cli

#: what neither `import accel` nor a plain `accel.init()` may load.
HEAVY = ("torch.distributed.tensor", "torch.distributed.checkpoint", "torch.distributed.fsdp",
         "torch.distributed.pipelining", "torch._dynamo", "torch._inductor", "deepspeed",
         "transformers", "safetensors", "torchao", "mlflow", "wandb", "tensorboard",
         "accel.checkpoint", "accel.inference", "accel.tracking", "accel.backends",
         "accel.transforms", "accel.data", "accel.runtime.notebook")
#: accel's modules that `init` needs: the core layer.
CORE = {"accel", "accel.context", "accel.errors", "accel.launch_settings", "accel.mesh",
        "accel.process_group", "accel.validation", "accel.world"}


def report_script(folder) -> str:
    """Code defining `report(label)`: what is loaded, written to `folder`/`label`.json (one
    file per report: two ranks' lines of several KB interleave on a shared stdout pipe)."""
    return f"""
import json, sys, pathlib
HEAVY = {HEAVY!r}
def loaded(prefixes):
    return sorted({{p for p in prefixes for m in sys.modules if m == p or m.startswith(p + ".")}})
def report(label):
    seen = {{"heavy": loaded(HEAVY), "torch": "torch" in sys.modules,
             "accel": sorted(m for m in sys.modules if m.startswith("accel"))}}
    pathlib.Path({str(folder)!r}, label + ".json").write_text(json.dumps(seen))
"""

INIT_SCRIPT = """
import accel
report("IMPORT")
ctx = accel.init()
report(f"INIT{ctx.rank}")
accel.shutdown(ctx)
"""


def reports(folder) -> dict[str, dict]:
    return {file.stem: json.loads(file.read_text()) for file in folder.glob("*.json")}


def test_import_accel_loads_neither_torch_nor_any_module_of_accel(tmp_path):
    subprocess.run([sys.executable, "-c", report_script(tmp_path) + "import accel\n"
                    "report('IMPORT')"], capture_output=True, text=True, cwd=REPO, check=True)
    seen = reports(tmp_path)["IMPORT"]
    assert seen == {"heavy": [], "torch": False, "accel": ["accel"]}


def test_init_alone_loads_the_core_and_nothing_heavy(tmp_path):
    subprocess.run([sys.executable, "-c", report_script(tmp_path) + INIT_SCRIPT],
                   capture_output=True, text=True, cwd=REPO, check=True)
    seen = reports(tmp_path)["INIT0"]
    assert seen["heavy"] == [], seen
    assert set(seen["accel"]) <= CORE, seen["accel"]


@pytest.mark.spawned
def test_a_launched_worker_loads_what_init_needs_and_nothing_heavy(tmp_path):
    script = tmp_path / "trivial.py"
    script.write_text(report_script(tmp_path) + INIT_SCRIPT)
    result = accel_cli("launch", "-n", "2", str(script))
    assert result.returncode == 0, result.stderr
    seen = reports(tmp_path)
    for rank in (0, 1):
        assert seen[f"INIT{rank}"]["heavy"] == [], seen
        # the worker entry (accel.cli._worker) runs the script; nothing else of the CLI
        assert set(seen[f"INIT{rank}"]["accel"]) <= CORE | {"accel.cli", "accel.cli._worker"}


@pytest.mark.spawned
def test_the_launcher_loads_no_other_command(tmp_path):
    script = tmp_path / "trivial.py"
    script.write_text("import accel\naccel.shutdown(accel.init())\n")
    code = report_script(tmp_path) + (
        f"from accel.cli.main import main\ncode = main(['launch', '-n', '1', "
        f"{str(script)!r}])\nreport('LAUNCHER')\nsys.exit(code)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=180)
    assert out.returncode == 0, out.stderr
    seen = reports(tmp_path)["LAUNCHER"]
    services = ("accel.checkpoint", "accel.inference", "accel.tracking",
                "torch.distributed.tensor", "transformers", "safetensors")
    assert not [m for m in seen["heavy"] if m.startswith(services)], seen
    assert "accel.cli.estimate" not in seen["accel"] and "accel.cli.merge" not in seen["accel"]
