"""Entry point of the `accel` command: one argparse subcommand per module of accel.cli."""

from __future__ import annotations

import argparse
import sys

from accel.cli import config, env, estimate, launch, merge, plot
from accel.errors import AccelError

# Each module registers its subcommand with `add_parser(subparsers)`; add new ones here.
_COMMANDS = (launch, config, env, estimate, merge, plot)


def build_parser() -> argparse.ArgumentParser:
    """The `accel` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="accel", description="Run PyTorch training on any distributed setup.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `accel COMMAND ...`; returns the exit code.

    An accel error (bad option, bad config file) is printed as one line, not a traceback.

    >>> main(["env", "--json"])
    0
    """
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.handler(args)
    except AccelError as exc:
        print(f"accel {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
