"""Cutting a model into pipeline stages: its blocks in order, split points, stage modules.

A model accel can pipeline is a sequence of *blocks*, each a few named modules that run
one after the other on one activation tensor: a transformers Llama-family model is
``model.embed_tokens, model.layers.0 ... model.layers.N-1, model.norm, lm_head``; GPT-2 is
``transformer.wte (+ wpe), transformer.h.0 ..., transformer.ln_f, lm_head``; an
nn.Sequential is its children. A split point names the block a stage begins with.

Each stage runs in a *stage module* that holds its blocks (the model's own module
objects, under short names of its own) and knows how to run them: recomputing the causal
mask and position embeddings from the activation it receives, so that only the hidden
states travel between ranks. The blocks of stages other ranks run are moved to the meta
device: the model keeps its structure and names, not their memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import nn

from accel.errors import IncompatibleOptionsError, InvalidArgumentError, UnsupportedError


@attrs.frozen
class Block:
    """One unit of splitting: `name` (a split point may name it) and the modules it holds."""

    name: str
    modules: tuple[str, ...]
    #: "first" (before the repeated layers), "layer" or "last" (after them).
    kind: str = "layer"


class Family:
    """How one kind of model splits into blocks and how a run of its blocks is executed."""

    name = "model"

    def blocks(self, model: nn.Module) -> list[Block]:
        raise NotImplementedError

    def stage_module(self, model: nn.Module, blocks: Sequence[Block]) -> nn.Module:
        raise NotImplementedError


class SequentialFamily(Family):
    """An nn.Sequential: each child is a block; a stage is an nn.Sequential of its children."""

    name = "nn.Sequential"

    def blocks(self, model: nn.Module) -> list[Block]:
        return [Block(name, (name,)) for name, _ in model.named_children()]

    def stage_module(self, model: nn.Module, blocks: Sequence[Block]) -> nn.Module:
        return nn.Sequential(*(model.get_submodule(block.name) for block in blocks))


class _DecoderStage(nn.Module):
    """Embeddings (first stage), decoder layers, final norm and head (last stage).

    Each stage rebuilds the causal mask and positions from its input's shape, as the
    whole model's forward does once: only hidden states cross between stages.
    """

    def __init__(self, config: Any, first: dict[str, nn.Module], layers: list[nn.Module],
                 last: dict[str, nn.Module], extra: dict[str, nn.Module]):
        super().__init__()
        self.config = config
        for name, module in {**first, **extra}.items():
            self.add_module(name, module)
        self.layers = nn.ModuleList(layers)
        for name, module in last.items():
            self.add_module(name, module)
        self.first, self.last = tuple(first), tuple(last)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        if self.first:
            hidden = self.embed(hidden, positions)
        if len(self.layers):
            hidden = self.run_layers(hidden, positions)
        for name in self.last:
            hidden = getattr(self, name)(hidden)
        return hidden

    def causal_mask(self, hidden: torch.Tensor, positions: torch.Tensor) -> Any:
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(config=self.config, inputs_embeds=hidden,
                                  attention_mask=None, cache=None, position_ids=positions)

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _LlamaStage(_DecoderStage):
    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mask = self.causal_mask(hidden, positions)
        rope = self.rotary_emb(hidden, position_ids=positions)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rope,
                           position_ids=positions)
        return hidden


class _GPT2Stage(_DecoderStage):
    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.drop(self.wte(ids) + self.wpe(positions))

    def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mask = self.causal_mask(hidden, positions)
        for block in self.layers:
            hidden = block(hidden, None, mask, position_ids=positions)
        return hidden


class _DecoderFamily(Family):
    """A transformers decoder: `inner` (under `prefix`) holds embeddings, layers, norm."""

    stage_class: type[_DecoderStage] = _DecoderStage
    inner_name = ""  # the attribute of a *ForCausalLM / *LMHeadModel holding the decoder
    layers_name = ""
    first: tuple[str, ...] = ()  # inner's modules before the layers, by stage attribute
    last = ""  # inner's final norm
    extra: tuple[str, ...] = ()  # inner's parameter-free modules every stage needs

    def _inner(self, model: nn.Module) -> tuple[nn.Module, str]:
        inner = getattr(model, self.inner_name, None)
        return (inner, f"{self.inner_name}.") if isinstance(inner, nn.Module) else (model, "")

    def matches(self, model: nn.Module) -> bool:
        inner, _ = self._inner(model)
        needed = (*self.first, self.last, *self.extra)
        return (hasattr(model, "config") and isinstance(getattr(inner, self.layers_name, None),
                                                        nn.ModuleList)
                and all(isinstance(getattr(inner, name, None), nn.Module) for name in needed))

    def blocks(self, model: nn.Module) -> list[Block]:
        inner, prefix = self._inner(model)
        layers = getattr(inner, self.layers_name)
        found = [Block(f"{prefix}{self.first[0]}",
                       tuple(f"{prefix}{name}" for name in self.first), "first")]
        found += [Block(f"{prefix}{self.layers_name}.{i}", (f"{prefix}{self.layers_name}.{i}",))
                  for i in range(len(layers))]
        found.append(Block(f"{prefix}{self.last}", (f"{prefix}{self.last}",), "last"))
        if isinstance(getattr(model, "lm_head", None), nn.Module):
            found.append(Block("lm_head", ("lm_head",), "last"))
        return found

    def stage_module(self, model: nn.Module, blocks: Sequence[Block]) -> nn.Module:
        inner, prefix = self._inner(model)
        names = {name for block in blocks for name in block.modules}
        first = {name: getattr(inner, name) for name in self.first if prefix + name in names}
        layers = [model.get_submodule(block.name) for block in blocks if block.kind == "layer"]
        last = {attr: model.get_submodule(path) for attr, path in
                (("norm", prefix + self.last), ("lm_head", "lm_head")) if path in names}
        extra = {name: getattr(inner, name) for name in self.extra}
        return self.stage_class(model.config, first, layers, last, extra)


class LlamaFamily(_DecoderFamily):
    name = "transformers Llama family"
    stage_class = _LlamaStage
    inner_name, layers_name = "model", "layers"
    first, last, extra = ("embed_tokens",), "norm", ("rotary_emb",)


class GPT2Family(_DecoderFamily):
    name = "transformers GPT-2"
    stage_class = _GPT2Stage
    inner_name, layers_name = "transformer", "h"
    first, last, extra = ("wte", "wpe", "drop"), "ln_f", ()

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__.startswith("GPT2") and super().matches(model)


_FAMILIES: tuple[Family, ...] = (LlamaFamily(), GPT2Family())


def family_of(model: nn.Module) -> Family:
    """The family that knows how to split `model`; UnsupportedError naming the class."""
    if isinstance(model, nn.Sequential):
        return SequentialFamily()
    for family in _FAMILIES:
        if family.matches(model):
            return family
    raise UnsupportedError(
        f"pipeline_parallel cannot split a {type(model).__name__}: it knows nn.Sequential "
        "(each child a block) and transformers' Llama family (Llama, Mistral, Qwen2) and "
        "GPT-2. Write your model as an nn.Sequential of blocks that each take and return "
        "one tensor")


def plan_stages(blocks: list[Block], split_points: Sequence[str] | str,
                stages: int) -> list[list[Block]]:
    """The blocks of each stage, in order; `split_points` names where stages begin."""
    layers = [block for block in blocks if block.kind == "layer"]
    if isinstance(split_points, str):  # "auto": the caller checked the word
        if stages > len(layers):
            raise IncompatibleOptionsError(
                f"pipeline_parallel: {stages} stages (pp size x stages_per_rank) but the "
                f"model has {_count(len(layers), 'layer')} to share; use fewer stages (a "
                "smaller pp dimension or stages_per_rank) or a deeper model")
        split_points = _auto_split_points(layers, stages)
    starts = _split_indices(blocks, list(split_points), stages)
    bounds = [0, *starts, len(blocks)]
    return [blocks[begin:end] for begin, end in zip(bounds, bounds[1:], strict=False)]


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _auto_split_points(layers: list[Block], stages: int) -> list[str]:
    """Equal groups of layers (the first stages take one more where they do not divide)."""
    size, extra = divmod(len(layers), stages)
    points, index = [], 0
    for stage in range(stages - 1):
        index += size + (1 if stage < extra else 0)
        points.append(layers[index].name)
    return points


def _split_indices(blocks: list[Block], points: list[str], stages: int) -> list[int]:
    names = [block.name for block in blocks]
    if stages > len(blocks):
        raise IncompatibleOptionsError(
            f"pipeline_parallel: {stages} stages but the model has only {len(blocks)} blocks "
            f"({names}); use fewer stages")
    if len(points) != stages - 1:
        raise IncompatibleOptionsError(
            f"pipeline_parallel: split_points={points} makes {len(points) + 1} stages, but "
            f"the pp dimension x stages_per_rank needs {stages}: give {stages - 1} split "
            "points, or split_points='auto'")
    unknown = [point for point in points if point not in names[1:]]
    if unknown:
        raise InvalidArgumentError(
            f"pipeline_parallel: split_points {unknown} name no block a stage can begin "
            f"with; the blocks of this model are {_shortened(names)} (the first begins "
            "stage 0 already)")
    indices = [names.index(point) for point in points]
    if indices != sorted(set(indices)):
        raise InvalidArgumentError(
            f"pipeline_parallel: split_points {points} must follow the model's order, each "
            "once (each names the first block of the next stage)")
    return indices


def _shortened(names: list[str]) -> str:
    return str(names) if len(names) <= 8 else f"[{', '.join(names[:6])}, ..., {names[-1]}]"


def check_no_ties_across(model: nn.Module, stages: list[list[Block]]) -> None:
    """A parameter shared by blocks of two stages (tied embeddings) cannot be split."""
    owner: dict[int, tuple[int, str]] = {}
    for index, blocks in enumerate(stages):
        for block in blocks:
            for path in block.modules:
                for name, param in model.get_submodule(path).named_parameters():
                    first = owner.setdefault(id(param), (index, f"{path}.{name}"))
                    if first[0] != index:
                        raise UnsupportedError(
                            f"pipeline_parallel: {path}.{name} is {first[1]} (tied weights), "
                            f"but they fall on stages {first[0]} and {index}; untie them "
                            "(transformers: config.tie_word_embeddings=False) or put both "
                            "blocks on one stage")
    for name, param in model.named_parameters():
        if id(param) not in owner:
            raise UnsupportedError(
                f"pipeline_parallel: the parameter {name} belongs to no block of this "
                f"{type(model).__name__}, so no stage would run it")


def drop_blocks(model: nn.Module, blocks: list[Block]) -> None:
    """Move `blocks` to the meta device (no memory; names and shapes stay), frozen."""
    for block in blocks:
        for path in block.modules:
            module = model.get_submodule(path).to("meta")
            for param in module.parameters():
                param.requires_grad_(False)
