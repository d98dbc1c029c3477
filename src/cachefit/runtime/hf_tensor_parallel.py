"""Tensor groups of a Hugging Face stage at run time: torch's DTensor ``parallelize_module`` over the group's own
mesh (``DeviceMesh.from_group`` on the group the worker made), with the styles of the config's
``base_model_tp_plan``, as the plan's split records count them (sources/hf_splits.py):

- ``colwise`` (Q, K, V, gate, up) -> ``ColwiseParallel``: output features sharded, the heads a card holds are
  what the attention's ``view(..., -1, head_dim)`` sees;
- ``rowwise`` (O, down) -> ``RowwiseParallel``: input features sharded, the output all-reduced;
- the embedding, where t divides the vocabulary -> ``RowwiseParallel`` on ``nn.Embedding`` (its rows; ids outside
  them look up zeros, the all-reduce sums); the head -> ``ColwiseParallel`` gathering its logits.
Parallelised on meta, before any tensor exists, as torchtitan does; each card then loads only its share.

Why DTensor and not transformers' ``tp_plan="auto"``: transformers shards while ``from_pretrained`` loads the
whole model over the whole world, where a stage holds a few layers and its group is a part of the world.
Mixture-of-experts blocks (``moe_tp_experts``: stacked ``gate_up_proj`` and ``down_proj``) keep every expert on
every card with f/t of its columns, plain tensors, and one all-reduce after the experts, as transformers does.
Run so far: t dividing the KV heads (KV heads replicated past t are refused before launch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cachefit.core.errors import InputError
from cachefit.core.records import Partition
from cachefit.sources.hf_splits import plan_rules, style_of

__all__ = ["module_styles", "parallelize", "share", "unshare"]


def module_styles(model: Any, hf_config: Any, part: Partition) -> dict[str, str]:
    """{module name: colwise | rowwise | embedding | head} of the stage's modules a group of
    ``part.tensor_parallel`` cards splits; InputError for what the runtime does not split yet."""
    ways = part.tensor_parallel
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    kv_heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    if kv_heads % ways:
        raise InputError(f"stage {part.first}-{part.last} splits {kv_heads} KV heads {ways} ways: cachefit runs "
                         "tensor groups of Hugging Face models up to one KV head a card so far; plan with split "
                         "'never' or narrower groups", parameters=("split",))
    rules = plan_rules(getattr(hf_config, "base_model_tp_plan", None) or {}, model.base_model_prefix)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    vocab = int(text.vocab_size)
    styles = {}
    for name, module in model.named_modules():
        if not part.holds(name):
            continue
        if module is embed or module is head:
            if vocab % ways == 0:
                styles[name] = "embedding" if module is embed else "head"
            continue
        style = style_of(rules, name)
        if style is None or not list(module.parameters(recurse=False)):
            continue
        if style == "moe_tp_experts" and _experts_layout(module):
            styles[name] = "experts"
            continue
        if style not in ("colwise", "rowwise") or not isinstance(module, nn.Linear):
            raise InputError(f"{name} is split {style!r} by the model's tensor-parallel plan, which cachefit does "
                             "not run yet (attention and dense MLPs only): plan with split 'never'",
                             parameters=("split",))
        styles[name] = style
    return styles


def _experts_layout(module: nn.Module) -> bool:
    """transformers' stacked experts: ``gate_up_proj`` [E, 2f, d] (gate and up packed) and ``down_proj`` [E, d, f]."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3
            and down.dim() == 3 and gate_up.shape[1] == 2 * down.shape[2])


def _dimension(style: str, parameter: str) -> int | None:
    """The dimension a parameter of a module of ``style`` is sharded along (None: held whole)."""
    if style == "experts":          # gate_up: packed columns (each half by rows); down: its input columns
        return 1 if parameter == "gate_up_proj" else 2
    if style == "rowwise":
        return None if parameter == "bias" else 1
    return 0                        # colwise, the embedding's rows, the head's rows (its logits' columns)


def share(name: str, tensor: torch.Tensor, styles: dict[str, str], rank: int, ways: int) -> torch.Tensor:
    """Card ``rank``'s part of tensor ``name`` (DTensor's even chunks; packed gate-up: each half's chunk)."""
    module, _, parameter = name.rpartition(".")
    style = styles.get(module)
    dimension = None if style is None else _dimension(style, parameter)
    if dimension is None:
        return tensor
    if style == "experts" and parameter == "gate_up_proj":
        return torch.cat([half.chunk(ways, dim=1)[rank] for half in tensor.chunk(2, dim=1)], dim=1).contiguous()
    return tensor.chunk(ways, dim=dimension)[rank].contiguous()


def unshare(name: str, shares: list[torch.Tensor], styles: dict[str, str]) -> torch.Tensor:
    """The whole tensor from its shares, in rank order."""
    module, _, parameter = name.rpartition(".")
    style = styles.get(module)
    dimension = None if style is None else _dimension(style, parameter)
    if dimension is None:
        return shares[0]
    if style == "experts" and parameter == "gate_up_proj":
        halves = [piece.chunk(2, dim=1) for piece in shares]
        return torch.cat([torch.cat([h[0] for h in halves], dim=1), torch.cat([h[1] for h in halves], dim=1)], dim=1)
    return torch.cat(shares, dim=dimension)


def parallelize(model: nn.Module, styles: dict[str, str], group: Any, device: str) -> None:
    """Apply the styles with DTensor over the group's mesh (the model still on meta)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = DeviceMesh.from_group(group, torch.device(device).type)
    made: dict[str, Callable[[], Any]] = {
        "colwise": ColwiseParallel, "rowwise": RowwiseParallel,
        "embedding": lambda: RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "head": lambda: ColwiseParallel(output_layouts=Replicate())}
    parallelize_module(model, mesh, {name: made[style]() for name, style in styles.items() if style != "experts"})
    ways = group.size()
    for name, style in styles.items():
        if style == "experts":
            _split_experts(model.get_submodule(name), ways, group)


def _split_experts(experts: nn.Module, ways: int, group: Any) -> None:
    """Stacked experts as transformers' ``moe_tp_experts`` runs them: every expert on every card with f/t of its
    columns (its gate and up halves each, and down's inputs), plain tensors; the partial outputs summed by one
    all-reduce over the group after the experts."""
    import torch.distributed as dist

    gate_up: torch.Tensor = getattr(experts, "gate_up_proj")  # noqa: B009 (typed: a parameter, not a module)
    down: torch.Tensor = getattr(experts, "down_proj")  # noqa: B009
    count, double, hidden = gate_up.shape
    experts.gate_up_proj = nn.Parameter(torch.empty(count, double // ways, hidden, dtype=gate_up.dtype,
                                                    device="meta"), requires_grad=False)
    experts.down_proj = nn.Parameter(torch.empty(count, hidden, down.shape[2] // ways, dtype=down.dtype,
                                                 device="meta"), requires_grad=False)

    def reduce(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, group=group)
        return output

    experts.register_forward_hook(reduce)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, or the tensor."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor
