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

# pytest names the running test; torch sets its compiler cache folder once, on first use.
_SET_BY_TOOLS = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR"}


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
    assert not leaked, f"the test left threads running: {[t.name for t in leaked]}"
