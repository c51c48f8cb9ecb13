"""Ring attention over the `cp` dimension: causal attention on sequence-sharded q, k, v.

Each rank holds two chunks of every sequence (the head-tail load balance: rank r of n
holds chunks r and 2n-1-r of 2n, so every rank does the same causal work). The key and
value chunks travel round the ring, and the partial results merge through their
log-sum-exp, as torch's context parallelism does. torch's own entry point dispatches
only CUDA kernels; this one also runs torch's CPU flash-attention kernel, so context
parallelism trains and is tested on CPU as well.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor.experimental._context_parallel import _attention as ring

from accel.errors import UnsupportedError

aten = torch.ops.aten


def ring_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   group: dist.ProcessGroup, *, scale: float | None = None) -> torch.Tensor:
    """Causal attention of this rank's query chunks against the whole ring's keys.

    Tensors are (batch, heads, local sequence, head dim), sharded head-tail over `group`.
    """
    return _RingAttention.apply(query, key, value, group, scale)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                group: dist.ProcessGroup, scale: float | None) -> torch.Tensor:
        kernel = _kernel(query)
        with _load_balanced():
            out, logsumexp, *rest = ring._templated_ring_attention(
                group, 2, kernel.forward, query, key, value, is_causal=True,
                **kernel.forward_kwargs(scale))
        ctx.save_for_backward(query, key, value, out, logsumexp, *kernel.saved(rest))
        ctx.group, ctx.scale, ctx.kernel = group, scale, kernel
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        query, key, value, out, logsumexp, *saved = ctx.saved_tensors
        kernel = ctx.kernel
        with _load_balanced():
            grads = ring._templated_ring_attention_backward(
                ctx.group, 2, kernel.backward, grad_out=grad_out.contiguous(),
                grad_out_name=kernel.grad_out_name, query=query, key=key, value=value,
                out=out, logsumexp=logsumexp, is_causal=True,
                **kernel.backward_kwargs(saved, ctx.scale))
        return grads[0], grads[1], grads[2], None, None


class _CpuFlash:
    """torch's CPU flash-attention kernel: (out, logsumexp) forward."""

    forward = aten._scaled_dot_product_flash_attention_for_cpu
    backward = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    grad_out_name = "grad_out"

    @staticmethod
    def forward_kwargs(scale: float | None) -> dict[str, Any]:
        return {"dropout_p": 0.0, "scale": scale}

    @staticmethod
    def saved(rest: list[Any]) -> list[Any]:
        return []

    @staticmethod
    def backward_kwargs(saved: list[Any], scale: float | None) -> dict[str, Any]:
        return {"dropout_p": 0.0, "scale": scale}


class _CudaFlash(_CpuFlash):
    """The CUDA flash kernel (fp16 / bf16): the CPU kernel's forward arguments, and the
    sequence bookkeeping its backward needs back."""

    forward = aten._scaled_dot_product_flash_attention
    backward = aten._scaled_dot_product_flash_attention_backward.default

    @staticmethod
    def saved(rest: list[Any]) -> list[Any]:
        cum_seq_q, cum_seq_k, max_q, max_k, philox_seed, philox_offset = rest[:6]
        return [cum_seq_q, cum_seq_k, torch.tensor(max_q), torch.tensor(max_k),
                philox_seed, philox_offset]

    @staticmethod
    def backward_kwargs(saved: list[Any], scale: float | None) -> dict[str, Any]:
        cum_seq_q, cum_seq_k, max_q, max_k, philox_seed, philox_offset = saved
        return {"cum_seq_q": cum_seq_q, "cum_seq_k": cum_seq_k, "max_q": int(max_q),
                "max_k": int(max_k), "dropout_p": 0.0, "philox_seed": philox_seed,
                "philox_offset": philox_offset, "scale": scale}


class _CudaEfficient:
    """The CUDA memory-efficient kernel, for fp32 (flash takes only half precision)."""

    forward = aten._scaled_dot_product_efficient_attention
    backward = aten._scaled_dot_product_efficient_attention_backward.default
    grad_out_name = "grad_out_"

    @staticmethod
    def forward_kwargs(scale: float | None) -> dict[str, Any]:
        return {"attn_bias": None, "compute_log_sumexp": True, "dropout_p": 0.0,
                "scale": scale}

    @staticmethod
    def saved(rest: list[Any]) -> list[Any]:
        return list(rest[:2])  # philox seed and offset

    @staticmethod
    def backward_kwargs(saved: list[Any], scale: float | None) -> dict[str, Any]:
        philox_seed, philox_offset = saved
        return {"attn_bias": None, "philox_seed": philox_seed,
                "philox_offset": philox_offset, "dropout_p": 0.0,
                "grad_input_mask": (True, True, True, False), "scale": scale}


def _kernel(query: torch.Tensor) -> Any:
    if query.device.type == "cpu":
        return _CpuFlash
    if query.device.type == "cuda":
        return _CudaFlash if query.dtype in (torch.float16, torch.bfloat16) else _CudaEfficient
    raise UnsupportedError(
        f"context parallelism runs its attention on CPU or CUDA tensors, not on "
        f"{query.device.type}; train without a cp dimension on this device"
    )


class _load_balanced:
    """torch's ring reads one global switch for the head-tail layout; set it for one call."""

    def __enter__(self) -> None:
        self.before = ring._cp_options.enable_load_balance
        ring._cp_options.enable_load_balance = True

    def __exit__(self, *exc: object) -> None:
        ring._cp_options.enable_load_balance = self.before
