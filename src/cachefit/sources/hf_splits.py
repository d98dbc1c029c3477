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
sources/families.py), else whole.

Experts of a mixture-of-experts block split one of two ways (``experts``):
- ``tensor`` (the default, as ``tp_plan="auto"`` does): every expert on every card, split like the MLP above;
- ``parallel`` (the model's ``base_model_ep_plan``): whole experts, E/t of them a card (``grouped_gemm``: the
  expert dimension sharded), attention still split by heads. With the expert group the tensor group, transformers
  runs ``AllReduceEP`` at inference (transformers/distributed/expert_parallel.py): each card runs its own experts
  over the whole batch, the routes to other cards' experts masked, and one all-reduce sums the outputs. So a card
  holds its experts, the router and the norms whole; its transients are the whole block's measured ones (its
  experts see every token; an over-count of attention's (t-1)/t share where attention's transients are the larger)
  plus the routing masks (a bool, an int64 local index and a weight per token and route); one all-reduce after
  attention and one after the experts. Widths: those of the tensor split that also divide E.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from cachefit.core.errors import InputError
from cachefit.core.layers import Layer, LayerTable, Split
from cachefit.core.spec import EMBED, HEAD, ExpertSplit, dtype_bytes
from cachefit.sources.families import vocab_parallel_workspace

__all__ = ["ExpertSplit", "plan_rules", "style_of", "tp_widths", "with_tp_splits"]

_COLWISE = ("colwise", "colwise_gather_output", "packed_colwise", "local_colwise", "colwise_rep")
_ROWWISE = ("rowwise", "rowwise_split_input", "local_rowwise", "rowwise_rep")


def tp_widths(heads: int, kv_heads: int, mlp: int) -> tuple[int, ...]:
    """Widths t > 1 a block splits at: t | heads, t | mlp, and t | kv_heads or kv_heads | t."""
    return tuple(t for t in range(2, heads + 1)
                 if heads % t == 0 and mlp % t == 0 and (kv_heads % t == 0 or t % kv_heads == 0))


def with_tp_splits(table: LayerTable, model: nn.Module, hf_config: Any, experts: ExpertSplit = "tensor"
                   ) -> LayerTable:
    """``table`` (a profile of ``model``) with each layer's splits, when the config has a tensor-parallel plan;
    ``experts="parallel"`` places whole experts across a group's cards (the config must have an ``ep_plan``)."""
    plan = getattr(hf_config, "base_model_tp_plan", None) or {}
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = getattr(text, "num_attention_heads", 0) or 0
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    mlp = getattr(text, "moe_intermediate_size", None) or getattr(text, "intermediate_size", 0) or 0
    prefix = getattr(model, "base_model_prefix", "")
    routes = _Routes.of(text, getattr(hf_config, "base_model_ep_plan", None) or {}, prefix, experts)
    if not plan or not heads or not mlp:
        if routes is not None:
            raise InputError("experts='parallel' needs the model's tensor-parallel plan as well (attention is split "
                             "by heads in the same group); this config has none", parameters=("experts",))
        return table
    widths = tp_widths(heads, kv_heads, mlp)
    if routes is not None:
        widths = tuple(t for t in widths if routes.experts % t == 0)
    causal: Any = model                 # a transformers PreTrainedModel: its embeddings by its own accessors
    context = _Context(plan_rules(plan, prefix), dict(model.named_parameters()),
                       _module_name(model, causal.get_input_embeddings()),
                       _module_name(model, causal.get_output_embeddings()), kv_heads,
                       int(getattr(text, "vocab_size", 0) or 0), table, routes)
    layers = []
    for layer in table.layers:
        styled = context.styled(layer)                  # its parameters and their styles, found once per layer
        layers.append(replace(layer, splits=tuple(context.split(layer, styled, t) for t in widths)))
    return replace(table, layers=tuple(layers))


@dataclass(frozen=True, slots=True)
class _Routes:
    """Expert parallel: the ``ep_plan``'s rules, the experts a block has, the routes each token takes."""

    rules: list[tuple[re.Pattern[str], str]]
    experts: int
    top_k: int

    @classmethod
    def of(cls, text: Any, ep_plan: dict[str, str], prefix: str, experts: ExpertSplit) -> _Routes | None:
        if experts == "tensor":
            return None
        count = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None) or 0
        if not ep_plan or not count:
            raise InputError(f"experts='parallel': this {getattr(text, 'model_type', 'model')} config is no "
                             "mixture-of-experts model (it has no base_model_ep_plan or expert count); use "
                             "experts='tensor'",
                             parameters=("experts",))
        return cls(plan_rules(ep_plan, prefix), int(count), int(getattr(text, "num_experts_per_tok", 1) or 1))

    def style(self, name: str) -> str | None:
        return style_of(self.rules, name)


