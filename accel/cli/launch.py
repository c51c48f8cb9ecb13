"""`accel launch`: start the processes of a run through torch's elastic launcher (torchrun).

accel does not manage processes itself: it resolves its options (command line > ACCEL_*
variable > a scheduler's PET_* / SLURM variables > config file > defaults, see
accel.transforms.settings and accel.transforms.schedulers), turns them into
`torch.distributed.run` arguments, and runs the user's script through `accel.cli._worker`,
which fails a rank that never joined the others. Under `srun` with one task per rank,
SLURM has started the processes already: each task runs the script once, as its rank.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from accel.cli import aliases
from accel.errors import IncompatibleOptionsError, LaunchEnvironmentError
from accel.transforms import schedulers, settings
from accel.world import World, detect_world

WORKER_MODULE = "accel.cli._worker"


@attrs.frozen
class LaunchOptions:
    """How many processes to start where; every field is also a config-file key."""

    #: processes per node; None: one per GPU when CUDA is available, else 1.
    num_processes: int | None = None
    num_nodes: int = 1
    #: the most nodes of an elastic run (`--nnodes MIN:MAX`); None: exactly num_nodes.
    max_nodes: int | None = None
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_backend: str | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    rdzv_conf: str | None = None
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
    argv = [f"--nproc-per-node={nproc}", f"--nnodes={node_count(options)}",
            f"--node-rank={options.node_rank}", f"--max-restarts={options.max_restarts}"]
    optional = {"--master-addr": options.master_addr, "--master-port": options.master_port,
                "--rdzv-backend": options.rdzv_backend,
                "--rdzv-endpoint": options.rdzv_endpoint, "--rdzv-id": options.rdzv_id,
                "--rdzv-conf": options.rdzv_conf}
    argv += [f"{flag}={value}" for flag, value in optional.items() if value is not None]
    if options.allow_unconnected:
        return [*argv, *(["--module"] if module else []), target, *args]
    return [*argv, "--module", WORKER_MODULE, *(["-m"] if module else []), target, *args]


def node_count(options: LaunchOptions) -> str:
    """torchrun's --nnodes: 'N', or 'MIN:MAX' for an elastic range.

    >>> node_count(LaunchOptions(num_nodes=2, max_nodes=4))
    '2:4'
    """
    most = options.max_nodes or options.num_nodes
    return f"{options.num_nodes}:{most}" if most != options.num_nodes else str(most)


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
                          **_worker_environment(launch_dir, options.num_processes),
                          **_rendezvous_environment(options)}
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


def _rendezvous_environment(options: LaunchOptions) -> dict[str, str]:
    """Under a dynamic rendezvous, rank 0 of each worker group serves a fresh store.

    torchrun's agents otherwise share the first round's store across rounds: a node that
    joins later waits for an address nobody publishes again, and a group restarted for a
    membership change (its restart count unchanged) would read the last group's keys.
    """
    if options.rdzv_backend in (None, "static") or "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" in \
            os.environ:
        return {}
    return {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def launch_as_task(
    world: World, options: LaunchOptions, target: str, args: list[str], *,
    module: bool = False, training_env: Mapping[str, str] | None = None,
) -> int:
    """Run `target` once in this process's place, as rank `world.rank`: srun started one
    task per rank already. The script sees torchrun's variables (RANK, LOCAL_RANK, ...,
    MASTER_ADDR), so `accel.init()` and `init_process_group()` work unchanged.

    >>> launch_as_task(detect_world(os.environ), options, "train.py", [])  # in an srun task
    0
    """
    if options.max_restarts:
        raise IncompatibleOptionsError(
            f"max_restarts {options.max_restarts} needs torchrun's agent, which srun with "
            "one task per rank does not run; start one task per node (srun "
            "--ntasks-per-node=1 accel launch -n GPUS ...) or requeue the job with SLURM")
    with tempfile.TemporaryDirectory(prefix="accel-launch-") as launch_dir:
        env = {**os.environ, **(training_env or {}),
               **_worker_environment(launch_dir, world.local_world_size),
               **rank_variables(world)}
        command = [sys.executable, "-u", "-m", WORKER_MODULE, *(["-m"] if module else []),
                   target, *args]
        return _exit_code(subprocess.call(command, env=env))


def rank_variables(world: World) -> dict[str, str]:
    """torchrun's variables for one rank of `world`.

    >>> rank_variables(World(rank=1, world_size=2, local_rank=1, local_world_size=2))["RANK"]
    '1'
    """
    values = {"RANK": world.rank, "WORLD_SIZE": world.world_size,
              "LOCAL_RANK": world.local_rank, "LOCAL_WORLD_SIZE": world.local_world_size,
              "GROUP_RANK": world.node_rank, "GROUP_WORLD_SIZE": world.num_nodes,
              "MASTER_ADDR": world.master_addr, "MASTER_PORT": world.master_port}
    return {name: str(value) for name, value in values.items()}


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
        "torch.distributed. Precedence: flag > ACCEL_<NAME> variable > torchrun's "
        "PET_<NAME> / SLURM variables > config file (--config, else $ACCEL_CONFIG_FILE, "
        "else ~/.cache/accel/config.toml) > default; see docs/configuration.md.",
        epilog=aliases.aliases_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_launch_flags(parser)
    parser.add_argument("--allow-unconnected", action="store_true", default=None,
                        help="do not fail ranks that never join the others")
    parser.add_argument("--xla", action="store_true", help="TPU VM (PJRT): run on this host "
                        "once, torch_xla spawns one worker per device (see accel.backends.xla)")
    parser.add_argument("-m", "--module", action="store_true",
                        help="TARGET is a module name, run as with python -m")
    parser.add_argument("target", metavar="TARGET", help="script path (or module with -m)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for TARGET")
    parser.set_defaults(handler=run_command)


def add_launch_flags(parser: argparse.ArgumentParser) -> None:
    """Where and how many processes, the config file and the training settings, each
    with its torchrun and Accelerate aliases (accel.cli.aliases)."""
    add = functools.partial(aliases.add_flag, parser)
    add("-n", "--num-processes", type=int, help="processes per node "
        "(default: one per GPU when CUDA is available, else 1)")
    add("--nnodes", "--num-nodes", dest="num_nodes", type=_node_range,
        help="number of nodes, or MIN:MAX for an elastic run (default 1)")
    add("--node-rank", type=int, help="this node's index, 0..nnodes-1")
    add("--master-addr", help="address of node 0 (multi-node runs)")
    add("--master-port", type=int, help="port on node 0 (default: a free "
        "port on one node, 29500 across nodes)")
    add("--rdzv-backend", help="torch elastic rendezvous backend, e.g. c10d")
    add("--rdzv-endpoint", help="rendezvous HOST:PORT")
    add("--rdzv-id", help="job id shared by all nodes of one rendezvous")
    add("--rdzv-conf", help="rendezvous options KEY=VALUE,... (e.g. join_timeout=600)")
    add("--max-restarts", type=int, help="restarts of the worker group on "
        "failure (default 0)")
    add("--config", metavar="FILE", help="TOML file of these options, e.g. "
        "num_processes = 2 (write one with `accel config`)")
    add_training_flags(parser)
    aliases.add_habit_flags(parser)


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """Flags for the settings passed to the script (read there by `training_settings()`)."""
    add = functools.partial(aliases.add_flag, parser)
    add("--strategy", choices=settings.STRATEGIES,
        help="engine for shard_model (default: ddp on 2+ processes)")
    add("--mixed-precision", choices=settings.PRECISIONS,
        help="precision for with_amp (default no)")
    add("--grad-accum-steps", type=int,
        help="micro-batches per optimizer update (default 1)")
    add("--device", help="device override for accel.init")
    add("--debug", action="store_true", default=None,
        help="check shapes across ranks before collectives")


def command_line_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (None where a flag was not given)."""
    values = {name: getattr(args, name) for name in settings.BY_NAME if hasattr(args, name)}
    if isinstance(values.get("num_nodes"), tuple):  # --nnodes N or MIN:MAX
        values["num_nodes"], values["max_nodes"] = values["num_nodes"]
    return values


