"""The XLA lane's tests: run by `python3 tools/xla_lane.py` in its torch 2.9 + torch_xla venv.

Anywhere torch_xla is not importable (the main suite's torch 2.13 venv) every test in this
folder is collected and skipped with the reason, so the main suite neither errors nor
silently loses them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SKIP_REASON = ("torch_xla is not installed here; the XLA tests run in their own venv: "
               "python3 tools/xla_lane.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if importlib.util.find_spec("torch_xla") is not None:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in Path(item.fspath).resolve().parents:
            item.add_marker(skip)
