"""Tensor-split records for Hugging Face profiles, from the model's own tensor-parallel plan
(``config.base_model_tp_plan``, the plan transformers' ``tp_plan="auto"`` applies).

At a width t the architecture allows (t divides the attention heads and the MLP width, and divides the KV heads or
is a multiple of them), one card of a block holds:
- every parameter the plan splits, ``colwise`` (output features: Q, K, V, gate, up; ``packed_colwise`` fused
  gate-up of the experts) or ``rowwise`` (input features: O, down), at 1/t of its bytes; K and V at
  max(h_kv/t, 1)/h_kv (KV heads replicate once t passes them); a ``rowwise`` bias whole;
- everything else whole (norms, routers, buffers);
- the KV cache of its KV heads; the layer's transients and FLOPs at 1/t (its heads and columns);
- one all-reduce of the output per ``rowwise`` module (O and down: two per block).
The embedding and the LM head are vocab-parallel where t divides the vocabulary (as the closed forms count them,
sources/families.py), else whole. Experts stay on every card, each split like the MLP (tensor parallel); placing
whole experts on different cards (expert parallel) is not modelled here.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from torch import nn

from cachefit.core.layers import Layer, LayerTable, Split
from cachefit.core.spec import EMBED, HEAD, dtype_bytes
from cachefit.sources.families import vocab_parallel_workspace

__all__ = ["tp_widths", "with_tp_splits"]

_COLWISE = ("colwise", "colwise_gather_output", "packed_colwise", "local_colwise", "colwise_rep")
_ROWWISE = ("rowwise", "rowwise_split_input", "local_rowwise", "rowwise_rep")


def tp_widths(heads: int, kv_heads: int, mlp: int) -> tuple[int, ...]:
    """Widths t > 1 a block splits at: t | heads, t | mlp, and t | kv_heads or kv_heads | t."""
    return tuple(t for t in range(2, heads + 1)
                 if heads % t == 0 and mlp % t == 0 and (kv_heads % t == 0 or t % kv_heads == 0))


def with_tp_splits(table: LayerTable, model: nn.Module, hf_config: Any) -> LayerTable:
    """``table`` (a profile of ``model``) with each layer's splits, when the config has a tensor-parallel plan."""
    plan = getattr(hf_config, "base_model_tp_plan", None) or {}
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = getattr(text, "num_attention_heads", 0) or 0
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    mlp = getattr(text, "moe_intermediate_size", None) or getattr(text, "intermediate_size", 0) or 0
    if not plan or not heads or not mlp:
        return table
    widths = tp_widths(heads, kv_heads, mlp)
    causal: Any = model                 # a transformers PreTrainedModel: its embeddings by its own accessors
    context = _Context(_rules(plan, getattr(model, "base_model_prefix", "")), dict(model.named_parameters()),
                       _module_name(model, causal.get_input_embeddings()),
                       _module_name(model, causal.get_output_embeddings()), kv_heads,
                       int(getattr(text, "vocab_size", 0) or 0), table)
    layers = []
    for layer in table.layers:
        styled = context.styled(layer)                  # its parameters and their styles, found once per layer
        layers.append(replace(layer, splits=tuple(context.split(layer, styled, t) for t in widths)))
    return replace(table, layers=tuple(layers))


def _rules(plan: dict[str, str], prefix: str) -> list[tuple[re.Pattern[str], str]]:
    """Patterns of the plan over full parameter names, the most specific first."""
    rules = []
    for pattern, style in sorted(plan.items(), key=lambda item: -len(item[0])):
        body = re.escape(pattern).replace(r"\*", r"\d+")
        rules.append((re.compile(rf"^(?:{re.escape(prefix)}\.)?{body}(?:\.|$)"), style))
    return rules


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((name for name, each in model.named_modules() if each is module), None) if module else None


class _Context:
    """What a layer's split needs: the plan's rules, the parameters, which modules are the embedding and head."""

    def __init__(self, rules: list[tuple[re.Pattern[str], str]], parameters: dict[str, nn.Parameter],
                 embed: str | None, head: str | None, kv_heads: int, vocab: int, table: LayerTable) -> None:
        self.rules, self.parameters, self.embed, self.head = rules, parameters, embed, head
        self.kv_heads, self.vocab, self.table = kv_heads, vocab, table

    def styled(self, layer: Layer) -> list[tuple[str, nn.Parameter, str | None]]:
        """The layer's own parameters, each with the plan's style for it (None: not in the plan)."""
        prefixes = tuple(module + "." for module in layer.modules)
        return [(name, p, self._style(name)) for name, p in self.parameters.items() if name.startswith(prefixes)]

    def split(self, layer: Layer, styled: list[tuple[str, nn.Parameter, str | None]], ways: int) -> Split:
        if self.embed is not None and self.embed in layer.modules:
            return self._vocab_split(layer, ways, self.embed, EMBED)
        if self.head is not None and self.head in layer.modules:
            return self._vocab_split(layer, ways, self.head, HEAD)
        if not any(style in _COLWISE + _ROWWISE for _, _, style in styled):
            return Split(ways, layer.weight_bytes, layer.workspace_bytes, layer.kv_cache_bytes, layer.flops)
        whole = sum(p.numel() * p.element_size() for _, p, _ in styled)
        shared = sum(self._share(name, p, style, ways) for name, p, style in styled)
        local_kv = max(self.kv_heads // ways, 1)
        reduced = {name.rsplit(".", 1)[0] for name, _, style in styled if style in _ROWWISE}
        return Split(ways, layer.weight_bytes - whole + shared, layer.workspace_bytes // ways,
                     layer.kv_cache_bytes * local_kv // self.kv_heads, layer.flops / ways,
                     len(reduced) * layer.activation_bytes, len(reduced))

    def _style(self, name: str) -> str | None:
        return next((style for pattern, style in self.rules if pattern.match(name)), None)

    def _share(self, name: str, parameter: nn.Parameter, style: str | None, ways: int) -> int:
        size = parameter.numel() * parameter.element_size()
        if style in _ROWWISE and not name.endswith("bias"):
            return size // ways
        if style not in _COLWISE:
            return size
        if re.search(r"(^|\.)(k_proj|v_proj)\.", name):           # KV heads replicate once t passes them
            return size * max(self.kv_heads // ways, 1) // self.kv_heads
        return size // ways

    def _vocab_split(self, layer: Layer, ways: int, module: str, kind: str) -> Split:
        """The embedding or the head: vocab-parallel where t divides V, else whole on every card."""
        if not self.vocab or self.vocab % ways:
            return Split(ways, layer.weight_bytes, layer.workspace_bytes, layer.kv_cache_bytes, layer.flops)
        weight = self.parameters.get(f"{module}.weight")
        size = weight.numel() * weight.element_size() if weight is not None else 0   # tied: the embedding's
        p = dtype_bytes(self.table.dtype or "float16")[1]
        batch = self.table.batch or 1
        tokens = batch * (self.table.seq or 1) if self.table.phase == "prefill" else batch
        extra = vocab_parallel_workspace(kind, tokens, batch, self.vocab, ways, p)
        weights = layer.weight_bytes - size + size // ways
        if kind == EMBED:
            return Split(ways, weights, layer.workspace_bytes + extra, 0, 0.0, layer.activation_bytes, allreduces=1)
        return Split(ways, weights, layer.workspace_bytes + extra, 0, layer.flops / ways, allgathers=1)
