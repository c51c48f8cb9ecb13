"""estimate_memory: what a model weighs per dtype, and what training it with Adam takes,
from a factory or a Hugging Face config.json on disk — no weights, no network.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from torch import nn

from accel.errors import InvalidArgumentError, MissingDependencyError
from accel.inference.blocks import iter_blocks, no_split_classes
from accel.inference.empty import init_empty_weights
from accel.inference.memory import format_size
from accel.validation import check_type

#: Bytes per floating weight for each dtype the estimate knows.
BYTES_PER_WEIGHT = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "int8": 1.0, "int4": 0.5}
DEFAULT_DTYPES = ("float32", "bfloat16", "int8", "int4")
# Adam training, per parameter, as ZeRO counts it (activations not included):
# fp32: weights 4 + gradients 4 + Adam's two moments 8;
# fp16/bf16 mixed precision: weights 2 + gradients 2 + fp32 master weights 4 + moments 8.
ADAM_BYTES_PER_PARAMETER = {"float32": 16, "float16": 16, "bfloat16": 16}


@dataclasses.dataclass(frozen=True)
class DtypeEstimate:
    """Sizes at one dtype; `training_bytes` is None where Adam training does not apply."""

    dtype: str
    total_bytes: int
    largest_layer_bytes: int
    training_bytes: int | None


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """What a model weighs: parameter count, largest layer, and sizes per dtype."""

    model: str
    parameters: int
    largest_layer: str
    rows: tuple[DtypeEstimate, ...]

    def table(self) -> str:
        """The estimate as a readable table (what `accel estimate-memory` prints)."""
        header = ("dtype", "total size", "largest layer", "training with Adam")
        cells = [header] + [
            (row.dtype, format_size(row.total_bytes), format_size(row.largest_layer_bytes),
             format_size(row.training_bytes) if row.training_bytes is not None else "-")
            for row in self.rows
        ]
        widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
        lines = [f"{self.model}: {self.parameters:,} parameters; largest layer: "
                 f"{self.largest_layer or '(the whole model)'}"]
        for line in cells:
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths,
                                                                             strict=True)))
        lines.append("training with Adam: weights, gradients, Adam's two fp32 moments and, "
                     "for 16-bit dtypes, fp32 master weights; activations not included")
        return "\n".join(line.rstrip() for line in lines)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def estimate_memory(model: nn.Module | Callable[[], nn.Module] | str | os.PathLike[str],
                    dtypes: Sequence[str] = DEFAULT_DTYPES,
                    no_split_module_classes: Iterable[str] | None = None) -> MemoryEstimate:
    """Memory a model needs, per dtype: total, largest layer, and training with Adam.

    Args:
        model: a module (meta is fine); a function building one; "package.module:function";
            or a Hugging Face config.json (or its folder), built with transformers offline.
            Factories and configs are built under `init_empty_weights`: nothing allocated.
        dtypes: among float32, float16, bfloat16, int8, int4.
        no_split_module_classes: what a "layer" is (default: the model's own list).

    >>> print(accel.estimate_memory("gpt2/config.json").table())
    GPT2LMHeadModel: 124,439,808 parameters; largest layer: transformer.wte
    dtype     total size  largest layer  training with Adam
    float32   474.70 MiB  147.26 MiB     1.85 GiB
    """
    # A str is a Sequence too: "float16" would be read as the dtypes "f", "l", "o", ...
    check_type("estimate_memory", "dtypes", dtypes, (list, tuple),
               f"a list of dtype names among {list(BYTES_PER_WEIGHT)}")
    unknown = [d for d in dtypes if not isinstance(d, str) or d not in BYTES_PER_WEIGHT]
    if unknown or not dtypes:
        raise InvalidArgumentError(f"unknown dtypes {unknown or list(dtypes)}; choose among "
                                   f"{list(BYTES_PER_WEIGHT)}")
    built = build_model(model)
    params = list({id(p): p for p in built.parameters()}.values())
    buffers = list({id(b): b for b in built.buffers()}.values())
    count = sum(p.numel() for p in params)
    layer_name, layer_count = _largest_layer(built, no_split_classes(built,
                                                                     no_split_module_classes))
    rows = []
    for dtype in dtypes:
        per_weight = BYTES_PER_WEIGHT[dtype]
        fixed = sum(t.numel() * t.element_size() for t in [*params, *buffers]
                    if not t.is_floating_point())
        floating = sum(t.numel() for t in [*params, *buffers] if t.is_floating_point())
        total = int(floating * per_weight) + fixed
        training = ADAM_BYTES_PER_PARAMETER.get(dtype)
        rows.append(DtypeEstimate(dtype, total, int(layer_count * per_weight),
                                  count * training + total - int(count * per_weight)
                                  if training else None))
    return MemoryEstimate(type(built).__name__, count, layer_name, tuple(rows))


def _largest_layer(model: nn.Module, no_split: frozenset[str]) -> tuple[str, int]:
    best = ("", 0)
    for name, module, direct_only in iter_blocks(model, "", no_split):
        count = sum(p.numel() for p in {id(p): p for p in
                                        module.parameters(recurse=not direct_only)}.values())
        if count > best[1]:
            best = (name, count)
    return best


def build_model(source: nn.Module | Callable[[], nn.Module] | str | os.PathLike[str]
                ) -> nn.Module:
    """A model (on meta) from a module, a factory, "module:function", or a config.json."""
    if isinstance(source, nn.Module):
        return source
    if isinstance(source, (str, os.PathLike)) and Path(source).exists():
        return _from_hf_config(Path(source))
    if isinstance(source, str):
        source = _import_factory(source)
    if not callable(source):
        raise InvalidArgumentError(
            f"cannot build a model from {source!r}: pass a module, a function, "
            "'package.module:function', or the path of a config.json"
        )
    with init_empty_weights():
        built = source()
    if not isinstance(built, nn.Module):
        raise InvalidArgumentError(f"the factory returned a {type(built).__name__}, not a "
                                   "torch.nn.Module")
    return built


def _import_factory(spec: str) -> Callable[[], nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InvalidArgumentError(
            f"{spec!r} is neither an existing config.json nor 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgumentError(f"cannot import {module_name!r} for {spec!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise InvalidArgumentError(f"{module_name} has no attribute {attr!r}")
    return factory


def _from_hf_config(path: Path) -> nn.Module:
    config_file = path / "config.json" if path.is_dir() else path
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError("transformers", "dev",
                                     "Estimating memory from a config.json") from exc
    try:
        values = json.loads(config_file.read_text())
        model_type = values.pop("model_type")
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidArgumentError(
            f"{config_file} is not a Hugging Face config.json (with a model_type): {exc}"
        ) from exc
    config = transformers.AutoConfig.for_model(model_type, **values)
    architecture = (values.get("architectures") or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    with init_empty_weights():
        if model_class is not None:
            return model_class(config)
        return transformers.AutoModel.from_config(config)
