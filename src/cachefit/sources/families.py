"""Analytical model families: per-layer bytes and FLOPs of decoder-only transformers, in closed form.

Notation: b batch, s sequence (context) length, q tokens per sequence in this pass (s in prefill, 1 in decode),
T = b*q tokens, d hidden size, h heads, h_kv KV heads, e head dim, f MLP hidden size, V vocab, p bytes per element.

- Weights: the projections' matrices (Vaswani et al. 2017, sec. 3; Llama: Touvron et al. 2023, GQA: Ainslie et
  al. 2023, SwiGLU: Shazeer 2020, RMSNorm: Zhang & Sennrich 2019 -- one d-vector per norm).
- Activation (a layer's output, the next layer's input): T*d*p.
- Workspace: the largest transient tensor a layer materialises: naive attention's score matrix b*h*q*s*p
  (softmax in place), FlashAttention's one key block of 128 at a time, b*h*q*min(s,128)*p (Dao et al. 2022,
  Alg. 1), or the MLP hidden T*f*p (SwiGLU holds gate and up together: 2*T*f*p). Real modules are measured
  instead (profiling of torch modules).
- KV cache (decode): keys and values of s tokens, 2*b*s*h_kv*e*p (Pope et al. 2022, "Efficiently Scaling
  Transformer Inference", sec. 2).
- Tensor splits (Megatron-LM, Shoeybi et al. 2019, sec. 3): t cards share a block; attention by heads (Q and O by
  h/t heads, K and V by h_kv/t KV heads, or one KV head per card when t > h_kv, which GQA then replicates), the MLP
  by f/t columns of its first matrices and rows of its last; norms whole. Per card: those weights, the KV cache of
  its KV heads, transients of its heads and columns; the output (T*d*p) is whole after two all-reduces of T*d*p
  each. t must divide h and f, and divide h_kv or be a multiple of it. The embedding and the head take the same
  widths, vocab-parallel where t divides V (Megatron's VocabParallelEmbedding: V/t rows per card, partial lookups
  summed by one all-reduce; the head by V/t columns, its logits all-gathered), else whole on every card.
- Mixture of experts (Mixtral, Jiang et al. 2024, sec. 2.1): E SwiGLU experts of width f behind a d x E router,
  each token routed to k of them. Weights: E*3*d*f + d*E (+ the norm); split t ways, every expert by f/t columns
  (Megatron-style, as transformers' tp_plan splits them), the router whole. Workspace: the T*k routed slots'
  gathered inputs and gate-up outputs, T*k*(d + 2*f/t)*p (transformers' grouped-mm experts). FLOPs: 2*T*k*3*d*f/t
  for the experts a token takes, 2*T*d*E for the router. Expert parallel (``experts="parallel"``, t | E): E/t whole
  experts a card, the router whole; as transformers' AllReduceEP runs it at inference (every card its own experts
  over the whole batch, routes to other cards masked, one all-reduce of the output), a card's transients are the
  whole batch's, T*k*(d + 2*f)*p, plus the masks (a bool, an int64 local expert id and a weight per token and route,
  T*k*(9 + p)), and its FLOPs 1/t of the experts' (an even spread of routes).
- FLOPs: 2 per multiply-add of every matmul, 2*T*(matmul parameters) (Kaplan et al. 2020, sec. 2.1), plus
  attention's QK^T and PV, 4*b*h*q*s*e, counted in full as a naive implementation computes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cachefit.core.errors import InputError
from cachefit.core.layers import Layer, LayerTable, SharedTensor, Split
from cachefit.core.spec import (
    EMBED,
    HEAD,
    TOKEN_ID_BYTES,
    DenseSpec,
    ExpertSplit,
    LlamaSpec,
    SpecRecord,
    Workload,
    block_name,
    dtype_bytes,
)

__all__ = ["dense_table", "llama_table", "split_ways", "vocab_parallel_workspace"]

FLASH_KEY_BLOCK = 128


def _attention_transient(work: Workload, heads: int, p: int) -> int:
    keys = min(work.seq, FLASH_KEY_BLOCK) if work.attention == "flash" else work.seq   # eager: scores held too
    return work.batch * heads * work.new_tokens * keys * p


def _attention_flops(work: Workload, heads: int, head_dim: int) -> int:
    return 4 * work.batch * heads * work.new_tokens * work.seq * head_dim


def _kv_cache(work: Workload, kv_width: int, p: int) -> int:
    return 2 * work.batch * work.seq * kv_width * p if work.phase == "decode" else 0


@dataclass(frozen=True, slots=True)
class _Shape:
    """What the byte formulas need of a block: d, h, h_kv, e, f, and whether the MLP is gated (SwiGLU, norms)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp_hidden: int
    gated: bool
    experts: int = 0            # 0: a dense MLP
    top_k: int = 0
    expert_parallel: bool = False

    @classmethod
    def of(cls, spec: DenseSpec | LlamaSpec, experts: ExpertSplit = "tensor") -> _Shape:
        if isinstance(spec, LlamaSpec):
            if experts == "parallel" and not spec.experts:
                raise InputError(f"experts='parallel': {spec.name} has a dense MLP, no mixture-of-experts to place",
                                 parameters=("experts",))
            return cls(spec.hidden, spec.heads, spec.kv_heads, spec.dim_per_head, spec.ffn_hidden, True,
                       spec.experts, spec.experts_per_token, experts == "parallel")
        return cls(spec.model_dim, spec.heads, spec.heads, spec.head_dim, spec.mlp_hidden, False)

    def attention_ways(self) -> tuple[int, ...]:
        """Widths t > 1 attention can be split: t divides h, and divides h_kv or is a multiple of it."""
        return tuple(t for t in range(2, self.heads + 1)
                     if self.heads % t == 0 and (self.kv_heads % t == 0 or t % self.kv_heads == 0))

    def mlp_ways(self) -> tuple[int, ...]:
        """Widths the MLP splits: t | f, or with whole experts a card, t | E."""
        split = self.experts if self.expert_parallel else self.mlp_hidden
        return tuple(t for t in range(2, split + 1) if split % t == 0)


