"""`accel launch`: start the processes of a run through torch's elastic launcher (torchrun).

accel does not manage processes itself: it resolves its options (command line > ACCEL_*
variable > config file > defaults, see accel.transforms.settings), turns them into
`torch.distributed.run` arguments, and runs the user's script through `accel.cli._worker`,
which fails a rank that never joined the others.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from accel.errors import LaunchEnvironmentError
from accel.transforms import settings

WORKER_MODULE = "accel.cli._worker"


@attrs.frozen
class LaunchOptions:
    """How many processes to start where; every field is also a config-file key."""

    #: processes per node; None: one per GPU when CUDA is available, else 1.
    num_processes: int | None = None
    num_nodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_backend: str | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    max_restarts: int = 0
    allow_unconnected: bool = False


# The launch options among all settings (accel.transforms.settings); the rest go to the script.
_OPTION_NAMES = tuple(field.name for field in attrs.fields(LaunchOptions))

def launch_options(resolved: settings.Resolved) -> LaunchOptions:
    """The LaunchOptions part of resolved settings."""
    return LaunchOptions(**{name: resolved[name] for name in _OPTION_NAMES})


def default_num_processes() -> int:
    """One process per visible GPU when CUDA is available, else one."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def torchrun_arguments(
    options: LaunchOptions, target: str, args: list[str], *, module: bool = False
) -> list[str]:
    """The `torch.distributed.run` command line that runs `target args` as `options` say.

    Unless `allow_unconnected`, the target runs through accel's worker entry, which
    fails each rank that never joined the others.
    """
    nproc = options.num_processes or default_num_processes()
    argv = [f"--nproc-per-node={nproc}", f"--nnodes={options.num_nodes}",
            f"--node-rank={options.node_rank}", f"--max-restarts={options.max_restarts}"]
    optional = {"--master-addr": options.master_addr, "--master-port": options.master_port,
                "--rdzv-backend": options.rdzv_backend,
                "--rdzv-endpoint": options.rdzv_endpoint, "--rdzv-id": options.rdzv_id}
    argv += [f"{flag}={value}" for flag, value in optional.items() if value is not None]
    if options.allow_unconnected:
        return [*argv, *(["--module"] if module else []), target, *args]
    return [*argv, "--module", WORKER_MODULE, *(["-m"] if module else []), target, *args]