def _node_range(text: str) -> tuple[int, int]:
    try:
        return schedulers.node_range(text, "--nnodes")
    except LaunchEnvironmentError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def resolve(args: argparse.Namespace, given: Mapping[str, Any]) -> settings.Resolved:
    """The settings of a launch from the flags `given` (aliases included), ACCEL_*
    variables and the config file; Accelerate's --num_processes split over the nodes."""
    aliases.note_no_ops(args)
    resolved = settings.resolve_settings(given, os.environ, args.config)
    if getattr(args, "total_processes", None) is not None:
        per_node = aliases.per_node_count(args.total_processes, resolved["num_nodes"],
                                        given.get("num_processes"))
        resolved = settings.resolve_settings({**given, "num_processes": per_node},
                                             os.environ, args.config)
    return resolved


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
    flags = command_line_settings(args)
    resolved = resolve(args, flags)
    training_env = settings.training_environment(resolved)
    schedulers.check_slurm_launch(os.environ)
    if schedulers.slurm_mode(os.environ) == "per-rank":
        _check_no_shape_flags(flags)
        return launch_as_task(detect_world(os.environ), launch_options(resolved), args.target,
                              args.args, module=args.module, training_env=training_env)
    return launch(launch_options(resolved), args.target, args.args, module=args.module,
                  training_env=training_env)


def _check_no_shape_flags(flags: Mapping[str, Any]) -> None:
    if (flags.get("num_processes") or 1) > 1:
        raise IncompatibleOptionsError(
            f"srun started one task per rank here, so each task runs the script once, but "
            f"-n {flags['num_processes']} asks for more processes per task; drop -n, or "
            "start one task per node (srun --ntasks-per-node=1 accel launch -n N ...)")
