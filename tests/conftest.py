"""Shared fixtures: every test must leave the process as it found it."""

from __future__ import annotations

import os
import threading

import pytest
import torch.distributed as dist

from accel.transforms.settings import CONFIG_FILE_VARIABLE, SETTINGS

# Tests run with accel's defaults, not the developer's: no ACCEL_* settings from the
# shell, and an empty config file instead of ~/.cache/accel/config.toml.
for _setting in SETTINGS:
    os.environ.pop(_setting.env_var, None)
for _name in ("ACCEL_BARRIER_TIMEOUT", "ACCEL_DEBUG", "ACCEL_DEVICE"):  # read by accel.init
    os.environ.pop(_name, None)
os.environ[CONFIG_FILE_VARIABLE] = os.devnull
# Nor the scheduler's: a suite started inside a SLURM allocation, a PyTorchJob pod or an
# MPI job would otherwise detect that world instead of the ones the tests start.
for _name in list(os.environ):
    if _name.startswith(("PET_", "SLURM_", "OMPI_COMM_WORLD_", "PMI_")):
        os.environ.pop(_name)

#: The heavy lane (`python3 tools/dev.py test -m heavy`, run by .ci/run after the main
#: suite): end-to-end runs of a minute or so each, kept out of the main suite so that it
#: stays under 20 minutes on 2 cores. Listed here, in one place, by test id prefix.
HEAVY = (
    "tests/test_checkpoint_engines.py::test_every_engine_loads_every_engines_checkpoint",
    "tests/test_ray_train.py::test_ray_train_worker_killed",
    "tests/test_elastic.py::test_a_lost_node_is_survived",
    "tests/test_tutorials.py::test_08_tensor_parallel_x_fsdp",
    "tests/test_tensor_parallel.py::test_tp2_x_hsdp_2x2_on_eight_ranks",
    "tests/test_load_pretrained_tutorial.py::test_tutorial_09",  # both tutorial 09 runs
    "tests/test_pipeline_tutorial.py::test_10_pipeline",
    "tests/test_load_pretrained_memory.py::test_peak_memory",
    "tests/test_compile.py::test_inductor_compiles_a_block_class_once",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(HEAVY):
            item.add_marker(pytest.mark.heavy)

# pytest names the running test; torch sets its compiler cache folder once, on first use,
# and inductor's C++ wrapper a variable of its own at its first compile.
_SET_BY_TOOLS = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR",
                 "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"}


@pytest.fixture(autouse=True)
def _no_leaks():
    """Fail a test that leaks environment variables, a process group or threads."""
    env_before = dict(os.environ)
    threads_before = {t.ident for t in threading.enumerate()}
    yield
    assert not dist.is_initialized(), "the test left a torch.distributed process group behind"
    changed = {k for k in set(env_before) | set(os.environ)
               if env_before.get(k) != os.environ.get(k) and k not in _SET_BY_TOOLS}
    assert not changed, f"the test changed environment variables {sorted(changed)}"
    leaked = [t for t in threading.enumerate()
              if t.ident not in threads_before and t.is_alive() and not t.daemon]
    for thread in leaked:  # transformers ends its loading pool with shutdown(wait=False)
        thread.join(timeout=2.0)
    leaked = [t for t in leaked if t.is_alive()]
    assert not leaked, f"the test left threads running: {[t.name for t in leaked]}"
