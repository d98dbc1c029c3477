"""``plan --objective time``: the split over k cards whose slowest predicted stage is fastest, every card within
its capacity. A pure function like :func:`cachefit.planning.plan.make_plan`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cachefit.core.layers import LayerTable
from cachefit.core.memory import MemoryModel, interval_cost
from cachefit.planning.algorithms import Solution, fewest_cards
from cachefit.planning.algorithms.timed import StageCosts, least_time
from cachefit.planning.plan import ModelInfo, Plan, build_plan

__all__ = ["make_time_plan"]


def make_time_plan(table: LayerTable, capacity: int, costs: StageCosts, cards: int | None = None,
                   memory_model: MemoryModel = "peak", device: Mapping[str, Any] | None = None) -> Plan:
    """Exactly ``cards`` cards (default: the fewest that fit), least slowest-stage time (exact DP over cuts)."""
    cost = interval_cost(table, memory_model)
    base: dict[str, Any] = dict(memory_model=memory_model, strategy="time", model=ModelInfo.of(table), device=device)
    fewest = fewest_cards(cost, capacity)
    count = cards if cards is not None else (len(fewest.lasts) if fewest is not None else 1)
    solution = least_time(cost, costs, capacity, count) if count <= len(table.layers) else None
    if solution is None:
        lines = [f"no split of the {len(table.layers)} layers over {count} cards of {capacity} bytes fits every card"
                 + (f"; the fewest that fit are {len(fewest.lasts)}" if fewest is not None else
                    "; some layer does not fit a card alone (plan without --objective time for the diagnosis)")]
        return Plan(feasible=False, capacity_bytes=(capacity,) * count, cards=count, bottleneck_bytes=0,
                    lower_bound_bytes=0, diagnosis=tuple(lines), **base)
    footprints = tuple(cost.footprint(first, last) for first, last in
                       zip([0, *[x + 1 for x in solution.lasts[:-1]]], solution.lasts))
    note = (f"objective time: slowest predicted stage {solution.bottleneck_seconds * 1e3:.4g} ms per pass "
            f"(stages: {', '.join(f'{s * 1e3:.4g}' for s in solution.seconds)} ms; cachefit predict for the "
            "pipeline)")
    return build_plan(table, base, (capacity,) * count, cost, Solution(solution.lasts, footprints, 0), False, (note,))
