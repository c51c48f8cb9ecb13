"""The settings of a run as one process receives them: declarations, text, sources.

Core layer. `Setting` declares one option (the engines declare theirs on their strategy
class, see accel/backends); `read_settings` reads the training settings that
`accel launch` (or the shell) passed as `ACCEL_<NAME>` variables into `LaunchSettings`,
each value with where it came from; `accel.init` puts them in `ctx.settings`, and the
transforms take them as their defaults (`pick` warns when an explicit argument
contradicts one). Resolving flags, variables and config files is
accel/transforms/settings.py.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from accel.errors import LaunchEnvironmentError

DEFAULT = "default"
#: JSON {name: [text, source, value]} set by `accel launch`: where each training setting
#: came from, and its typed value (an engine's options are typed only there).
SOURCES_VARIABLE = "ACCEL_SETTING_SOURCES"
PRECISIONS = ("no", "fp16", "bf16", "fp8")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@attrs.frozen
class Setting:
    """One option: its type, default, where it lives in the config file, its question."""

    name: str
    kind: type
    default: Any
    help: str
    #: whether the launched processes receive it (as the variable `env_var`).
    training: bool = False
    choices: tuple[Any, ...] | None = None
    minimum: int | None = None
    #: the TOML table holding it (`[deepspeed]`, the engine's name), None for the top level.
    section: str | None = None
    #: what `accel config` asks for it (None: not asked), and the answer an empty line takes.
    question: str | None = None
    ask_default: Any = None
    #: asked only when this returns True for the answers so far (None: always).
    asked_if: Callable[[Mapping[str, Any]], bool] | None = attrs.field(default=None, eq=False)

    @property
    def env_var(self) -> str:
        return "ACCEL_" + self.name.upper()

    @property
    def key(self) -> str:
        """The key inside its TOML table: `stage` for `deepspeed_stage`."""
        return self.name[len(self.section) + 1:] if self.section else self.name


#: the training settings `accel.init` reads; engine options follow the chosen strategy.
TRAINING: tuple[Setting, ...] = (
    Setting("strategy", str, None, "engine for shard_model (default: ddp on 2+ processes, "
            "else single)", training=True),
    Setting("mixed_precision", str, "no", "precision for with_amp", training=True,
            choices=PRECISIONS),
    Setting("grad_accum_steps", int, 1, "micro-batches per optimizer update",
            training=True, minimum=1),
    Setting("device", str, None, "device override for accel.init (cpu, cuda, mps, xla)",
            training=True),
    Setting("debug", bool, False, "check shapes across ranks before collectives",
            training=True),
)


def from_text(setting: Setting, raw: str, source: str) -> Any:
    """The value of `setting` that the text `raw` (a variable's value) spells."""
    if setting.kind is bool:
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise LaunchEnvironmentError(f"{source}={raw!r} is not a boolean; use 1 or 0")
    if setting.kind is int:
        try:
            return int(raw)
        except ValueError:
            raise LaunchEnvironmentError(
                f"{source}={raw!r} is not an integer; {setting.name} is {setting.help}"
            ) from None
    return raw


def check_setting(setting: Setting, value: Any, source: str) -> Any:
    """`value` if it suits `setting`; else a LaunchEnvironmentError naming `source`."""
    name = setting.name
    # bool is an int in Python: `num_processes = true` must not pass as 1.
    if not isinstance(value, setting.kind) or (setting.kind is int and isinstance(value, bool)):
        raise LaunchEnvironmentError(
            f"{source} sets {name} to {value!r}, but it must be of type {setting.kind.__name__}"
        )
    if setting.minimum is not None and value < setting.minimum:
        raise LaunchEnvironmentError(
            f"{source} sets {name} to {value}; it must be >= {setting.minimum}")
    if setting.choices is not None and value not in setting.choices:
        raise LaunchEnvironmentError(
            f"{source} sets {name} to {value!r}; choose one of "
            f"{', '.join(map(str, setting.choices))}"
        )
    return value


def _shown(value: Any) -> str:
    return "-" if value is None else str(value)


@attrs.frozen
class LaunchSettings:
    """The training settings this process was started with, each with its source.

    `ctx.settings` holds them from `accel.init`: `ctx.settings.mixed_precision` is the
    value, `ctx.settings.source("mixed_precision")` where it came from ("the command
    line", "$ACCEL_MIXED_PRECISION", "config file run.toml" or "default"). The options
    of the chosen strategy's engine (`fsdp_cpu_offload`, ...) follow; set by a variable
    outside `accel launch` they are kept as its text, which `shard_model` converts with
    the engine's declarations.

    >>> LaunchSettings().mixed_precision, LaunchSettings().source("mixed_precision")
    ('no', 'default')
    """

    #: (name, value, source) of every training setting, then of the engine's options.
    entries: tuple[tuple[str, Any, str], ...] = attrs.field(
        factory=lambda: tuple((s.name, s.default, DEFAULT) for s in TRAINING))

    def __getattr__(self, name: str) -> Any:
        if name == "entries" or name.startswith("__"):  # copy and pickle probe these
            raise AttributeError(name)
        for key, value, _ in self.entries:
            if key == name:
                return value
        raise AttributeError(f"no launch setting {name!r}; known: "
                             f"{', '.join(key for key, _, _ in self.entries)}")

    def source(self, name: str) -> str:
        """Where setting `name` came from ("default" when nothing set it)."""
        for key, _, source in self.entries:
            if key == name:
                return source
        return DEFAULT

    def was_set(self, name: str) -> bool:
        """Whether a flag, a variable or a config file set `name` (it is not the default)."""
        return self.source(name) != DEFAULT

    def values(self) -> dict[str, Any]:
        """Every setting's value by name."""
        return {key: value for key, value, _ in self.entries}

    def describe(self) -> str:
        """The values grouped by source: `strategy=fsdp, mixed_precision=bf16 (config file
        run.toml); grad_accum_steps=1, ... (default)`."""
        groups: dict[str, list[str]] = {}
        for key, value, source in self.entries:
            groups.setdefault(source, []).append(f"{key}={_shown(value)}")
        return "; ".join(f"{', '.join(items)} ({source})" for source, items in groups.items())


def read_settings(env: Mapping[str, str]) -> LaunchSettings:
    """The training settings in `env` (`ACCEL_<NAME>` variables), with their sources.

    A value passed by `accel launch` keeps the source the launcher resolved it from
    (flag, variable, config file, default); any other is its variable's. The chosen
    strategy's engine options are every `ACCEL_<STRATEGY>_*` variable, kept as text.

    Raises:
        LaunchEnvironmentError: a variable's value does not suit its setting; the
            message names the variable.
    """
    handed = _handed_sources(env)
    entries = []
    for setting in TRAINING:
        raw = env.get(setting.env_var, "")
        if raw == "":
            entries.append((setting.name, setting.default, DEFAULT))
            continue
        source = _source_of(setting.env_var, setting.name, raw, handed)
        value = check_setting(setting, from_text(setting, raw, f"${setting.env_var}"), source)
        entries.append((setting.name, value, source))
    strategy = env.get("ACCEL_STRATEGY", "")
    if strategy:
        prefix = f"ACCEL_{strategy.upper()}_"
        for variable in sorted(v for v in env if v.startswith(prefix) and env[v] != ""):
            name = variable[len("ACCEL_"):].lower()
            raw = env[variable]
            source = _source_of(variable, name, raw, handed)
            typed = handed[name][2] if source != f"${variable}" else raw
            entries.append((name, typed, source))
    return LaunchSettings(entries=tuple(entries))


def _handed_sources(env: Mapping[str, str]) -> dict[str, Any]:
    try:
        handed = json.loads(env.get(SOURCES_VARIABLE) or "{}")
    except ValueError:  # not the launcher's: every value is its variable's
        return {}
    return handed if isinstance(handed, dict) else {}


def _source_of(variable: str, name: str, raw: str, handed: Mapping[str, Any]) -> str:
    # The launcher's source only while the variable still holds the value it passed.
    entry = handed.get(name)
    if isinstance(entry, list) and len(entry) == 3 and entry[0] == raw:
        return str(entry[1])
    return f"${variable}"


class SettingOverriddenWarning(UserWarning):
    """An explicit argument replaced a setting of the launch (flag, variable, config file)."""


_warned: set[tuple[str, str, str]] = set()


def pick(settings: LaunchSettings, name: str, explicit: Any, launch_value: Any, call: str,
         *, warn: bool = True) -> Any:
    """`explicit` when given, else `launch_value` (the launch's setting `name`).

    An explicit value that differs from a setting the launch set warns once per process
    (for each pair of values), naming both and where the launch's came from; `warn`:
    whether this process warns (the main process, so a run warns once).
    """
    if explicit is None:
        return launch_value
    if settings.was_set(name) and str(explicit) != str(launch_value) and warn:
        _warn_once((name, str(explicit), str(launch_value)),
                   f"{call} overrides the launch setting {name}={launch_value!r} (from "
                   f"{settings.source(name)}) with {explicit!r}; drop the argument to use "
                   "the launch setting")
    return explicit


def without_unapplied_precision(ctx: Any, call: str) -> Any:
    """`ctx` with its precision reset to "no" when the launch set one that `with_amp`
    never applied (warning once): the engine and the loss scaler must not be built for
    a precision the forward does not run in."""
    if (ctx.precision == "no" or ctx.was_applied("with_amp")
            or not ctx.settings.was_set("mixed_precision")):
        return ctx
    if ctx.is_main_process:
        _warn_once(("mixed_precision", "unapplied", ctx.precision),
                   f"the launch set mixed_precision={ctx.precision!r} (from "
                   f"{ctx.settings.source('mixed_precision')}), but with_amp was not applied "
                   f"before {call}: the model trains in fp32. Call accel.with_amp(model, "
                   "ctx) first; it takes the launch's precision")
    return attrs.evolve(ctx, precision="no")


def _warn_once(key: tuple[str, str, str], message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, SettingOverriddenWarning, stacklevel=4)
