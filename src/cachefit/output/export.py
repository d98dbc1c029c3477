"""A plan in the formats peers read: accelerate/transformers ``device_map``, torchtitan stage FQNs, vLLM's
``VLLM_PP_LAYER_PARTITION``. Pure functions of the plan's partitions and their module FQNs."""

from __future__ import annotations

import json
from typing import Literal

from cachefit.core.errors import InputError
from cachefit.core.records import Plan
from cachefit.core.spec import is_decoder_block

__all__ = ["TARGETS", "Target", "device_map", "export_plan", "torchtitan_stages", "vllm_partition"]

Target = Literal["accelerate", "torchtitan", "vllm"]
TARGETS: tuple[Target, ...] = ("accelerate", "torchtitan", "vllm")


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


def torchtitan_stages(plan: Plan) -> list[list[str]]:
    """Module FQNs per pipeline stage (torchtitan's ``module_fqns_per_model_part``)."""
    _require_feasible(plan)
    return [list(part.modules or part.layers) for part in plan.partitions]


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
                         "one per stage: plan with fewer cards for vLLM", parameters=("cards",))
    return ",".join(str(count) for count in counts)


def export_plan(plan: Plan, target: Target) -> str:
    if target == "accelerate":
        return json.dumps(device_map(plan), indent=1) + "\n"
    if target == "torchtitan":
        return json.dumps({"module_fqns_per_model_part": torchtitan_stages(plan)}, indent=1) + "\n"
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