def style_of(rules: list[tuple[re.Pattern[str], str]], name: str) -> str | None:
    """The style of the most specific rule matching a parameter's name (None: not in the plan)."""
    return next((style for pattern, style in rules if pattern.match(name)), None)


def plan_rules(plan: dict[str, str], prefix: str) -> list[tuple[re.Pattern[str], str]]:
    """Patterns of the plan over full parameter names, the most specific first."""
    rules = []
    for pattern, style in sorted(plan.items(), key=lambda item: -len(item[0])):
        body = re.escape(pattern).replace(r"\*", r"\d+")
        rules.append((re.compile(rf"^(?:{re.escape(prefix)}\.)?{body}(?:\.|$)"), style))
    return rules


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((name for name, each in model.named_modules() if each is module), None) if module else None


_EXPERTS = ("grouped_gemm", "ep_dispatch_experts")     # the ep_plan's styles: whole experts, E/t a card


class _Context:
    """What a layer's split needs: the plan's rules, the parameters, which modules are the embedding and head, and
    (expert parallel) the ep_plan's routes."""

    def __init__(self, rules: list[tuple[re.Pattern[str], str]], parameters: dict[str, nn.Parameter],
                 embed: str | None, head: str | None, kv_heads: int, vocab: int, table: LayerTable,
                 routes: _Routes | None = None) -> None:
        self.rules, self.parameters, self.embed, self.head = rules, parameters, embed, head
        self.kv_heads, self.vocab, self.table, self.routes = kv_heads, vocab, table, routes

    def styled(self, layer: Layer) -> list[tuple[str, nn.Parameter, str | None]]:
        """The layer's own parameters, each with the plan's style for it (None: not in the plan); with expert
        parallel, the ep_plan's style wins for the experts."""
        prefixes = tuple(module + "." for module in layer.modules)
        return [(name, p, self._style(name)) for name, p in self.parameters.items() if name.startswith(prefixes)]

    def split(self, layer: Layer, styled: list[tuple[str, nn.Parameter, str | None]], ways: int) -> Split:
        if self.embed is not None and self.embed in layer.modules:
            return self._vocab_split(layer, ways, self.embed, EMBED)
        if self.head is not None and self.head in layer.modules:
            return self._vocab_split(layer, ways, self.head, HEAD)
        if not any(style in _COLWISE + _ROWWISE + _EXPERTS for _, _, style in styled):
            return Split(ways, layer.weight_bytes, layer.workspace_bytes, layer.kv_cache_bytes, layer.flops)
        whole = sum(p.numel() * p.element_size() for _, p, _ in styled)
        shared = sum(self._share(name, p, style, ways) for name, p, style in styled)
        local_kv = max(self.kv_heads // ways, 1)
        reduced = {name.rsplit(".", 1)[0] for name, _, style in styled if style in _ROWWISE + _EXPERTS}
        experts = self.routes.experts // ways if self.routes and any(s in _EXPERTS for _, _, s in styled) else 0
        workspace = layer.workspace_bytes // ways if not experts else layer.workspace_bytes + self._masks()
        return Split(ways, layer.weight_bytes - whole + shared, workspace,
                     layer.kv_cache_bytes * local_kv // self.kv_heads, layer.flops / ways,
                     len(reduced) * layer.activation_bytes, len(reduced), experts=experts)

    def _style(self, name: str) -> str | None:
        expert = self.routes.style(name) if self.routes is not None else None
        return expert or style_of(self.rules, name)

    def _masks(self) -> int:
        """AllReduceEP's routing masks: per token and route a bool (off this card), an int64 local expert id and a
        masked weight."""
        assert self.routes is not None
        return self._tokens() * self.routes.top_k * (1 + 8 + dtype_bytes(self.table.dtype or "float16")[1])

    def _tokens(self) -> int:
        """Tokens in one pass: the prompt in prefill, one a sequence in decode."""
        batch = self.table.batch or 1
        return batch * (self.table.seq or 1) if self.table.phase == "prefill" else batch

    def _share(self, name: str, parameter: nn.Parameter, style: str | None, ways: int) -> int:
        size = parameter.numel() * parameter.element_size()
        if style == "grouped_gemm":                                 # E/t whole experts of the E
            return size // ways
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
        extra = vocab_parallel_workspace(kind, self._tokens(), self.table.batch or 1, self.vocab, ways, p)
        weights = layer.weight_bytes - size + size // ways
        if kind == EMBED:
            return Split(ways, weights, layer.workspace_bytes + extra, 0, 0.0, layer.activation_bytes, allreduces=1)
        return Split(ways, weights, layer.workspace_bytes + extra, 0, layer.flops / ways, allgathers=1)