def split_ways(heads: int, kv_heads: int, mlp_hidden: int) -> tuple[int, ...]:
    """The tensor-split widths t > 1 a whole block's shapes allow (see the module notes)."""
    return tuple(t for t in _Shape(0, heads, kv_heads, 0, mlp_hidden, False).attention_ways() if mlp_hidden % t == 0)


def _attention_share(shape: _Shape, work: Workload, p: int, ways: int) -> Split:
    """One card's share of attention (with its norm) split ``ways`` ways (1: whole)."""
    local_heads, local_kv, e, d = shape.heads // ways, max(shape.kv_heads // ways, 1), shape.head_dim, shape.hidden
    params = 2 * d * local_heads * e + 2 * d * local_kv * e
    return Split(ways, (params + (d if shape.gated else 0)) * p, _attention_transient(work, local_heads, p),
                 _kv_cache(work, local_kv * e, p),
                 float(2 * work.tokens * params + _attention_flops(work, local_heads, e)), work.tokens * d * p, 1)


def _mlp_share(shape: _Shape, work: Workload, p: int, ways: int) -> Split:
    """One card's share of the MLP (with its norm) split ``ways`` ways (1: whole)."""
    if shape.experts:
        return _experts_share(shape, work, p, ways)
    local_f, d = shape.mlp_hidden // ways, shape.hidden
    params = (3 if shape.gated else 2) * d * local_f
    return Split(ways, (params + (d if shape.gated else 0)) * p,
                 (2 if shape.gated else 1) * work.tokens * local_f * p, 0, float(2 * work.tokens * params),
                 work.tokens * d * p, 1)


