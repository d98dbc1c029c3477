"""``objective="time"``: the split over k cards whose slowest predicted stage is fastest, every card within its
capacity (stage times from :mod:`cachefit.core.cost`). A pure function like
:func:`cachefit.planning.whole.make_plan`."""

from __future__ import annotations

from cachefit.core.cost import LayerCosts
from cachefit.core.layers import LayerTable
from cachefit.core.memory import MemoryModel, interval_cost
from cachefit.core.records import DeviceRecord, Plan
from cachefit.planning.algorithms import fewest_cards, lower_bound
from cachefit.planning.algorithms.timed import least_time
from cachefit.planning.builder import Settings, build_plan, refused_plan
from cachefit.planning.whole import check_arguments, stages_of

__all__ = ["make_time_plan"]


def make_time_plan(table: LayerTable, capacity: int, costs: LayerCosts, cards: int | None = None,
                   memory_model: MemoryModel = "peak", device: DeviceRecord | None = None) -> Plan:
    """Exactly ``cards`` cards (default: the fewest that fit), least slowest-stage time (exact DP over cuts)."""
    check_arguments((capacity,), cards, memory_model, "balanced")
    cost = interval_cost(table, memory_model)
    settings = Settings("whole", "time", "balanced", memory_model, device)
    fewest = fewest_cards(cost, capacity)
    count = cards if cards is not None else (len(fewest.lasts) if fewest is not None else 1)
    solution = least_time(cost, costs, capacity, count) if count <= len(table.layers) else None
    bound = lower_bound(cost, min(count, len(table.layers)))
    if solution is None:
        lines = [f"no split of the {len(table.layers)} layers over {count} cards of {capacity} bytes fits every card"
                 + (f"; the fewest that fit are {len(fewest.lasts)}" if fewest is not None else
                    "; some layer does not fit a card alone (plan with the memory objective for the diagnosis)")]
        return refused_plan(table, settings, (capacity,) * count, lower_bound=bound, diagnosis=lines)
    note = (f"objective time: slowest predicted stage {solution.bottleneck_seconds * 1e3:.4g} ms per pass "
            f"(stages: {', '.join(f'{s * 1e3:.4g}' for s in solution.seconds)} ms; cachefit predict for the "
            "pipeline)")
    return build_plan(table, settings, stages_of(solution.lasts), (capacity,) * count,
                      lower_bound=bound, optimal=True, notes=(note,))
