"""`accel test`: a short real run on this machine with the configured settings.

It resolves the settings exactly as `accel launch` does (flags, `ACCEL_*` variables, the
config file), starts that many processes, and on them checks, printing PASS or FAIL
for each: that the processes start and join (`init`), the collectives, one training
step with the configured precision, strategy and accumulation (compared with one
process on the whole batch), and a checkpoint round trip. The exit code is 0 only when
every check passed. The rank-side checks are accel/cli/_selftest_checks.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Any

from accel.cli import aliases, launch
from accel.transforms import settings

CHECKS_MODULE = "accel.cli._selftest_checks"


def add_parser(subparsers: Any) -> None:
    """Register `accel test` on the `accel` command line."""
    parser = subparsers.add_parser(
        "test", help="check this machine and configuration: processes, collectives, a "
                     "training step, a checkpoint (PASS/FAIL per check)",
        description="A short real run with the settings `accel launch` would use (flag > "
                    "ACCEL_<NAME> variable > config file > default): start the processes, "
                    "run collectives, one training step of the configured strategy, "
                    "precision and accumulation, and a checkpoint round trip. Exit code 0 "
                    "when every check passed.",
        epilog=aliases.aliases_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    launch.add_launch_flags(parser)
    parser.add_argument("--dir", metavar="FOLDER", help="where the checkpoint check writes "
                        "(default: a temporary folder; across nodes: a shared folder)")
    parser.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    """`accel test ...`: launch the checks; 0 when all passed."""
    given = launch.command_line_settings(args)
    resolved = launch.resolve(args, given)
    options = launch.launch_options(resolved)
    per_node = options.num_processes or launch.default_num_processes()
    expect_world = per_node * options.num_nodes
    print(f"accel test: {per_node} process(es) per node x {options.num_nodes} node(s); "
          f"settings: {_settings_line(resolved)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="accel-test-") as scratch:
        folder = args.dir or scratch
        code = launch.launch(options, CHECKS_MODULE,
                             ["--expect-world", str(expect_world), "--dir", folder],
                             module=True, training_env=settings.training_environment(resolved))
    verdict = "every check passed" if code == 0 else "FAILED (see the FAIL lines above)"
    print(f"accel test: {verdict}", file=sys.stdout if code == 0 else sys.stderr)
    return code


def _settings_line(resolved: settings.Resolved) -> str:
    shown = ("strategy", "mixed_precision", "grad_accum_steps", "device")
    return ", ".join(f"{name}={resolved[name]} ({resolved.sources[name]})" for name in shown
                     if name in resolved.values) or "defaults"

