"""A clean decoder-only transformer for the ``dense`` and ``llama`` families (core/spec.py, sources/families.py).

Module names match the analytical layer tables: ``embed``, ``layers.N``, ``head``; so do the parameter counts,
layer for layer (tests/test_torch_profile.py). Attention is the naive kind (scores materialised), with a
pre-allocated KV cache for decode.

Tensor groups (Megatron-LM, Shoeybi et al. 2019, sec. 3): built with ``tensor_parallel`` t, a block holds one
card's share (h/t heads, its KV heads, f/t MLP columns) and sums the partial outputs of attention and of the MLP
with ``Block.reduce`` (an all-reduce over the group; the identity alone). :func:`tensor_share` cuts a full
checkpoint's tensor into a card's share, :func:`tensor_unshare` puts the shares back together.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from cachefit.core.errors import InputError
from cachefit.core.spec import EMBED, HEAD, DenseSpec, LlamaSpec, block_tensor

__all__ = ["TORCH_DTYPES", "KVCache", "ModelConfig", "Transformer", "build_model", "tensor_share",
           "tensor_unshare"]

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
    vocab: int                      # this card's rows of the embedding and columns of the head
    tie_embeddings: bool
    vocab_ways: int = 1             # > 1: vocab-parallel embedding and head, over this many cards

    @classmethod
    def of(cls, spec: DenseSpec | LlamaSpec, tensor_parallel: int = 1) -> ModelConfig:
        """The full model's dimensions, or one card's share of every block in a group of ``tensor_parallel``."""
        if isinstance(spec, DenseSpec):
            full = cls("dense", spec.layers, spec.model_dim, spec.heads, spec.heads, spec.head_dim,
                       spec.mlp_hidden, spec.vocab, spec.tie_embeddings)
        elif spec.experts:
            raise InputError(f"{spec.name} is a mixture of experts: cachefit plans and predicts it, but its "
                             "reference model (for --measure, init-weights, shard and run) has dense MLPs only")
        else:
            full = cls("llama", spec.layers, spec.hidden, spec.heads, spec.kv_heads, spec.dim_per_head,
                       spec.ffn_hidden, spec.vocab, spec.tie_embeddings)
        return full.share(tensor_parallel)

    def share(self, ways: int) -> ModelConfig:
        if ways == 1:
            return self
        if self.heads % ways or self.mlp_hidden % ways or (self.kv_heads % ways and ways % self.kv_heads):
            raise InputError(f"a block of {self.heads} heads ({self.kv_heads} KV heads) and MLP width "
                             f"{self.mlp_hidden} cannot be split {ways} ways")
        # The embedding and the head are vocab-parallel where the width divides the vocabulary (as the closed forms
        # count them, sources/families.py), else whole on every card.
        vocab_ways = ways if self.vocab and self.vocab % ways == 0 else 1
        return ModelConfig(self.family, self.layers, self.hidden, self.heads // ways, max(self.kv_heads // ways, 1),
                           self.head_dim, self.mlp_hidden // ways, self.vocab // vocab_ways, self.tie_embeddings,
                           vocab_ways)

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


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.reduce: Callable[[torch.Tensor], torch.Tensor] = _identity    # a tensor group's all-reduce
        self.attn = Attention(config)
        self.mlp = MLP(config)
        self.attn_norm = nn.RMSNorm(config.hidden, eps=1e-5) if config.llama else None
        self.mlp_norm = nn.RMSNorm(config.hidden, eps=1e-5) if config.llama else None

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, position: int = 0) -> torch.Tensor:
        normed = self.attn_norm(x) if self.attn_norm is not None else x
        x = x + self.reduce(self.attn(normed, cache, position))
        normed = self.mlp_norm(x) if self.mlp_norm is not None else x
        return x + self.reduce(self.mlp(normed))


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
                seed: int | None = 0, tensor_parallel: int = 1) -> Transformer:
    """The reference model of ``spec``; on ``meta`` no memory is allocated. ``seed``: deterministic N(0, 0.02).
    ``tensor_parallel`` > 1: one card's share of every block (for profiling; its reduce is the identity)."""
    with torch.device(device):
        model = Transformer(ModelConfig.of(spec, tensor_parallel)).to(dtype)
    if device != "meta" and seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("norm.weight"):
                    parameter.fill_(1.0)
                else:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model.eval()


# Which dimension of a block's tensor a tensor group splits, and by what: weights are [out, in] (nn.Linear).
_SPLIT_DIMS = {"attn.q_proj.weight": (0, "heads"), "attn.k_proj.weight": (0, "kv"), "attn.v_proj.weight": (0, "kv"),
               "attn.o_proj.weight": (1, "heads"), "mlp.gate_proj.weight": (0, "mlp"),
               "mlp.up_proj.weight": (0, "mlp"), "mlp.down_proj.weight": (1, "mlp")}


_VOCAB_TENSORS = (f"{EMBED}.weight", f"{HEAD}.proj.weight")     # rows by vocabulary


def _split_dim(name: str) -> tuple[int, str] | None:
    if name in _VOCAB_TENSORS:
        return 0, "vocab"
    inside = block_tensor(name)
    return None if inside is None else _SPLIT_DIMS.get(inside)


def _share_range(kind: str, full: ModelConfig, rank: int, ways: int) -> tuple[int, int]:
    """[start, stop) of card ``rank``'s rows or columns: its h/t heads, its KV heads (the one KV head it shares
    with ways/h_kv cards when ways > h_kv), or its f/t MLP columns."""
    local = full.share(ways)
    if kind == "vocab":
        return (rank * local.vocab, (rank + 1) * local.vocab) if local.vocab_ways > 1 else (0, full.vocab)
    if kind == "mlp":
        return rank * local.mlp_hidden, (rank + 1) * local.mlp_hidden
    if kind == "heads":
        return rank * local.heads * full.head_dim, (rank + 1) * local.heads * full.head_dim
    first = rank * local.kv_heads if full.kv_heads % ways == 0 else rank * full.kv_heads // ways
    return first * full.head_dim, (first + local.kv_heads) * full.head_dim


def tensor_share(name: str, tensor: torch.Tensor, full: ModelConfig, rank: int, ways: int) -> torch.Tensor:
    """Card ``rank``'s share of the full checkpoint tensor ``name`` in a group of ``ways`` (Megatron-LM: Q, K, V
    and the MLP's first matrices by output rows, O and the MLP's last by input columns); norms, embedding and head
    whole."""
    cut = _split_dim(name)
    if ways == 1 or cut is None:
        return tensor
    dim, kind = cut
    start, stop = _share_range(kind, full, rank, ways)
    return tensor.narrow(dim, start, stop - start).contiguous()


def tensor_unshare(name: str, shares: list[torch.Tensor], full: ModelConfig) -> torch.Tensor:
    """The full tensor from every card's share, in rank order (the inverse of :func:`tensor_share`)."""
    cut, ways = _split_dim(name), len(shares)
    if ways == 1 or cut is None:
        return shares[0]
    dim, kind = cut
    pieces: dict[tuple[int, int], torch.Tensor] = {}
    for rank, share in enumerate(shares):
        pieces.setdefault(_share_range(kind, full, rank, ways), share)    # replicated KV heads: keep one
    return torch.cat([pieces[key] for key in sorted(pieces)], dim=dim)