def _experts_share(shape: _Shape, work: Workload, p: int, ways: int) -> Split:
    """One card's share of a mixture-of-experts MLP (with its norm): every expert by f/t, the router whole."""
    d, slots, router = shape.hidden, work.tokens * shape.top_k, shape.hidden * shape.experts
    if shape.expert_parallel:           # E/t whole experts; every card's experts see the whole batch
        local = shape.experts // ways
        masks = slots * (1 + 8 + p) if ways > 1 else 0
        expert = 3 * d * shape.mlp_hidden
        return Split(ways, (local * expert + router + d) * p, slots * (d + 2 * shape.mlp_hidden) * p + masks, 0,
                     float(2 * slots * expert / ways + 2 * work.tokens * router), work.tokens * d * p, 1,
                     experts=local if ways > 1 else 0, read_bytes=_taken(local, slots, expert, router + d, p))
    expert = 3 * d * (shape.mlp_hidden // ways)
    return Split(ways, (shape.experts * expert + router + d) * p, slots * (d + 2 * shape.mlp_hidden // ways) * p, 0,
                 float(2 * slots * expert + 2 * work.tokens * router), work.tokens * d * p, 1,
                 read_bytes=_taken(shape.experts, slots, expert, router + d, p))


def _taken(held: int, slots: int, expert: int, rest: int, p: int) -> int | None:
    """Weight bytes a pass reads of ``held`` experts when its ``slots`` routes take at most that many of them
    (all on this card, the worst case); None when every expert may be taken."""
    return (min(held, slots) * expert + rest) * p if slots < held else None


def _block_share(shape: _Shape, work: Workload, p: int, ways: int) -> Split:
    """Attention then MLP: weights, KV and FLOPs add up; the transients do not coexist, so the larger counts."""
    attention, mlp = _attention_share(shape, work, p, ways), _mlp_share(shape, work, p, ways)
    read = None if mlp.read_bytes is None else attention.weight_bytes + mlp.read_bytes
    return Split(ways, attention.weight_bytes + mlp.weight_bytes, max(attention.workspace_bytes, mlp.workspace_bytes),
                 attention.kv_cache_bytes, attention.flops + mlp.flops,
                 attention.allreduce_bytes + mlp.allreduce_bytes, attention.allreduces + mlp.allreduces,
                 experts=mlp.experts, read_bytes=read)


def _share_layer(name: str, share: Callable[[int], Split], ways: tuple[int, ...], activation: int) -> Layer:
    whole = share(1)
    return Layer(name, whole.weight_bytes, activation, whole.workspace_bytes, whole.kv_cache_bytes, whole.flops,
                 (name,), (), tuple(share(t) for t in ways), whole.read_bytes)


def _blocks(spec: DenseSpec | LlamaSpec, work: Workload, p: int, sublayers: bool, experts: ExpertSplit
            ) -> list[Layer]:
    """Each block as one layer, or (``sublayers``) as two: ``layers.N.attn`` and ``layers.N.mlp``, each with the
    widths its own shapes allow (the MLP splits far finer than attention's heads)."""
    shape = _Shape.of(spec, experts)
    activation = work.tokens * shape.hidden * p
    if not sublayers:
        mlp = set(shape.mlp_ways())
        ways = tuple(t for t in shape.attention_ways() if t in mlp)
        return [_share_layer(block_name(i), lambda t: _block_share(shape, work, p, t), ways, activation)
                for i in range(spec.layers)]
    layers = []
    for i in range(spec.layers):
        layers.append(_share_layer(f"{block_name(i)}.attn", lambda t: _attention_share(shape, work, p, t),
                                   shape.attention_ways(), activation))
        layers.append(_share_layer(f"{block_name(i)}.mlp", lambda t: _mlp_share(shape, work, p, t), shape.mlp_ways(),
                                   activation))
    return layers


def _embedding_share(vocab: int, d: int, work: Workload, p: int, ways: int) -> Split:
    """One card's share of the embedding: vocab-parallel when t divides V (rows V/t, a partial lookup per card,
    summed by one all-reduce of the T*d*p output; Megatron-LM's VocabParallelEmbedding, Shoeybi et al. 2019,
    sec. 3), else the whole table on every card."""
    if ways > 1 and vocab % ways == 0:
        share = vocab // ways * d * p
        return Split(ways, share, vocab_parallel_workspace(EMBED, work.tokens, work.batch, vocab, ways, p), 0, 0.0,
                     work.tokens * d * p, allreduces=1, read_bytes=min(share, work.tokens * d * p))
    return Split(ways, vocab * d * p, 0, read_bytes=min(vocab * d * p, work.tokens * d * p))


def _head_share(vocab: int, d: int, norm_params: int, tied: bool, work: Workload, p: int, ways: int) -> Split:
    """One card's share of the final norm and the LM head: vocab-parallel when t divides V (V/t columns, local
    logits as workspace, then one all-gather of the b*V*p logits), else whole. A tied head counts the shared
    embedding whole (layer ``shared``): an over-count by (t-1)/t of it, never an under-count."""
    local = vocab // ways if ways > 1 and vocab % ways == 0 else vocab
    own = norm_params + (0 if tied else local * d)
    workspace = vocab_parallel_workspace(HEAD, work.tokens, work.batch, vocab, ways, p) if local < vocab else 0
    return Split(ways, own * p, workspace, 0, float(2 * work.batch * d * local), allgathers=1 if local < vocab else 0)


def vocab_parallel_workspace(layer: str, tokens: int, batch: int, vocab: int, ways: int, p: int) -> int:
    """What a vocab-parallel layer holds beyond its input and output on one card (runtime/stage.py): the
    embedding's shifted ids, their mask and the clamped ids (8 + 1 + 8 bytes a token; the lookup is masked in
    place); the head's own logits (b*V/t) and the t gathered pieces (b*V) before they are joined into the output."""
    if layer == EMBED:
        return tokens * (2 * TOKEN_ID_BYTES + 1)
    return batch * (vocab // ways) * p + batch * vocab * p


def _embedding(vocab: int, d: int, work: Workload, p: int, ways: tuple[int, ...]) -> Layer:
    whole = _embedding_share(vocab, d, work, p, 1)
    # A lookup reads the rows it looks up (its output), not the whole table.
    return Layer(EMBED, whole.weight_bytes, work.tokens * d * p, 0, 0, 0.0, (EMBED,),
                 splits=tuple(_embedding_share(vocab, d, work, p, t) for t in ways),
                 read_bytes=min(whole.weight_bytes, work.tokens * d * p))


def _head(vocab: int, d: int, norm_params: int, tied: bool, work: Workload, p: int, ways: tuple[int, ...]) -> Layer:
    """The final norm and the LM head; logits only for each sequence's last position (what generation needs)."""
    whole = _head_share(vocab, d, norm_params, tied, work, p, 1)
    shared = (SharedTensor(f"{EMBED}.weight", EMBED, vocab * d * p),) if tied else ()
    return Layer(HEAD, whole.weight_bytes, work.batch * vocab * p, 0, 0, whole.flops, (HEAD,), shared,
                 tuple(_head_share(vocab, d, norm_params, tied, work, p, t) for t in ways))


def _check_dims(spec: DenseSpec | LlamaSpec, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{spec.name}: {name} must be a positive integer, got {value!r}")


def dense_table(spec: DenseSpec, work: Workload, sublayers: bool = False) -> LayerTable:
    _check_dims(spec, ("layers", "heads", "head_dim", "mlp_hidden"))
    dtype, p = dtype_bytes(work.dtype)
    block = _blocks(spec, work, p, sublayers, "tensor")
    if not spec.vocab:
        return _table(spec, work, dtype, block, work.tokens * spec.model_dim * p, sublayers)
    layers = _with_embedding_and_head(block, spec, spec.model_dim, 0, work, p)
    return _table(spec, work, dtype, layers, work.tokens * TOKEN_ID_BYTES, sublayers)


def llama_table(spec: LlamaSpec, work: Workload, sublayers: bool = False, *, experts: ExpertSplit = "tensor"
                ) -> LayerTable:
    """``experts``: how a mixture of experts splits in a tensor group (see the module notes)."""
    _check_dims(spec, ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab"))   # shapes: LlamaSpec
    dtype, p = dtype_bytes(work.dtype)
    blocks = _blocks(spec, work, p, sublayers, experts)
    layers = _with_embedding_and_head(blocks, spec, spec.hidden, spec.hidden, work, p)
    return _table(spec, work, dtype, layers, work.tokens * TOKEN_ID_BYTES, sublayers, experts)


def _with_embedding_and_head(block: list[Layer], spec: DenseSpec | LlamaSpec, d: int, norm_params: int,
                             work: Workload, p: int) -> list[Layer]:
    """The embedding first and the head last, at every width the blocks allow (vocab-parallel where the width
    divides the vocabulary). Module names are those of the reference implementation (cachefit.nn), whose
    checkpoints shards are cut from."""
    ways = tuple(sorted({s.ways for layer in block for s in layer.splits}))
    return [_embedding(spec.vocab, d, work, p, ways), *block,
            _head(spec.vocab, d, norm_params, spec.tie_embeddings, work, p, ways)]


def _table(spec: DenseSpec | LlamaSpec, work: Workload, dtype: str, layers: list[Layer], input_bytes: int,
           sublayers: bool, experts: ExpertSplit = "tensor") -> LayerTable:
    return LayerTable(name=spec.name, layers=tuple(layers), input_bytes=input_bytes, dtype=dtype,
                      batch=work.batch, seq=work.seq, phase=work.phase,
                      spec=SpecRecord(spec, work.attention, sublayers, experts=experts))
