"""`accel launch`: start the processes of a run through torch's elastic launcher (torchrun).

accel does not manage processes itself: it resolves its options (command line > config
file > defaults), turns them into `torch.distributed.run` arguments, and runs the user's
script through `accel.cli._worker`, which fails a rank that never joined the others.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from accel.errors import LaunchEnvironmentError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

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


# The type each option must have, whichever layer (flag, config file, ...) sets it.
_OPTION_TYPES: Mapping[str, type] = MappingProxyType({
    "num_processes": int, "num_nodes": int, "node_rank": int, "master_addr": str,
    "master_port": int, "rdzv_backend": str, "rdzv_endpoint": str, "rdzv_id": str,
    "max_restarts": int, "allow_unconnected": bool,
})
_AT_LEAST_ONE = ("num_processes", "num_nodes", "master_port")
_AT_LEAST_ZERO = ("node_rank", "max_restarts")


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The launch options a TOML file sets, e.g. `num_processes = 2`; checked later.

    Raises:
        LaunchEnvironmentError: the file is missing or not valid TOML.
    """
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise LaunchEnvironmentError(
            f"config file {os.fspath(path)!r} does not exist; pass an existing TOML file "
            "to --config"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise LaunchEnvironmentError(
            f"config file {os.fspath(path)!r} is not valid TOML ({exc}); fix its syntax"
        ) from None


def resolve_options(*layers: tuple[str, Mapping[str, Any]]) -> LaunchOptions:
    """Merge option layers, highest precedence first; a None value means "not set here".

    Each layer is `(where it came from, {option: value})`, e.g.
    `("the command line", flags), ("config file run.toml", config)`; an environment
    layer slots in between the two. Names and types are checked per layer, so an error
    says which one to fix.

    >>> resolve_options(("flags", {"num_processes": 4}), ("file", {"num_processes": 2}))
    LaunchOptions(num_processes=4, ...)
    """
    merged: dict[str, Any] = {}
    for source, values in reversed(layers):
        for name, value in values.items():
            if value is not None:
                merged[name] = _checked(name, value, source)
    options = LaunchOptions(**merged)
    _check_consistent(options)
    return options


def _checked(name: str, value: Any, source: str) -> Any:
    if name not in _OPTION_TYPES:
        raise LaunchEnvironmentError(
            f"{source} sets the unknown option {name!r}; known options: "
            f"{', '.join(sorted(_OPTION_TYPES))}"
        )
    kind = _OPTION_TYPES[name]
    # bool is an int in Python: `num_processes = true` must not pass as 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise LaunchEnvironmentError(
            f"{source} sets {name} to {value!r}, but it must be of type {kind.__name__}"
        )
    minimum = 1 if name in _AT_LEAST_ONE else 0 if name in _AT_LEAST_ZERO else None
    if minimum is not None and value < minimum:
        raise LaunchEnvironmentError(f"{source} sets {name} to {value}; it must be >= {minimum}")
    return value


def _check_consistent(options: LaunchOptions) -> None:
    if options.node_rank >= options.num_nodes:
        raise LaunchEnvironmentError(
            f"node_rank {options.node_rank} is outside the {options.num_nodes} node(s); "
            "node ranks go from 0 to num_nodes - 1"
        )
    if options.num_nodes > 1 and not (options.master_addr or options.rdzv_endpoint):
        raise LaunchEnvironmentError(
            f"a run over {options.num_nodes} nodes needs a meeting point: pass --master-addr "
            "(the address of node 0, same on every node) or --rdzv-endpoint HOST:PORT"
        )


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


def launch(options: LaunchOptions, target: str, args: list[str], *, module: bool = False) -> int:
    """Run `target` (a script path, or a module when `module`) on every process; exit code.

    The first failed rank's exit code is returned, so a failing script fails the launch.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if options.num_processes is None:
        options = attrs.evolve(options, num_processes=default_num_processes())
    torchrun_argv = torchrun_arguments(options, target, args, module=module)
    with tempfile.TemporaryDirectory(prefix="accel-launch-") as launch_dir:
        try:
            with _environment(_worker_environment(launch_dir, options.num_processes)):
                run(parse_args(torchrun_argv))
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
        "torch.distributed. Precedence: flag > --config file > default.",
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
                        "num_processes = 2")
    parser.add_argument("--allow-unconnected", action="store_true", default=None,
                        help="do not fail ranks that never join the others")
    parser.add_argument("-m", "--module", action="store_true",
                        help="TARGET is a module name, run as with python -m")
    parser.add_argument("target", metavar="TARGET", help="script path (or module with -m)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for TARGET")
    parser.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    """`accel launch ...`, once argparse has read the command line."""
    if not args.module and not os.path.isfile(args.target):
        raise LaunchEnvironmentError(
            f"the script {args.target!r} does not exist; pass a script path, or -m and a "
            "module name"
        )
    flags = {name: getattr(args, name) for name in _OPTION_TYPES}
    layers: list[tuple[str, Mapping[str, Any]]] = [("the command line", flags)]
    if args.config:
        layers.append((f"config file {args.config!r}", load_config(args.config)))
    options = resolve_options(*layers)
    return launch(options, args.target, args.args, module=args.module)


