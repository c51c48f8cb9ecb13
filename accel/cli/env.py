"""`accel env`: the facts a bug report needs — versions, hardware, launch environment, and
the effective run settings with where each came from."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Mapping
from typing import Any

import attrs

from accel.errors import AccelError, LaunchEnvironmentError
from accel.transforms import settings
from accel.world import detect_world

# Distributions whose versions matter in a report; optional ones may be missing.
PACKAGES = ("torch", "deepspeed", "torch_xla", "torchao", "numpy", "attrs",
            "safetensors")
NOT_INSTALLED = "not installed"


def collect_environment(env: Mapping[str, str], config_path: str | None = None
                        ) -> dict[str, Any]:
    """Versions, platform, CPU, memory, GPUs, the launch world read from `env`, and the
    effective run settings with their sources (`config_path`: the --config flag).

    Package versions come from installed metadata, so optional packages such as
    deepspeed are never imported.

    >>> collect_environment(os.environ)["packages"]["torch"]
    '2.13.0+cpu'
    """
    import accel

    return {
        # accel's own version from the code that runs, which may not be pip-installed.
        "packages": {"accel": accel.__version__,
                     **{name: package_version(name) for name in PACKAGES}},
        "accel_path": os.path.dirname(accel.__file__),
        "python": f"{platform.python_version()} ({platform.python_implementation()}) "
                  f"{sys.executable}",
        "platform": platform.platform(),
        "cpu": {"count": os.cpu_count(), "usable": _usable_cpus(), "model": cpu_model()},
        "memory_gib": memory_gib(),
        "accelerators": accelerators(),
        "launch": launch_world(env),
        "settings": effective_settings(env, config_path),
    }


def package_version(name: str) -> str:
    """The installed version of distribution `name`, or "not installed"."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def _usable_cpus() -> int | None:
    # The CPUs this process may run on (cgroups, taskset), which may be fewer than exist.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib() -> float | None:
    """Total RAM in GiB (/proc/meminfo, else sysconf); None where neither answers."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def accelerators() -> dict[str, Any]:
    """CUDA GPUs (name and memory each) and whether MPS is available, as torch sees them."""
    import torch

    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"name": props.name,
                         "memory_gib": round(props.total_memory / 2**30, 1)})
    return {
        "cuda_build": torch.version.cuda,
        "cuda_gpus": gpus,
        "mps": torch.backends.mps.is_available(),
    }


def launch_world(env: Mapping[str, str]) -> dict[str, Any]:
    """The World detected from `env`, or the detection error (a report must not crash)."""
    try:
        return attrs.asdict(detect_world(env))
    except LaunchEnvironmentError as exc:
        return {"error": str(exc)}


def effective_settings(env: Mapping[str, str], config_path: str | None) -> dict[str, Any]:
    """Each setting's value and source (flag > environment > config file > default), or
    the error that resolving them raised (a report must not crash)."""
    try:
        resolved = settings.resolve_settings({}, env, config_path)
    except AccelError as exc:
        return {"error": str(exc)}
    return {"config_file": resolved.config_file,
            "values": {name: {"value": value, "source": source}
                       for name, value, source in resolved.rows()}}


def _settings_lines(report: Mapping[str, Any]) -> list[tuple[str, Any]]:
    found = report["settings"]
    if "error" in found:
        return [("settings", f"error: {found['error']}")]
    lines = [("config file", found["config_file"] or "none")]
    for name, entry in found["values"].items():
        value = "-" if entry["value"] is None else entry["value"]
        lines.append((f"  {name}", f"{value} ({entry['source']})"))
    return lines


def format_report(report: Mapping[str, Any]) -> str:
    """The report as aligned `name: value` lines, ready to paste into an issue."""
    acc = report["accelerators"]
    gpus = ", ".join(f"{gpu['name']} ({gpu['memory_gib']} GiB)" for gpu in acc["cuda_gpus"])
    cpu = report["cpu"]
    lines = [(name, version) for name, version in report["packages"].items()]
    lines += [
        ("accel path", report["accel_path"]),
        ("python", report["python"]),
        ("platform", report["platform"]),
        ("cpu", f"{cpu['model']}, {cpu['count']} cores ({cpu['usable']} usable)"),
        ("memory", f"{report['memory_gib']} GiB"),
        ("cuda build", acc["cuda_build"] or "none (CPU build)"),
        ("cuda gpus", gpus or "none"),
        ("mps", "available" if acc["mps"] else "not available"),
        ("launch", ", ".join(f"{key}={value}" for key, value in report["launch"].items())),
        *_settings_lines(report),
    ]
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name + ':':<{width + 1}} {value}" for name, value in lines)


def add_parser(subparsers: Any) -> None:
    """Register `accel env` on the `accel` command line."""
    parser = subparsers.add_parser(
        "env", help="print versions, hardware and launch environment (for bug reports)",
        description="Print what a bug report needs: versions, hardware, launch environment.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--config", metavar="FILE", help="config file whose settings to "
                        "show (default: $ACCEL_CONFIG_FILE, else ~/.cache/accel/config.toml)")
    parser.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    """`accel env [--json]`."""
    report = collect_environment(os.environ, args.config)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