def launch(
    options: LaunchOptions, target: str, args: list[str], *, module: bool = False,
    training_env: Mapping[str, str] | None = None,
) -> int:
    """Run `target` (a script path, or a module when `module`) on every process; exit code.

    `training_env` (`ACCEL_*` variables from `settings.training_environment`) is set in
    every process. The first failed rank's exit code is returned, so a failing script
    fails the launch.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if options.num_processes is None:
        options = attrs.evolve(options, num_processes=default_num_processes())
    # The script's arguments bypass torchrun's parser: it would take a prefix of one of its
    # own flags (`--log` is ambiguous there, `--max-r` would become --max-restarts).
    torchrun_argv = torchrun_arguments(options, target, [], module=module)
    with tempfile.TemporaryDirectory(prefix="accel-launch-") as launch_dir:
        try:
            worker_env = {**(training_env or {}),
                          **_worker_environment(launch_dir, options.num_processes)}
            with _environment(worker_env):
                parsed = parse_args(torchrun_argv)
                parsed.training_script_args = [*parsed.training_script_args, *args]
                run(parsed)
        except ChildFailedError as failed:
            return _report_failures(failed)
        except SignalException as stopped:  # Ctrl-C, or a scheduler's SIGTERM
            print(f"accel launch: stopped by {stopped.sigval.name}; the workers were ended",
                  file=sys.stderr)
            return 128 + int(stopped.sigval)
    return 0


def _worker_environment(launch_dir: str, nproc: int) -> dict[str, str]:
    env = {"ACCEL_LAUNCH_DIR": launch_dir}
    if "OMP_NUM_THREADS" not in os.environ:
        # torchrun would pick 1 with a warning banner; share the cores out instead.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    return env


@contextlib.contextmanager
def _environment(updates: Mapping[str, str]) -> Iterator[None]:
    """Set variables that torchrun copies into the workers; restore them afterwards."""
    saved = {name: os.environ.get(name) for name in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _report_failures(failed: Any) -> int:
    for rank, failure in sorted(failed.failures.items()):
        print(f"accel launch: rank {rank} exited with code {_exit_code(failure.exitcode)}",
              file=sys.stderr)
    _, first = failed.get_first_failure()
    return _exit_code(first.exitcode) or 1


def _exit_code(code: int) -> int:
    """A process killed by signal N reports -N; a shell reports 128 + N."""
    return 128 - code if code < 0 else code


def add_parser(subparsers: Any) -> None:
    """Register `accel launch` on the `accel` command line."""
    parser = subparsers.add_parser(
        "launch", help="run a script on N processes (and M nodes) via torch.distributed.run",
        description="Run a training script on several processes, connected by "
        "torch.distributed. Precedence: flag > ACCEL_<NAME> variable > config file "
        "(--config, else $ACCEL_CONFIG_FILE, else ~/.cache/accel/config.toml) > default; "
        "see docs/configuration.md.",
    )
    parser.add_argument("-n", "--num-processes", type=int, help="processes per node "
                        "(default: one per GPU when CUDA is available, else 1)")
    parser.add_argument("--nnodes", "--num-nodes", dest="num_nodes", type=int,
                        help="number of nodes (default 1)")
    parser.add_argument("--node-rank", type=int, help="this node's index, 0..nnodes-1")
    parser.add_argument("--master-addr", help="address of node 0 (multi-node runs)")
    parser.add_argument("--master-port", type=int, help="port on node 0 (default: a free "
                        "port on one node, 29500 across nodes)")
    parser.add_argument("--rdzv-backend", help="torch elastic rendezvous backend, e.g. c10d")
    parser.add_argument("--rdzv-endpoint", help="rendezvous HOST:PORT")
    parser.add_argument("--rdzv-id", help="job id shared by all nodes of one rendezvous")
    parser.add_argument("--max-restarts", type=int, help="restarts of the worker group on "
                        "failure (default 0)")
    parser.add_argument("--config", metavar="FILE", help="TOML file of these options, e.g. "
                        "num_processes = 2 (write one with `accel config`)")
    add_training_flags(parser)
    parser.add_argument("--allow-unconnected", action="store_true", default=None,
                        help="do not fail ranks that never join the others")
    parser.add_argument("--xla", action="store_true", help="TPU VM (PJRT): run on this host "
                        "once, torch_xla spawns one worker per device (see accel.backends.xla)")
    parser.add_argument("-m", "--module", action="store_true",
                        help="TARGET is a module name, run as with python -m")
    parser.add_argument("target", metavar="TARGET", help="script path (or module with -m)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for TARGET")
    parser.set_defaults(handler=run_command)


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """Flags for the settings passed to the script (read there by `training_settings()`)."""
    parser.add_argument("--strategy", choices=settings.STRATEGIES,
                        help="engine for shard_model (default: ddp on 2+ processes)")
    parser.add_argument("--mixed-precision", choices=settings.PRECISIONS,
                        help="precision for with_amp (default no)")
    parser.add_argument("--grad-accum-steps", type=int,
                        help="micro-batches per optimizer update (default 1)")
    parser.add_argument("--device", help="device override for accel.init")
    parser.add_argument("--debug", action="store_true", default=None,
                        help="check shapes across ranks before collectives")


def command_line_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (None where a flag was not given)."""
    return {name: getattr(args, name) for name in settings.BY_NAME if hasattr(args, name)}


def run_command(args: argparse.Namespace) -> int:
    """`accel launch ...`, once argparse has read the command line."""
    if not args.module and not os.path.isfile(args.target):
        raise LaunchEnvironmentError(
            f"the script {args.target!r} does not exist; pass a script path, or -m and a "
            "module name"
        )
    if args.xla:
        from accel.backends.xla import launch_per_device

        return launch_per_device(args.target, args.args, module=args.module)
    resolved = settings.resolve_settings(command_line_settings(args), os.environ, args.config)
    return launch(launch_options(resolved), args.target, args.args, module=args.module,
                  training_env=settings.training_environment(resolved))
