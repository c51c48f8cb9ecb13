"""Every setting of a run, and the one precedence that resolves it everywhere.

Precedence, highest first: command-line flag > environment variable (`ACCEL_<NAME>`) >
config file (TOML) > default. `accel launch`, `accel env` and `accel config show` all
resolve through `resolve_settings`, so they never disagree. The config file is the one
`--config` names, else `$ACCEL_CONFIG_FILE`, else `~/.cache/accel/config.toml` when it
exists. Training settings reach the launched processes as `ACCEL_<NAME>` variables, which
`training_settings()` reads back. See docs/configuration.md for the table.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from accel.backends import builtin_names, strategy_class
from accel.errors import IncompatibleOptionsError, LaunchEnvironmentError
from accel.validation import check_mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

CONFIG_FILE_VARIABLE = "ACCEL_CONFIG_FILE"
DEFAULT = "default"
#: the source of the environment layer; each value's source is then its variable's name.
ENVIRONMENT = "the environment"
#: the strategies a name selects (accel.Custom needs a function, not a name).
STRATEGIES = tuple(name for name in builtin_names() if name != "custom")
PRECISIONS = ("no", "fp16", "bf16", "fp8")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@attrs.frozen
class Setting:
    """One option: its type, default and where it lives in the config file."""

    name: str
    kind: type
    default: Any
    help: str
    #: whether the launched processes receive it (as the variable `env_var`).
    training: bool = False
    choices: tuple[Any, ...] | None = None
    minimum: int | None = None
    #: the TOML table holding it (`[deepspeed]`), None for the top level.
    section: str | None = None

    @property
    def env_var(self) -> str:
        return "ACCEL_" + self.name.upper()

    @property
    def key(self) -> str:
        """The key inside its TOML table: `stage` for `deepspeed_stage`."""
        return self.name[len(self.section) + 1:] if self.section else self.name


SETTINGS: tuple[Setting, ...] = (
    Setting("num_processes", int, None, "processes per machine (default: one per GPU, "
            "else 1)", minimum=1),
    Setting("num_nodes", int, 1, "number of machines", minimum=1),
    Setting("node_rank", int, 0, "this machine's index, 0..num_nodes-1", minimum=0),
    Setting("master_addr", str, None, "address of the machine with node_rank 0"),
    Setting("master_port", int, None, "port on the machine with node_rank 0", minimum=1),
    Setting("rdzv_backend", str, None, "torch elastic rendezvous backend, e.g. c10d"),
    Setting("rdzv_endpoint", str, None, "rendezvous HOST:PORT"),
    Setting("rdzv_id", str, None, "job id shared by all nodes of one rendezvous"),
    Setting("max_restarts", int, 0, "restarts of the worker group on failure", minimum=0),
    Setting("allow_unconnected", bool, False, "do not fail ranks that never join the others"),
    Setting("strategy", str, None, "engine for shard_model (default: ddp on 2+ processes, "
            "else single)", training=True, choices=STRATEGIES),
    Setting("mixed_precision", str, "no", "precision for with_amp", training=True,
            choices=PRECISIONS),
    Setting("grad_accum_steps", int, 1, "micro-batches per optimizer update",
            training=True, minimum=1),
    Setting("device", str, None, "device override for accel.init (cpu, cuda, mps, xla)",
            training=True),
    Setting("debug", bool, False, "check shapes across ranks before collectives",
            training=True),
    Setting("deepspeed_stage", int, None, "ZeRO stage 1, 2 or 3", training=True,
            choices=(1, 2, 3), section="deepspeed"),
    Setting("deepspeed_offload_optimizer", bool, None, "optimizer state on the CPU",
            training=True, section="deepspeed"),
    Setting("deepspeed_offload_params", bool, None, "parameters on the CPU (stage 3)",
            training=True, section="deepspeed"),
    Setting("fsdp_reshard_after_forward", bool, None, "free gathered parameters after "
            "forward", training=True, section="fsdp"),
    Setting("fsdp_cpu_offload", bool, None, "shards, gradients and optimizer state on the "
            "CPU", training=True, section="fsdp"),
    Setting("fsdp_activation_checkpointing", bool, None, "recompute activations in "
            "backward", training=True, section="fsdp"),
)
BY_NAME: Mapping[str, Setting] = {setting.name: setting for setting in SETTINGS}
SECTIONS = ("deepspeed", "fsdp")


@attrs.frozen
class Resolved:
    """Each setting's effective value and where it came from ("default", a flag, ...)."""

    values: Mapping[str, Any]
    sources: Mapping[str, str]
    config_file: str | None = None

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def rows(self) -> list[tuple[str, Any, str]]:
        """`(name, value, source)` for every setting, in table order."""
        return [(s.name, self.values[s.name], self.sources[s.name]) for s in SETTINGS]


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
            if key not in SECTIONS:
                raise LaunchEnvironmentError(
                    f"config file {os.fspath(path)!r} has the unknown table [{key}]; known "
                    f"tables: {', '.join(f'[{s}]' for s in SECTIONS)}"
                )
            flat.update({f"{key}_{inner}": item for inner, item in value.items()})
        else:
            flat[key] = value
    return flat


def parse_env(env: Mapping[str, str]) -> dict[str, Any]:
    """The settings set by `ACCEL_<NAME>` variables, converted to their types."""
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = env.get(setting.env_var, "")
        if raw != "":
            values[setting.name] = _from_text(setting, raw, f"${setting.env_var}")
    return values


