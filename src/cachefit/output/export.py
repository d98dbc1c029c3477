"""A plan in the formats peers read: accelerate/transformers ``device_map``, torchtitan stage FQNs, vLLM's
``VLLM_PP_LAYER_PARTITION``, and ``torch.distributed.pipelining``'s ``split_spec``. Pure functions of the plan's
partitions and their module FQNs; :data:`PEERS` says which version and naming each one targets."""

from __future__ import annotations

import json
import re
from typing import Literal

from cachefit.core.errors import InputError
from cachefit.core.records import Plan
from cachefit.core.spec import is_decoder_block

__all__ = ["PEERS", "TARGETS", "Target", "device_map", "export_plan", "pipelining_split_spec", "torchtitan_stages",
           "vllm_partition"]

Target = Literal["accelerate", "torchtitan", "vllm", "pipelining"]
TARGETS: tuple[Target, ...] = ("accelerate", "torchtitan", "vllm", "pipelining")
PEERS: dict[Target, str] = {
    "accelerate": "accelerate >= 1.0 and transformers' from_pretrained(device_map=...), checked with accelerate "
                  "1.15.0; module names as profiled (Hugging Face's for a config, cachefit.nn's for a preset)",
    "torchtitan": "torchtitan's Llama (llama3: tok_embeddings, layers.N, norm, output) as pipeline_module_split "
                  "takes module_fqns_per_model_part (torchtitan main, commit 02ef790)",
    "vllm": "vLLM's VLLM_PP_LAYER_PARTITION (decoder layers per pipeline stage; vLLM puts the embedding on the "
            "first stage and the norm and head on the last)",
    "pipelining": "torch.distributed.pipelining.pipeline(split_spec=...) (torch >= 2.4, checked with torch 2.13): "
                  "SplitPoint.BEGINNING at each stage's first module, names as profiled",
}


def _require_feasible(plan: Plan) -> None:
    if not plan.feasible or not plan.partitions:
        raise InputError("this plan has no feasible partitions to export; re-plan with more or larger cards")


def device_map(plan: Plan) -> dict[str, int]:
    """{module FQN: card}: what ``from_pretrained(..., device_map=...)`` and ``dispatch_model`` take (cards are
    GPU ordinals)."""
    _require_feasible(plan)
    grouped = [part.card for part in plan.partitions if part.tensor_parallel > 1]
    if grouped:
        raise InputError(f"a device_map puts each module on one GPU, but the stages at cards {grouped} are tensor "
                         "groups; export to torchtitan or vllm, or plan with split='never'", parameters=("split",))
    return {module: part.card for part in plan.partitions for module in (part.modules or part.layers)}


# The names torchtitan's Llama gives the modules of a Hugging Face Llama-style model and of cachefit's reference
# model (cachefit.nn: its ``head`` is the final norm and the output projection); None: no module of its own
# (transformers' rotary embedding is a buffer there, ``freqs_cis``).
_TORCHTITAN_NAMES: dict[str, tuple[str, ...] | None] = {
    "model.embed_tokens": ("tok_embeddings",), "model.norm": ("norm",), "lm_head": ("output",),
    "model.rotary_emb": None, "embed": ("tok_embeddings",), "head": ("norm", "output")}
_DECODER = re.compile(r"^(?:model\.)?layers\.(\d+)$")


def torchtitan_stages(plan: Plan) -> list[list[str]]:
    """Module FQNs per pipeline stage in torchtitan's Llama naming (its ``module_fqns_per_model_part``)."""
    _require_feasible(plan)
    stages = []
    for part in plan.partitions:
        names: list[str] = []
        for module in part.modules or part.layers:
            decoder = _DECODER.match(module)
            if decoder:
                names.append(f"layers.{decoder.group(1)}")
            elif module in _TORCHTITAN_NAMES:
                names.extend(_TORCHTITAN_NAMES[module] or ())
            else:
                raise InputError(f"module {module!r} has no torchtitan name: torchtitan's Llama has tok_embeddings, "
                                 "layers.N, norm and output, which cachefit maps from Hugging Face Llama-style and "
                                 "cachefit.nn names only")
        stages.append(names)
    return stages


def pipelining_split_spec(plan: Plan) -> dict[str, str]:
    """{module FQN: "beginning"}: where each stage after the first begins, as ``pipeline(split_spec=...)`` takes
    it with ``SplitPoint.BEGINNING`` (the first module of the stage)."""
    _require_feasible(plan)
    grouped = [part.card for part in plan.partitions if part.tensor_parallel > 1]
    if grouped:
        raise InputError(f"torch.distributed.pipelining splits stages, not layers, but the stages at cards {grouped} "
                         "are tensor groups: plan with split='never'", parameters=("split",))
    spec = {}
    for part in plan.partitions[1:]:
        modules = [m for m in (part.modules or part.layers) if m not in _NOT_CALLED]
        if not modules:
            raise InputError(f"the stage at card {part.card} holds no module the forward calls")
        spec[modules[0]] = "beginning"
    return spec


_NOT_CALLED = ("model.rotary_emb",)      # transformers calls it before the first layer, not in its place


def vllm_partition(plan: Plan) -> str:
    """Decoder layers per pipeline stage, comma-separated (vLLM puts the embedding on the first stage and the
    head on the last itself). Every stage must hold at least one decoder layer."""
    _require_feasible(plan)
    counts = [sum(1 for module in (part.modules or part.layers) if is_decoder_block(module))
              for part in plan.partitions]
    if sum(counts) == 0:
        raise InputError("no decoder layers (names like model.layers.N) in this plan: vLLM cannot use it")
    empty = [index for index, count in enumerate(counts) if count == 0]
    if empty:
        raise InputError(f"cards {empty} hold no decoder layer (only the embedding or the head); vLLM needs at least "
                         "one per stage: plan for it with peer='vllm'", parameters=("peer",))
    return ",".join(str(count) for count in counts)


def export_plan(plan: Plan, target: Target) -> str:
    if target == "accelerate":
        return json.dumps(device_map(plan), indent=1) + "\n"
    if target == "torchtitan":
        return json.dumps({"module_fqns_per_model_part": torchtitan_stages(plan), "naming": "torchtitan llama3"},
                          indent=1) + "\n"
    if target == "pipelining":
        return json.dumps({"split_spec": pipelining_split_spec(plan), "num_stages": len(plan.partitions)},
                          indent=1) + "\n"
    if target == "vllm":
        widths = {part.tensor_parallel for part in plan.partitions}
        if len(widths) > 1:
            raise InputError(f"vLLM uses one tensor-parallel size for every stage; this plan's stages use "
                             f"{sorted(widths)}: re-plan with a baseline or split='never'",
                             parameters=("baseline", "split"))
        width = widths.pop()
        extra = f"# and --tensor-parallel-size {width}\n" if width > 1 else ""
        return f"VLLM_PP_LAYER_PARTITION={vllm_partition(plan)}\n{extra}"
    raise InputError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
