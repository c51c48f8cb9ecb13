"""`accel.notebook_launch`: functions defined in a notebook run on 2 real processes.

The notebook tests/data/notebook_launch.ipynb is executed cell by cell through a real
Jupyter kernel (nbclient + ipykernel, the optional extra `notebook`), so its functions
live in the kernel's `__main__`, as a user's do. It trains with DDP on 2 processes and
compares with the same training in the kernel, then launches a function that fails on
rank 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO

from accel.errors import InvalidArgumentTypeError, LaunchEnvironmentError
from accel.runtime.notebook import notebook_launch
from accel.testing import LAUNCH_VARIABLES

NOTEBOOK = REPO / "tests" / "data" / "notebook_launch.ipynb"


def printed(notebook, prefix: str) -> dict:
    """The JSON a cell printed after `prefix` (stdout streams of every code cell)."""
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            for line in output.get("text", "").splitlines():
                if line.startswith(prefix + " "):
                    return json.loads(line[len(prefix) + 1:])
    raise AssertionError(f"no {prefix} line in the notebook's outputs")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    nbclient = pytest.importorskip(
        "nbclient", reason="nbclient is not installed (pip install 'accel[notebook]')")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed "
                        "(pip install 'accel[notebook]')")
    import nbformat

    base = tmp_path_factory.mktemp("notebook")
    # A kernel spec for this interpreter, found first: not whatever "python3" is installed.
    spec = base / "jupyter" / "kernels" / "accel-test"
    spec.mkdir(parents=True)
    spec.joinpath("kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "accel test", "language": "python"}))
    saved = dict(os.environ)
    for name in LAUNCH_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(JUPYTER_PATH=str(base / "jupyter"), IPYTHONDIR=str(base / "ipython"),
                      JUPYTER_RUNTIME_DIR=str(base / "runtime"),
                      PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    try:
        notebook = nbformat.read(NOTEBOOK, as_version=4)
        nbclient.NotebookClient(notebook, kernel_name="accel-test", timeout=240,
                                resources={"metadata": {"path": str(base)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return notebook


@pytest.mark.spawned
def test_a_function_defined_in_the_notebook_trains_on_two_processes(executed):
    run = printed(executed, "RESULT")
    assert run["defined_in"] == "__main__"
    results = run["results"]
    assert [r["rank"] for r in results] == [0, 1]
    assert {r["world_size"] for r in results} == {2}
    # DDP: both ranks hold the same weights, those of one process on the whole batches.
    assert results[0]["weights"] == results[1]["weights"]
    assert results[0]["weights"] == pytest.approx(run["alone"], abs=1e-6)


@pytest.mark.spawned
def test_a_failing_rank_is_named_with_its_error(executed):
    error = printed(executed, "ERROR")
    assert error["first_line"] == "rank 1 of 2 failed:"
    assert error["names_the_cause"]


def test_bad_arguments_are_refused_before_anything_starts():
    with pytest.raises(InvalidArgumentTypeError, match="fn"):
        notebook_launch("train", num_processes=2)
    with pytest.raises(InvalidArgumentTypeError, match="args"):
        notebook_launch(print, args=5, num_processes=2)
    with pytest.raises(InvalidArgumentTypeError, match="num_processes"):
        notebook_launch(print, num_processes="2")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to initialise CUDA")
def test_cuda_initialised_in_the_parent_is_refused_with_the_fix():
    code = ("import torch, accel\ntorch.zeros(1, device='cuda')\n"
            "def f():\n    return 1\n"
            "try:\n    accel.notebook_launch(f, num_processes=2)\n"
            "except accel.errors.AccelError as e:\n    print('REFUSED', type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    refused = f"REFUSED {LaunchEnvironmentError.__name__} CUDA is already initialised"
    assert refused in out.stdout, out.stdout + out.stderr
    assert "restart the kernel" in out.stdout