def _from_text(setting: Setting, raw: str, source: str) -> Any:
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


def check_value(name: str, value: Any, source: str) -> Any:
    """`value` if it suits setting `name`; else a LaunchEnvironmentError naming `source`."""
    if name not in BY_NAME:
        raise LaunchEnvironmentError(
            f"{source} sets the unknown option {name!r}; known options: "
            f"{', '.join(sorted(BY_NAME))}"
        )
    setting = BY_NAME[name]
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


def merge_layers(*layers: tuple[str, Mapping[str, Any]]) -> Resolved:
    """Merge `(source, {name: value})` layers, highest precedence first; None is "not set".

    >>> resolved = merge_layers(("flag", {"num_processes": 4}), ("file", {"num_processes": 2}))
    >>> resolved["num_processes"], resolved.sources["num_processes"]
    (4, 'flag')
    """
    values = {s.name: s.default for s in SETTINGS}
    sources = dict.fromkeys(values, DEFAULT)
    for source, layer in reversed(layers):
        for name, value in layer.items():
            if value is not None:
                where = source
                if source == ENVIRONMENT and name in BY_NAME:
                    where = f"${BY_NAME[name].env_var}"
                values[name] = check_value(name, value, where)
                sources[name] = where
    resolved = Resolved(values=values, sources=sources)
    check_consistent(resolved)
    return resolved


def resolve_settings(
    flags: Mapping[str, Any], env: Mapping[str, str], config_path: str | None = None
) -> Resolved:
    """flag > `ACCEL_<NAME>` variable > config file > default, for every setting.

    Args:
        flags: values given on the command line (None: not given).
        config_path: the `--config` flag; None looks for `$ACCEL_CONFIG_FILE`, then the
            default file.
    """
    path = find_config_file(config_path, env)
    layers: list[tuple[str, Mapping[str, Any]]] = [
        ("the command line", flags), (ENVIRONMENT, parse_env(env))]
    if path:
        layers.append((f"config file {path}", load_config(path)))
    return attrs.evolve(merge_layers(*layers), config_file=path)


def check_consistent(resolved: Resolved) -> None:
    """Settings that contradict each other, whichever layers they came from."""
    values = resolved.values
    if values["node_rank"] >= values["num_nodes"]:
        raise LaunchEnvironmentError(
            f"node_rank {values['node_rank']} is outside the {values['num_nodes']} node(s); "
            "node ranks go from 0 to num_nodes - 1"
        )
    if values["num_nodes"] > 1 and not (values["master_addr"] or values["rdzv_endpoint"]):
        raise LaunchEnvironmentError(
            f"a run over {values['num_nodes']} nodes needs a meeting point: pass --master-addr "
            "(the address of node 0, same on every node) or --rdzv-endpoint HOST:PORT"
        )
    for section in SECTIONS:
        # Options of an engine that will not run would do nothing: say so instead.
        set_here = [s.name for s in SETTINGS if s.section == section and values[s.name] is not None]
        if set_here and values["strategy"] != section:
            raise IncompatibleOptionsError(
                f"{', '.join(set_here)} ({resolved.sources[set_here[0]]}) only apply to "
                f"strategy {section!r}, but strategy is {values['strategy']!r}; set "
                f"strategy = {section!r} or remove the [{section}] options"
            )


def training_environment(resolved: Resolved) -> dict[str, str]:
    """`ACCEL_<NAME>` variables carrying the training settings to the launched processes."""
    env = {}
    for setting in SETTINGS:
        value = resolved[setting.name]
        if setting.training and value is not None:
            env[setting.env_var] = ("1" if value else "0") if setting.kind is bool else str(value)
    return env


@attrs.frozen
class TrainingSettings:
    """The training settings a launch passed down (`ACCEL_*` variables), with defaults."""

    strategy: str | None = None
    mixed_precision: str = "no"
    grad_accum_steps: int = 1
    device: str | None = None
    debug: bool = False
    deepspeed_stage: int | None = None
    deepspeed_offload_optimizer: bool | None = None
    deepspeed_offload_params: bool | None = None
    fsdp_reshard_after_forward: bool | None = None
    fsdp_cpu_offload: bool | None = None
    fsdp_activation_checkpointing: bool | None = None

    def strategy_config(self) -> Any:
        """The strategy object for `shard_model` (`accel.FSDP(cpu_offload=True)`, ...);
        None when no strategy was set (shard_model then picks its default)."""
        if self.strategy is None:
            return None
        return strategy_class(self.strategy).from_settings(self)


def training_settings(env: Mapping[str, str] | None = None) -> TrainingSettings:
    """The training settings `accel launch` passed to this process (or the defaults).

    >>> settings = training_settings()     # in a script run by `accel launch --config run.toml`
    >>> model, ctx = accel.with_amp(model, ctx, dtype=settings.mixed_precision)
    """
    check_mapping("training_settings", "env", env,
                  "a mapping of variables (os.environ by default)", optional=True)
    values = parse_env(os.environ if env is None else env)
    fields = attrs.fields_dict(TrainingSettings)
    for name, value in values.items():
        if name in fields:
            check_value(name, value, f"${BY_NAME[name].env_var}")
    return TrainingSettings(**{name: v for name, v in values.items() if name in fields})
