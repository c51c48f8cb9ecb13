"""Entry point of the `accel` command: one argparse subcommand per module of accel.cli."""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from typing import Any

from accel.errors import AccelError

#: subcommand -> the module that registers it with `add_parser(subparsers)`. Only the
#: module of the command being run is imported (`accel launch` must not pay for
#: checkpoint, inference or tracking code); `accel --help` imports them all.
COMMANDS = {
    "launch": "accel.cli.launch",
    "test": "accel.cli.selftest",
    "config": "accel.cli.config",
    "env": "accel.cli.env",
    "estimate-memory": "accel.cli.estimate",
    "merge-weights": "accel.cli.merge",
    "plot": "accel.cli.plot",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `accel` argument parser: every subcommand, or only `command` when it is one."""
    return _build(command)[0]


def _build(command: str | None) -> tuple[argparse.ArgumentParser, Any]:
    parser = argparse.ArgumentParser(
        prog="accel", description="Run PyTorch training on any distributed setup.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in [COMMANDS[command]] if command in COMMANDS else COMMANDS.values():
        importlib.import_module(module).add_parser(subparsers)
    return parser, subparsers


def main(argv: list[str] | None = None) -> int:
    """Run `accel COMMAND ...`; returns the exit code.

    An accel error (bad option, bad config file) is printed as one line, not a traceback;
    an unknown flag is refused with the nearest known one.

    >>> main(["env", "--json"])
    0
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, subparsers = _build(argv[0] if argv else None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command_parser = subparsers.choices[args.command]
        command_parser.error(unknown_arguments_message(command_parser, unknown))
    try:
        return args.handler(args)
    except AccelError as exc:
        print(f"accel {args.command}: error: {exc}", file=sys.stderr)
        return 2


def unknown_arguments_message(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """argparse's "unrecognized arguments" message, with the nearest flag for each one.

    >>> parser = argparse.ArgumentParser()
    >>> _ = parser.add_argument("--num-processes")
    >>> unknown_arguments_message(parser, ["--num-proceses=2"])
    'unrecognized arguments: --num-proceses=2 (--num-proceses: did you mean --num-processes?)'
    """
    known = [flag for action in parser._actions for flag in action.option_strings]
    hints = []
    for argument in unknown:
        if argument.startswith("-"):
            flag = argument.split("=", 1)[0]
            nearest = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            if nearest:
                hints.append(f"{flag}: did you mean {nearest[0]}?")
    message = f"unrecognized arguments: {' '.join(unknown)}"
    return f"{message} ({'; '.join(hints)})" if hints else message


if __name__ == "__main__":
    sys.exit(main())
