"""Built-in tensor-parallel plans: module-name patterns -> torch ParallelStyles.

The Llama family of transformers (Llama, Mistral, Qwen2, and any model whose config
declares the same `base_model_tp_plan`) follows torchtitan's plan: attention and MLP
input projections column-wise, output projections row-wise, the embedding row-wise,
the LM head column-wise. With sequence parallelism the norms and the residual stream
between blocks hold a slice of the sequence (Shard(1)); each block gathers it before
attention and the MLP. The embedding's output stays whole, so that transformers can
compute position ids and the causal mask from the full sequence; the first block cuts
it (a local slice, no communication).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from accel.errors import UnsupportedError

#: the projections of transformers' Llama-family decoder layers, by the word in their config.
_LLAMA_LAYER_PLAN = {
    "self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise", "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise",
}


def auto_plan(model: nn.Module, *, sequence_parallel: bool,
              loss_parallel: bool) -> dict[str, ParallelStyle]:
    """The built-in plan for `model`'s class; UnsupportedError naming the class otherwise."""
    if _is_llama_family(model):
        return llama_plan(model, sequence_parallel=sequence_parallel,
                          loss_parallel=loss_parallel)
    raise UnsupportedError(
        f"tensor_parallel(plan='auto') has no plan for {type(model).__name__}; it knows "
        "transformers' Llama-family models (Llama, Mistral, Qwen2) and GPT-2. Pass your "
        "own plan: "
        "{'model.layers.*.self_attn.q_proj': ColwiseParallel(), ...}"
    )


def _is_llama_family(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    declared = getattr(config, "base_model_tp_plan", None) or {}
    wanted = {f"layers.*.{name}": style for name, style in _LLAMA_LAYER_PLAN.items()}
    inner = getattr(model, "model", None)
    return (declared == wanted and inner is not None and hasattr(inner, "layers")
            and hasattr(inner, "embed_tokens"))


def llama_plan(model: nn.Module, *, sequence_parallel: bool,
               loss_parallel: bool) -> dict[str, ParallelStyle]:
    """torchtitan's plan with transformers' names (`model.layers.N.self_attn.q_proj`, ...)."""
    seq = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(),
                                              output_layouts=Replicate()),
        "model.layers.*.self_attn.q_proj": ColwiseParallel(),
        "model.layers.*.self_attn.k_proj": ColwiseParallel(),
        "model.layers.*.self_attn.v_proj": ColwiseParallel(),
        "model.layers.*.self_attn.o_proj": RowwiseParallel(output_layouts=seq),
        "model.layers.*.mlp.gate_proj": ColwiseParallel(),
        "model.layers.*.mlp.up_proj": ColwiseParallel(),
        "model.layers.*.mlp.down_proj": RowwiseParallel(output_layouts=seq),
    }
    if _has_lm_head(model):
        plan["lm_head"] = ColwiseParallel(
            input_layouts=seq, output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel)
    if sequence_parallel:
        plan.update(_sequence_parallel_plan())
    return plan


def _has_lm_head(model: nn.Module) -> bool:
    return isinstance(getattr(model, "lm_head", None), nn.Linear)


def _sequence_parallel_plan() -> dict[str, ParallelStyle]:
    """Norms on sequence slices; blocks gather the sequence before attention and MLP."""
    gather: Any = dict(input_kwarg_layouts={"hidden_states": Shard(1)},
                       desired_input_kwarg_layouts={"hidden_states": Replicate()},
                       use_local_output=True)
    return {
        # The embedding's whole output becomes this rank's slice of the sequence.
        "model.layers.0": PrepareModuleInput(input_layouts=(Replicate(),),
                                             desired_input_layouts=(Shard(1),),
                                             use_local_output=True),
        "model.layers.*.input_layernorm": SequenceParallel(),
        "model.layers.*.self_attn": PrepareModuleInput(**gather),
        "model.layers.*.post_attention_layernorm": SequenceParallel(),
        "model.layers.*.mlp": PrepareModuleInput(input_layouts=(Shard(1),),
                                                 desired_input_layouts=(Replicate(),),
                                                 use_local_output=True),
        "model.norm": SequenceParallel(),
    }
