"""Attention on the meta device counted as a fused kernel runs it, not as its decomposition.

On meta, ``scaled_dot_product_attention`` has no fused kernel to dispatch to, so it runs its math decomposition: the
full b x h x q x s score matrix, its softmax, scaled copies of Q and K. The fused kernels that run on CPUs and GPUs
(FlashAttention, Dao et al. 2022, Alg. 1; PyTorch's CPU flash kernel, which this host's SDPA chooses for float32,
bfloat16 and float16, with or without a mask, GQA included) allocate only the output and one float32 log-sum-exp
per query row; a boolean mask is first turned into an additive one of the query's element type. Inside
:func:`fused_attention`, SDPA on meta tensors does exactly that where this host's SDPA would choose a fused kernel
for CPU tensors of the same shapes and types (``torch._fused_sdp_choice``; otherwise the decomposition is what
runs, and is counted), through the CPU flash kernel's own meta function,
and reports the FLOPs the decomposition would have shown (QK^T and PV, 2*b*h*q*s*(e_qk + e_v)), which the flop
counter does not count for the fused kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["fused_attention"]


def _stand_in(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor of ``tensor``'s shape and type over one row of memory (strides 0 but the last)."""
    row = torch.empty(tensor.shape[-1] if tensor.dim() else 1, dtype=tensor.dtype)
    return row.as_strided(tensor.shape, (0,) * (tensor.dim() - 1) + (1,)) if tensor.dim() else row[0]


def _fused_on_cpu(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                  dropout: float, causal: bool, scale: float | None, gqa: bool) -> bool:
    """Whether SDPA on CPU tensors of these shapes and types picks a fused kernel (else its math path, which the
    decomposition on meta then counts as it is)."""
    choice = torch._fused_sdp_choice(_stand_in(query), _stand_in(key), _stand_in(value),
                                     None if mask is None else _stand_in(mask), dropout, causal, scale=scale,
                                     enable_gqa=gqa)
    return bool(choice != torch.nn.attention.SDPBackend.MATH.value)


@contextmanager
def fused_attention(add_flops: Callable[[float], None]) -> Iterator[None]:
    """SDPA on meta tensors as the fused kernel: its output and log-sum-exp; ``add_flops`` gets its FLOPs."""
    original = F.scaled_dot_product_attention

    def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
             enable_gqa: bool = False, **kwargs: Any) -> torch.Tensor:
        if query.device.type != "meta" or kwargs or not _fused_on_cpu(query, key, value, attn_mask, dropout_p,
                                                                      is_causal, scale, enable_gqa):
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa, **kwargs)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            zero = torch.zeros((), dtype=query.dtype, device=query.device)
            attn_mask = torch.where(attn_mask, zero, torch.full((), -math.inf, dtype=query.dtype,
                                                                device=query.device))
        output: torch.Tensor
        output, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
        rows = math.prod(query.shape[:-1])
        add_flops(2.0 * rows * key.shape[-2] * (query.shape[-1] + value.shape[-1]))
        return output

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
