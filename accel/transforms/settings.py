"""Every setting of a run, and the one precedence that resolves it everywhere.

Precedence, highest first: command-line flag > environment variable (`ACCEL_<NAME>`) > a
scheduler's variables (torchrun's `PET_*`, a PyTorchJob pod, SLURM: see
accel.transforms.schedulers) > config file (TOML) > default. `accel launch`, `accel env`
and `accel config show` all resolve through `resolve_settings`, so they never disagree.
The config file is the one `--config` names, else `$ACCEL_CONFIG_FILE`, else
`~/.cache/accel/config.toml` when it exists. Training settings reach the launched
processes as `ACCEL_<NAME>` variables (and their sources as `ACCEL_SETTING_SOURCES`),
which `accel.init` reads into `ctx.settings`: the defaults of with_amp, shard_model and
accumulate_grads. An engine's options (`[fsdp]`, `[deepspeed]`) are declared by its
strategy class (`FSDP.settings`) and loaded only when a run names that engine. See
docs/configuration.md for the table.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from accel.backends import builtin_names, strategy_class
from accel.errors import IncompatibleOptionsError, LaunchEnvironmentError
from accel.launch_settings import (
    DEFAULT,
    SOURCES_VARIABLE,
    TRAINING,
    LaunchSettings,
    Setting,
    check_setting,
    from_text,
    read_settings,
)
from accel.launch_settings import PRECISIONS as PRECISIONS  # re-exported for the CLI
from accel.transforms.schedulers import scheduler_layers
from accel.validation import check_mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

CONFIG_FILE_VARIABLE = "ACCEL_CONFIG_FILE"
#: the source of the environment layer; each value's source is then its variable's name.
ENVIRONMENT = "the environment"
#: the strategies a name selects (accel.Custom needs a function, not a name).
STRATEGIES = tuple(name for name in builtin_names() if name != "custom")

#: the launch's own settings, then the training settings (engines' options: see `table`).
BASE: tuple[Setting, ...] = (
    Setting("num_processes", int, None, "processes per machine (default: one per GPU, "
            "else 1)", minimum=1),
    Setting("num_nodes", int, 1, "number of machines (the least, when max_nodes is more)",
            minimum=1),
    Setting("max_nodes", int, None, "the most machines of an elastic run (--nnodes "
            "MIN:MAX); default num_nodes", minimum=1),
    Setting("node_rank", int, 0, "this machine's index, 0..num_nodes-1", minimum=0),
    Setting("master_addr", str, None, "address of the machine with node_rank 0"),
    Setting("master_port", int, None, "port on the machine with node_rank 0", minimum=1),
    Setting("rdzv_backend", str, None, "torch elastic rendezvous backend, e.g. c10d"),
    Setting("rdzv_endpoint", str, None, "rendezvous HOST:PORT"),
    Setting("rdzv_id", str, None, "job id shared by all nodes of one rendezvous"),
    Setting("rdzv_conf", str, None, "rendezvous options KEY=VALUE,... (e.g. "
            "join_timeout=900,last_call_timeout=5)"),
    Setting("max_restarts", int, 0, "restarts of the worker group on failure", minimum=0),
    Setting("allow_unconnected", bool, False, "do not fail ranks that never join the others"),
    *(attrs.evolve(s, choices=STRATEGIES) if s.name == "strategy" else s for s in TRAINING),
)
#: the settings without an engine's options (every command-line flag is one of these).
BY_NAME: Mapping[str, Setting] = {setting.name: setting for setting in BASE}


def engine_settings(engine: str) -> tuple[Setting, ...]:
    """The options engine `engine` declares (its strategy class's `settings`)."""
    return tuple(getattr(strategy_class(engine), "settings", ()))


def table(engines: Iterable[str] = ()) -> tuple[Setting, ...]:
    """The base settings and the options of `engines` (None and unknown names skipped)."""
    chosen = sorted({e for e in engines if e in STRATEGIES})
    return BASE + tuple(s for engine in chosen for s in engine_settings(engine))


def all_settings() -> tuple[Setting, ...]:
    """Every setting, every engine's options included (imports every engine)."""
    return table(STRATEGIES)


def __getattr__(name: str) -> Any:
    # SETTINGS loads every engine: only on demand (the launcher must not pay for it).
    if name == "SETTINGS":
        return all_settings()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _engines_named(names: Iterable[str], strategies: Iterable[Any]) -> set[str]:
    """The engines whose options `names` hold (`fsdp_cpu_offload`), or `strategies` name."""
    names = list(names)
    return ({e for e in STRATEGIES if any(n.startswith(e + "_") for n in names)}
            | {s for s in strategies if s in STRATEGIES})


@attrs.frozen
class Resolved:
    """Each setting's effective value and where it came from ("default", a flag, ...)."""

    values: Mapping[str, Any]
    sources: Mapping[str, str]
    config_file: str | None = None
    #: the settings resolved: the base ones and those of the engines the run names.
    settings: tuple[Setting, ...] = BASE

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def rows(self) -> list[tuple[str, Any, str]]:
        """`(name, value, source)` for every setting, in table order."""
        return [(s.name, self.values[s.name], self.sources[s.name]) for s in self.settings]


def default_config_path(env: Mapping[str, str]) -> Path:
    """`$ACCEL_CONFIG_FILE`, else `~/.cache/accel/config.toml` (where `accel config` writes)."""
    return Path(env.get(CONFIG_FILE_VARIABLE) or Path.home() / ".cache/accel/config.toml")


def find_config_file(flag_path: str | None, env: Mapping[str, str]) -> str | None:
    """The config file in effect: `--config`, else `$ACCEL_CONFIG_FILE`, else the default
    path when a file is there. A named file that is missing is an error, not skipped."""
    if flag_path:
        return flag_path
    if env.get(CONFIG_FILE_VARIABLE):
        return env[CONFIG_FILE_VARIABLE]
    default = default_config_path(env)
    return str(default) if default.is_file() else None


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings a TOML file sets, flattened (`[deepspeed] stage` -> `deepspeed_stage`).

    Raises:
        LaunchEnvironmentError: the file is missing, not valid TOML, or has an unknown table.
    """
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise LaunchEnvironmentError(
            f"config file {os.fspath(path)!r} does not exist; pass an existing TOML file "
            f"to --config (or fix ${CONFIG_FILE_VARIABLE}), or write one with `accel config`"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise LaunchEnvironmentError(
            f"config file {os.fspath(path)!r} is not valid TOML ({exc}); fix its syntax"
        ) from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in STRATEGIES or not engine_settings(key):
                known = [e for e in STRATEGIES if engine_settings(e)]
                raise LaunchEnvironmentError(
                    f"config file {os.fspath(path)!r} has the unknown table [{key}]; known "
                    f"tables: {', '.join(f'[{s}]' for s in known)}"
                )
            flat.update({f"{key}_{inner}": item for inner, item in value.items()})
        else:
            flat[key] = value
    return flat


def parse_env(env: Mapping[str, str]) -> dict[str, Any]:
    """The settings set by `ACCEL_<NAME>` variables, converted to their types."""
    engines = _engines_named((v[len("ACCEL_"):].lower() for v in env if v.startswith("ACCEL_")),
                             [env.get("ACCEL_STRATEGY")])
    values: dict[str, Any] = {}
    for setting in table(engines):
        raw = env.get(setting.env_var, "")
        if raw != "":
            values[setting.name] = from_text(setting, raw, f"${setting.env_var}")
    return values


def lookup(name: str, source: str = "accel") -> Setting:
    """The declaration of setting `name`, an engine's option included."""
    for setting in table(_engines_named([name], [])):
        if setting.name == name:
            return setting
    raise LaunchEnvironmentError(
        f"{source} sets the unknown option {name!r}; known options: "
        f"{', '.join(sorted(s.name for s in all_settings()))}"
    )


def check_value(name: str, value: Any, source: str) -> Any:
    """`value` if it suits setting `name`; else a LaunchEnvironmentError naming `source`."""
    return check_setting(lookup(name, source), value, source)


def merge_layers(*layers: tuple[str, Mapping[str, Any]]) -> Resolved:
    """Merge `(source, {name: value})` layers, highest precedence first; None is "not set".

    >>> resolved = merge_layers(("flag", {"num_processes": 4}), ("file", {"num_processes": 2}))
    >>> resolved["num_processes"], resolved.sources["num_processes"]
    (4, 'flag')
    """
    settings = table(_engines_named((n for _, layer in layers for n in layer),
                                    (layer.get("strategy") for _, layer in layers)))
    values = {s.name: s.default for s in settings}
    sources = dict.fromkeys(values, DEFAULT)
    for source, layer in reversed(layers):
        for name, value in layer.items():
            if value is not None:
                where = source
                if source == ENVIRONMENT and name in values:
                    where = f"${lookup(name).env_var}"
                values[name] = check_value(name, value, where)
                sources[name] = where
    resolved = Resolved(values=values, sources=sources, settings=settings)
    check_consistent(resolved)
    return resolved


def resolve_settings(
    flags: Mapping[str, Any], env: Mapping[str, str], config_path: str | None = None
) -> Resolved:
    """flag > `ACCEL_<NAME>` variable > scheduler variables > config file > default.

    Args:
        flags: values given on the command line (None: not given).
        config_path: the `--config` flag; None looks for `$ACCEL_CONFIG_FILE`, then the
            default file.
    """
    path = find_config_file(config_path, env)
    layers: list[tuple[str, Mapping[str, Any]]] = [
        ("the command line", flags), (ENVIRONMENT, parse_env(env)), *scheduler_layers(env)]
    if path:
        layers.append((f"config file {path}", load_config(path)))
    return attrs.evolve(merge_layers(*layers), config_file=path)


def check_consistent(resolved: Resolved) -> None:
    """Settings that contradict each other, whichever layers they came from."""
    values = resolved.values
    most_nodes = check_node_range(resolved)
    if values["node_rank"] >= most_nodes:
        raise LaunchEnvironmentError(
            f"node_rank {values['node_rank']} is outside the {most_nodes} node(s); "
            "node ranks go from 0 to num_nodes - 1"
        )
    if most_nodes > 1 and not (values["master_addr"] or values["rdzv_endpoint"]):
        raise LaunchEnvironmentError(
            f"a run over {most_nodes} nodes needs a meeting point: pass --master-addr "
            "(the address of node 0, same on every node) or --rdzv-endpoint HOST:PORT"
        )
    for section in sorted({s.section for s in resolved.settings if s.section}):
        # Options of an engine that will not run would do nothing: say so instead.
        set_here = [s.name for s in resolved.settings
                    if s.section == section and values[s.name] is not None]
        if set_here and values["strategy"] != section:
            raise IncompatibleOptionsError(
                f"{', '.join(set_here)} ({resolved.sources[set_here[0]]}) only apply to "
                f"strategy {section!r}, but strategy is {values['strategy']!r}; set "
                f"strategy = {section!r} or remove the [{section}] options"
            )


def check_node_range(resolved: Resolved) -> int:
    """The most nodes the run may have; an elastic range needs a dynamic rendezvous."""
    values, sources = resolved.values, resolved.sources
    least, most = values["num_nodes"], values["max_nodes"] or values["num_nodes"]
    if most < least:
        raise LaunchEnvironmentError(
            f"max_nodes {most} ({sources['max_nodes']}) is below num_nodes {least} "
            f"({sources['num_nodes']}); pass --nnodes MIN:MAX with MIN <= MAX")
    if most > least and values["rdzv_backend"] in (None, "static"):
        raise LaunchEnvironmentError(
            f"an elastic run of {least} to {most} nodes needs a rendezvous that admits nodes "
            "as they come: pass --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id JOB")
    return most


def training_environment(resolved: Resolved) -> dict[str, str]:
    """`ACCEL_<NAME>` variables carrying the training settings to the launched processes,
    and `ACCEL_SETTING_SOURCES`, where each came from (for `ctx.settings`)."""
    env, sources = {}, {}
    for setting in resolved.settings:
        value = resolved[setting.name]
        if setting.training and value is not None:
            text = ("1" if value else "0") if setting.kind is bool else str(value)
            env[setting.env_var] = text
            sources[setting.name] = [text, resolved.sources[setting.name], value]
    env[SOURCES_VARIABLE] = json.dumps(sources)
    return env


@attrs.frozen
class TrainingSettings(LaunchSettings):
    """The training settings of a launch with their types and sources, and with the
    chosen engine's options (None where unset): what `strategy_config` builds from.

    >>> accel.training_settings().mixed_precision
    'no'
    """

    def strategy_config(self) -> Any:
        """The strategy object for `shard_model` (`accel.FSDP(cpu_offload=True)`, ...);
        None when no strategy was set (shard_model then picks its default)."""
        if self.strategy is None:
            return None
        return strategy_class(self.strategy).from_settings(self)


def typed(settings: LaunchSettings) -> TrainingSettings:
    """`settings` (as `accel.init` read them) with the engine's options converted.

    Raises:
        LaunchEnvironmentError: the strategy is unknown, or an option's text does not
            suit it; the message names the variable (or launch source) that set it.
    """
    given = {name: (value, source) for name, value, source in settings.entries}
    entries = [(s.name, *given.get(s.name, (s.default, DEFAULT))) for s in TRAINING]
    if settings.strategy is not None:
        check_setting(BY_NAME["strategy"], settings.strategy, settings.source("strategy"))
        for option in engine_settings(settings.strategy):
            value, source = given.get(option.name, (option.default, DEFAULT))
            if source != DEFAULT and isinstance(value, str) and option.kind is not str:
                value = from_text(option, value, f"${option.env_var}")
            if source != DEFAULT:
                check_setting(option, value, source)
            entries.append((option.name, value, source))
    return TrainingSettings(entries=tuple(entries))


def launch_strategy(settings: LaunchSettings) -> Any:
    """The strategy object the launch chose, with its engine options; None: none chosen."""
    if not settings.was_set("strategy"):
        return None
    return typed(settings).strategy_config()


def training_settings(env: Mapping[str, str] | None = None) -> TrainingSettings:
    """The training settings `accel launch` passed to this process (or the defaults).

    `accel.init` reads the same into `ctx.settings`, and with_amp, shard_model and
    accumulate_grads take them as their defaults: a script needs this only to read them
    before `init` or to build a strategy itself.

    >>> settings = training_settings()     # in a script run by `accel launch --config run.toml`
    >>> settings.mixed_precision, settings.source("mixed_precision")
    ('bf16', 'config file run.toml')
    """
    check_mapping("training_settings", "env", env,
                  "a mapping of variables (os.environ by default)", optional=True)
    return typed(read_settings(os.environ if env is None else env))
