"""The flags users already type: torchrun's and Accelerate's spellings of accel's options.

`accel launch` (and `accel test`) accept each alias below as the accel flag it names;
`--help` lists them. Accelerate's `--num_processes` counts processes in all machines
(torchrun's `--nproc_per_node` and accel's `-n` count per machine), so it is split over
the machines; Accelerate's `--multi_gpu` is accepted and does nothing (accel starts `-n`
processes, one per GPU by default, whatever the hardware).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from accel.errors import IncompatibleOptionsError, LaunchEnvironmentError

#: accel's flag -> the other spellings it also answers to (torchrun's, Accelerate's).
ALIASES: dict[str, tuple[str, ...]] = {
    "--num-processes": ("--nproc-per-node", "--nproc_per_node"),
    "--nnodes": ("--num_nodes", "--num_machines", "--num-machines"),
    "--node-rank": ("--node_rank", "--machine_rank", "--machine-rank"),
    "--master-addr": ("--master_addr", "--main_process_ip", "--main-process-ip"),
    "--master-port": ("--master_port", "--main_process_port", "--main-process-port"),
    "--rdzv-backend": ("--rdzv_backend",),
    "--rdzv-endpoint": ("--rdzv_endpoint",),
    "--rdzv-id": ("--rdzv_id",),
    "--max-restarts": ("--max_restarts",),
    "--mixed-precision": ("--mixed_precision",),
    "--grad-accum-steps": ("--grad_accum_steps", "--gradient_accumulation_steps",
                           "--gradient-accumulation-steps"),
}
#: Accelerate's total over all machines (not per machine): converted by `per_node_count`.
TOTAL_PROCESSES = ("--num_processes",)
NO_OP = ("--multi_gpu", "--multi-gpu")


def add_flag(parser: argparse.ArgumentParser, *names: str, **kwargs: Any) -> argparse.Action:
    """`parser.add_argument(*names, **kwargs)`, plus the aliases of `names` (hidden in
    the option list, listed in the help's epilog by `aliases_help`)."""
    action = parser.add_argument(*names, **kwargs)
    aliases = [alias for name in names for alias in ALIASES.get(name, ())]
    if aliases:
        parser.add_argument(*aliases, **{**kwargs, "dest": action.dest,
                                         "help": argparse.SUPPRESS})
    return action


def add_habit_flags(parser: argparse.ArgumentParser) -> None:
    """Accelerate's `--num_processes` (all machines) and `--multi_gpu` (no effect)."""
    parser.add_argument(TOTAL_PROCESSES[0], dest="total_processes", type=int,
                        help=argparse.SUPPRESS)
    parser.add_argument(*NO_OP, dest="multi_gpu", action="store_true", help=argparse.SUPPRESS)


def aliases_help() -> str:
    """The epilog of `accel launch --help`: every alias and what it stands for."""
    lines = [f"  {', '.join(aliases)} = {flag}" for flag, aliases in ALIASES.items()]
    lines.append(f"  {TOTAL_PROCESSES[0]} N (Accelerate: processes on all machines) = "
                 "--num-processes N / --nnodes")
    lines.append(f"  {NO_OP[0]} (Accelerate) is accepted and does nothing")
    return "aliases (torchrun's and Accelerate's spellings):\n" + "\n".join(lines)


def per_node_count(total: int, num_nodes: int, per_node: int | None) -> int:
    """Processes per machine for Accelerate's `--num_processes TOTAL` over `num_nodes`.

    >>> per_node_count(8, 2, None)
    4
    """
    if total < 1 or total % num_nodes:
        raise LaunchEnvironmentError(
            f"--num_processes {total} (processes on all {num_nodes} machine(s)) must be a "
            f"positive multiple of the number of machines; or give -n, processes per machine"
        )
    if per_node is not None and per_node * num_nodes != total:
        raise IncompatibleOptionsError(
            f"--num_processes {total} (all machines) and -n/--nproc_per_node {per_node} "
            f"(per machine) disagree over {num_nodes} machine(s); give one of them"
        )
    return total // num_nodes


def note_no_ops(args: argparse.Namespace) -> None:
    """Say, once, that a flag accepted out of habit does nothing here."""
    if getattr(args, "multi_gpu", False):
        print("accel: --multi_gpu has no effect: accel starts -n processes per machine "
              "(default: one per GPU) and connects them whatever the hardware; drop it",
              file=sys.stderr)
