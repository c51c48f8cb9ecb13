"""Imports flow downward: core <- engines <- transforms <- services <- cli (docs/architecture.md).

Read from the source with `ast` (every import, also those inside functions), and checked
in fresh interpreters through `sys.modules`.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "accel"

#: layer of each package or top-level module; a module may import its layer and below.
LAYERS = {
    "errors": 1, "world": 1, "mesh": 1, "context": 1, "process_group": 1, "runtime": 1,
    "validation": 1, "launch_settings": 1,
    "backends": 2,
    "transforms": 3, "data": 3,
    "checkpoint": 4, "inference": 4, "tracking": 4,
    "cli": 5, "__main__": 5,
    "testing": 1,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> int | None:
    """The layer of `accel.X...`; None for the package itself (the public face)."""
    parts = name.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else None


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from accel.backends import single` imports the module accel.backends.single
            found |= {f"{node.module}.{alias.name}" for alias in node.names
                      if (ROOT.parent / node.module.replace(".", "/") / alias.name).exists()
                      or (ROOT.parent / node.module.replace(".", "/")
                          / f"{alias.name}.py").exists()}
    return {name for name in found if name == "accel" or name.startswith("accel.")}


SOURCES = sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_top_level_module_has_a_layer():
    names = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in SOURCES}
    assert names - {"__init__"} == set(LAYERS)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_go_to_the_same_layer_or_below(path):
    here = layer_of(module_name(path))
    if here is None:
        return  # accel/__init__.py names every public object, lazily
    upward = [name for name in imported_modules(path)
              if (layer_of(name) or 0) > here]
    assert not upward, f"{module_name(path)} (layer {here}) imports {upward} from above"


def test_the_library_never_imports_the_cli():
    offenders = [module_name(p) for p in SOURCES
                 if layer_of(module_name(p)) not in (None, 5)
                 and any(n.startswith("accel.cli") for n in imported_modules(p))]
    assert offenders == []


def loaded_after(statement: str) -> list[str]:
    code = (f"import sys, json\n{statement}\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('accel', "
            "'torch.distributed.tensor', 'torch.distributed.checkpoint')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT.parent)
    return json.loads(out.stdout)


def test_import_accel_context_loads_the_core_only():
    loaded = loaded_after("import accel.context")
    assert set(loaded) <= {"accel", "accel.context", "accel.errors", "accel.launch_settings",
                           "accel.mesh", "accel.process_group", "accel.validation",
                           "accel.world"}, loaded


def test_import_accel_loads_no_engine_dtensor_dcp_inference_or_tracking():
    loaded = loaded_after("import accel")
    assert loaded == ["accel"], loaded


def test_a_public_name_loads_its_module_on_first_use():
    loaded = loaded_after("import accel\naccel.with_amp")
    assert "accel.transforms.amp" in loaded
    assert not any(name.startswith("accel.backends.") for name in loaded), loaded
