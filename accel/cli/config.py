"""`accel config`: write a run's settings to a TOML file, by questions or for this hardware.

- `accel config`: a questionnaire on stdin (a script can pipe the answers in); an empty
  answer takes the default shown in brackets; a bad answer is explained and asked again.
- `accel config --default`: the settings for the detected hardware, without questions.
- `accel config show [FILE]`: the file, and the effective value of every setting with
  where it came from (flag > environment variable > config file > default).

The file goes to `--output`, else `$ACCEL_CONFIG_FILE`, else `~/.cache/accel/config.toml`,
where `accel launch` finds it without `--config`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from accel.errors import AccelError, LaunchEnvironmentError
from accel.transforms import settings
from accel.transforms.settings import PRECISIONS, STRATEGIES, Setting, lookup

HEADER = "# accel run settings, written by `accel config`; see docs/configuration.md\n"


# ---- writing TOML (tomllib only reads): top-level scalars, then one level of tables ----

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
            "\f": "\\f", "\r": "\\r"}


def toml_value(value: bool | int | str) -> str:
    """A TOML literal: true/false, an integer, or a basic string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        # TOML forbids raw control characters (DEL included) in strings; all else is literal.
        return '"' + "".join(
            _ESCAPES.get(ch) or (f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F
                                 else ch) for ch in value) + '"'
    raise AccelError(f"cannot write {value!r} ({type(value).__name__}) to a config file")


def to_toml(values: Mapping[str, Any]) -> str:
    """Settings (flat names, None skipped) as TOML, engine options in `[deepspeed]`/`[fsdp]`.

    >>> to_toml({"num_processes": 2, "deepspeed_stage": 3})
    '...num_processes = 2\\n\\n[deepspeed]\\nstage = 3\\n'
    """
    declared = {name: lookup(name, "the new config") for name in values}
    top = [f"{name} = {toml_value(v)}" for name, v in values.items()
           if v is not None and declared[name].section is None]
    text = HEADER + "".join(line + "\n" for line in top)
    for section in sorted({d.section for d in declared.values() if d.section}):
        inner = [f"{declared[name].key} = {toml_value(v)}" for name, v in values.items()
                 if v is not None and declared[name].section == section]
        if inner:
            text += f"\n[{section}]\n" + "".join(line + "\n" for line in inner)
    return text


def write_config(values: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Check `values` as `accel launch` would, then write them to `path` (folders made)."""
    settings.merge_layers(("the new config", values))
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(to_toml(values), encoding="utf-8")
    return target


# ---- the questionnaire ----

class AnswersEnded(LaunchEnvironmentError):
    """stdin ended before every question was answered."""


class Asker:
    """Asks questions on `write`, reads answers from `read_line`, re-asks on bad input.

    `echo` writes each answer after its question, so piped answers read as a transcript.
    """

    def __init__(self, read_line: Callable[[], str], write: Callable[[str], Any],
                 echo: bool = False):
        self.read_line = read_line
        self.write = write
        self.echo = echo

    def ask(self, question: str, parse: Callable[[str], Any], default: Any = None) -> Any:
        """The parsed answer; an empty answer is `default` (asked again when there is none)."""
        shown = "" if default is None else f" [{_shown(default)}]"
        while True:
            self.write(f"{question}{shown}: ")
            line = self.read_line()
            if line == "":
                raise AnswersEnded(f"the answers ended before the question {question!r}; "
                                   "give one line per question (an empty line: the default)")
            answer = line.strip()
            if self.echo:
                self.write(answer + "\n")
            if answer == "" and default is not None:
                return default
            try:
                return parse(answer)
            except ValueError as exc:
                self.write(f"  {exc}\n")


def _shown(value: Any) -> str:
    return ("yes" if value else "no") if isinstance(value, bool) else str(value)


def integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """A parser for whole numbers in [minimum, maximum]."""
    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
        if number < minimum or (maximum is not None and number > maximum):
            upper = "" if maximum is None else f" and <= {maximum}"
            raise ValueError(f"{number} is out of range: it must be >= {minimum}{upper}")
        return number
    return parse


def choice(options: tuple[Any, ...]) -> Callable[[str], Any]:
    """A parser accepting one of `options` (compared as text, case-insensitively)."""
    def parse(text: str) -> Any:
        for option in options:
            if text.lower() == str(option).lower():
                return option
        raise ValueError(f"{text!r} is not one of {', '.join(map(str, options))}")
    return parse


def yes_no(text: str) -> bool:
    """yes/no (also y/n, true/false, 1/0)."""
    lowered = text.lower()
    if lowered in ("y", "yes", "true", "1"):
        return True
    if lowered in ("n", "no", "false", "0"):
        return False
    raise ValueError(f"{text!r} is not yes or no")


def text(value: str) -> str:
    """Any non-empty text (an address)."""
    if not value:
        raise ValueError("an answer is needed here")
    return value


def questionnaire(asker: Asker, detected_processes: int) -> dict[str, Any]:
    """Ask for every setting of a run; returns the values to write."""
    values: dict[str, Any] = {}
    values["num_nodes"] = asker.ask("How many machines (nodes)", integer(1), 1)
    if values["num_nodes"] > 1:
        values["node_rank"] = asker.ask(
            "Rank of this machine", integer(0, values["num_nodes"] - 1), 0)
        values["master_addr"] = asker.ask("Address of the machine with rank 0", text)
        values["master_port"] = asker.ask("Port on the machine with rank 0",
                                          integer(1, 65535), 29500)
    values["num_processes"] = asker.ask("Processes per machine", integer(1),
                                        detected_processes)
    total = values["num_nodes"] * values["num_processes"]
    values["strategy"] = asker.ask(f"Strategy ({'/'.join(STRATEGIES)})", choice(STRATEGIES),
                                   "ddp" if total > 1 else "single")
    values.update(_engine_questions(asker, values["strategy"]))
    values["mixed_precision"] = asker.ask(f"Mixed precision ({'/'.join(PRECISIONS)})",
                                          choice(PRECISIONS), "no")
    values["grad_accum_steps"] = asker.ask("Gradient accumulation steps", integer(1), 1)
    values["max_restarts"] = asker.ask("Restarts of the workers on failure", integer(0), 0)
    return values


def _engine_questions(asker: Asker, strategy: str) -> dict[str, Any]:
    """The questions the engine declares for its options (`FSDP.settings`, ...)."""
    answers: dict[str, Any] = {}
    for option in settings.engine_settings(strategy):
        if option.question is None or (option.asked_if and not option.asked_if(answers)):
            continue
        answers[option.name] = asker.ask(option.question, _parser(option), option.ask_default)
    return answers


def _parser(option: Setting) -> Callable[[str], Any]:
    """How an answer to `option`'s question is read: from its type, choices and minimum."""
    if option.choices is not None:
        return choice(option.choices)
    if option.kind is bool:
        return yes_no
    if option.kind is int:
        return integer(option.minimum if option.minimum is not None else 0)
    return text


def detected_processes() -> int:
    """One process per visible GPU when CUDA is available, else one."""
    from accel.cli.launch import default_num_processes

    return default_num_processes()


def default_config(num_processes: int) -> dict[str, Any]:
    """The settings `--default` writes for a machine that runs `num_processes` processes."""
    return {"num_processes": num_processes, "num_nodes": 1,
            "strategy": "ddp" if num_processes > 1 else "single",
            "mixed_precision": "no", "grad_accum_steps": 1, "max_restarts": 0}


# ---- show ----

def format_settings(resolved: settings.Resolved) -> str:
    """Every setting's value and source as aligned columns, unset ones as `-`."""
    rows = [(name, "-" if value is None else _shown(value), source)
            for name, value, source in resolved.rows()]
    width = max(len(name) for name, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:<{value_width}}  {source}"
                     for name, value, source in rows)


