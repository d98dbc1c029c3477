"""A clean decoder-only transformer for the ``dense`` and ``llama`` families (sources/families.py).

Module names match the analytical layer tables: ``embed``, ``layers.N``, ``head``; so do the parameter counts,
layer for layer (tests/test_torch_profile.py). Attention is the naive kind (scores materialised), with a
pre-allocated KV cache for decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from cachefit.sources.families import DenseSpec, LlamaSpec

__all__ = ["TORCH_DTYPES", "KVCache", "ModelConfig", "Transformer", "build_model"]

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2, "int8": torch.int8}
ROPE_THETA = 10000.0   # RoFormer (Su et al. 2021); Llama-3 uses 500000, which changes no byte count


@dataclass(frozen=True, slots=True)
class ModelConfig:
    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp_hidden: int
    vocab: int
    tie_embeddings: bool

    @classmethod
    def of(cls, spec: DenseSpec | LlamaSpec) -> ModelConfig:
        if isinstance(spec, DenseSpec):
            return cls("dense", spec.layers, spec.model_dim, spec.heads, spec.heads, spec.head_dim,
                       spec.mlp_hidden, spec.vocab, spec.tie_embeddings)
        return cls("llama", spec.layers, spec.hidden, spec.heads, spec.kv_heads, spec.dim_per_head,
                   spec.ffn_hidden, spec.vocab, spec.tie_embeddings)

    @property
    def llama(self) -> bool:
        return self.family == "llama"


class KVCache:
    """Keys and values of one attention layer for ``batch`` sequences of up to ``length`` tokens, pre-allocated."""

    def __init__(self, batch: int, kv_heads: int, length: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.keys = torch.zeros(batch, kv_heads, length, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def rows(self, start: int, stop: int) -> KVCache:
        """The cache of sequences ``start..stop-1``: a view, no copy (micro-batches share one allocation)."""
        view = KVCache.__new__(KVCache)
        view.keys, view.values = self.keys[start:stop], self.values[start:stop]
        return view


def _rope(x: torch.Tensor, position: int) -> torch.Tensor:
    """Rotary position embedding (rotate-half form) for x of shape [..., q, e] at positions position.."""
    half = x.shape[-1] // 2
    frequencies = ROPE_THETA ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = torch.arange(position, position + x.shape[-2], device=x.device, dtype=torch.float32)[:, None]
    angles = angles * frequencies
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.heads, config.kv_heads, config.head_dim
        self.rope = config.llama
        width, kv_width = config.heads * config.head_dim, config.kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden, width, bias=False)
        self.k_proj = nn.Linear(config.hidden, kv_width, bias=False)
        self.v_proj = nn.Linear(config.hidden, kv_width, bias=False)
        self.o_proj = nn.Linear(width, config.hidden, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, position: int = 0) -> torch.Tensor:
        batch, length, _ = x.shape
        kv, groups, dim = self.kv_heads, self.heads // self.kv_heads, self.head_dim
        q = self.q_proj(x).view(batch, length, kv, groups, dim).permute(0, 2, 3, 1, 4)   # [b, kv, g, q, e]
        k = self.k_proj(x).view(batch, length, kv, dim).transpose(1, 2)                  # [b, kv, q, e]
        v = self.v_proj(x).view(batch, length, kv, dim).transpose(1, 2)
        if self.rope:
            q, k = _rope(q, position), _rope(k, position)
        if cache is not None:
            cache.keys[:, :, position:position + length] = k
            cache.values[:, :, position:position + length] = v
            k, v = cache.keys[:, :, :position + length], cache.values[:, :, :position + length]
        # The g query heads of a KV head become rows of one matrix: plain batched matmuls over (b, kv), so the
        # keys and values are never expanded or copied (broadcasting [b,kv,g,q,e] @ [b,kv,1,e,s] copies them).
        scores = q.reshape(batch, kv, groups * length, dim) @ k.transpose(-1, -2) / math.sqrt(dim)
        if length > 1:
            keys = k.shape[2]
            queries = torch.arange(keys - length, keys, device=x.device)[:, None]
            future = torch.arange(keys, device=x.device)[None, :] > queries
            scores.view(batch, kv, groups, length, keys).masked_fill_(future, float("-inf"))
        context = (scores.softmax(dim=-1) @ v).view(batch, kv, groups, length, dim)
        context = context.permute(0, 3, 1, 2, 4).reshape(batch, length, self.heads * dim)
        return self.o_proj(context)


class MLP(nn.Module):
    """dense: up, GELU, down. llama: SwiGLU (gate, up, down)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gated = config.llama
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden, config.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(config.hidden, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(functional.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(functional.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn = Attention(config)
        self.mlp = MLP(config)
        self.attn_norm = nn.RMSNorm(config.hidden, eps=1e-5) if config.llama else None
        self.mlp_norm = nn.RMSNorm(config.hidden, eps=1e-5) if config.llama else None

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, position: int = 0) -> torch.Tensor:
        normed = self.attn_norm(x) if self.attn_norm is not None else x
        x = x + self.attn(normed, cache, position)
        normed = self.mlp_norm(x) if self.mlp_norm is not None else x
        return x + self.mlp(normed)


class Head(nn.Module):
    """Final norm (llama) and the LM head; logits only for each sequence's last position."""

    def __init__(self, config: ModelConfig, tied: nn.Embedding | None) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(config.hidden, eps=1e-5) if config.llama else None
        self.proj = nn.Linear(config.hidden, config.vocab, bias=False)
        if tied is not None:
            self.proj.weight = tied.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = x[:, -1]
        return self.proj(self.norm(last) if self.norm is not None else last)


class Transformer(nn.Module):
    """``embed`` (if vocab) -> ``layers`` -> ``head`` (if vocab). Without a vocab it maps hidden states."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.hidden) if config.vocab else None
        self.layers = nn.ModuleList(Block(config) for _ in range(config.layers))
        tied = self.embed if config.tie_embeddings else None
        self.head = Head(config, tied) if config.vocab else None

    def forward(self, x: torch.Tensor, caches: list[KVCache] | None = None, position: int = 0) -> torch.Tensor:
        hidden = self.embed(x) if self.embed is not None else x
        for index, block in enumerate(self.layers):
            hidden = block(hidden, caches[index] if caches is not None else None, position)
        return self.head(hidden) if self.head is not None else hidden


def build_model(spec: DenseSpec | LlamaSpec, dtype: torch.dtype = torch.float32, device: str = "cpu",
                seed: int | None = 0) -> Transformer:
    """The reference model of ``spec``; on ``meta`` no memory is allocated. ``seed``: deterministic N(0, 0.02)."""
    with torch.device(device):
        model = Transformer(ModelConfig.of(spec)).to(dtype)
    if device != "meta" and seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("norm.weight"):
                    parameter.fill_(1.0)
                else:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model.eval()