def show(path: str | None, env: Mapping[str, str]) -> str:
    """The config file's text and the effective settings (what `accel launch` would use)."""
    path = path or settings.find_config_file(None, env)
    if path is None:
        head = (f"no config file (none at {settings.default_config_path(env)}); "
                "write one with `accel config`\n")
    else:
        settings.load_config(path)  # a missing or broken file is the first thing to say
        head = f"config file: {path}\n{Path(path).read_text(encoding='utf-8')}\n"
    resolved = settings.resolve_settings({}, env, path)
    return f"{head}effective settings (flag > environment > config file > default):\n" \
           f"{format_settings(resolved)}"


# ---- command line ----

def add_parser(subparsers: Any) -> None:
    """Register `accel config` (and `accel config show`) on the `accel` command line."""
    parser = subparsers.add_parser(
        "config", help="write the settings of a run to a TOML file (questions on stdin)",
        description="Answer questions (or pass --default) to write a TOML config that "
        "`accel launch` reads. Precedence: flag > ACCEL_* variable > config file > default.",
    )
    parser.add_argument("--default", action="store_true",
                        help="write the settings for this machine's hardware, no questions")
    parser.add_argument("-o", "--output", metavar="FILE", help="where to write (default: "
                        "$ACCEL_CONFIG_FILE, else ~/.cache/accel/config.toml)")
    parser.set_defaults(handler=run_command)
    actions = parser.add_subparsers(dest="config_action", metavar="ACTION")
    show_parser = actions.add_parser("show", help="print a config file and the effective "
                                     "settings with their sources")
    show_parser.add_argument("file", nargs="?", metavar="FILE",
                             help="config file (default: the one accel launch would use)")
    show_parser.set_defaults(handler=run_show)


def run_command(args: argparse.Namespace) -> int:
    """`accel config [--default] [--output FILE]`."""
    output = args.output or settings.default_config_path(os.environ)
    if args.default:
        values = default_config(detected_processes())
    else:
        asker = Asker(sys.stdin.readline, _print_flush, echo=not sys.stdin.isatty())
        values = questionnaire(asker, detected_processes())
    path = write_config(values, output)
    print(f"accel config: wrote {path}")
    return 0


def _print_flush(message: str) -> None:
    sys.stdout.write(message)
    sys.stdout.flush()


def run_show(args: argparse.Namespace) -> int:
    """`accel config show [FILE]`."""
    print(show(args.file, os.environ))
    return 0

