"""Whole-layer plans: each card holds a contiguous run of whole layers. Pure: arguments checked first, data out.

When nothing fits, the plan comes back with ``feasible=False`` and a diagnosis (a user question, not an error);
bad arguments raise :class:`~cachefit.core.errors.InputError` naming the argument and its value.
"""

from __future__ import annotations

from collections.abc import Sequence

from cachefit.core.errors import InputError
from cachefit.core.layers import LayerTable
from cachefit.core.memory import MEMORY_MODELS, IntervalCost, MemoryModel, interval_cost
from cachefit.core.records import STRATEGIES, DeviceRecord, Plan, Strategy
from cachefit.planning import diagnose
from cachefit.planning.algorithms import (
    fewest_cards,
    front_fill,
    lower_bound,
    min_max,
    ordered_fill,
    ordered_min_max,
)
from cachefit.planning.builder import Settings, Stage, build_plan, refused_plan

__all__ = ["check_arguments", "make_plan", "stages_of"]


def make_plan(table: LayerTable, capacity_bytes: Sequence[int], cards: int | None = None,
              memory_model: MemoryModel = "peak", strategy: Strategy = "balanced",
              device: DeviceRecord | None = None, larger_devices: Sequence[tuple[str, int]] = ()) -> Plan:
    """Partition ``table`` over cards of ``capacity_bytes`` (one entry: same-size cards; several: one per card,
    in order). ``cards``: exactly that many same-size cards; None: the fewest that fit."""
    capacities = check_arguments(capacity_bytes, cards, memory_model, strategy)
    if cards is not None:
        check_card_count(cards, len(table.layers))
    cost = interval_cost(table, memory_model)
    settings = Settings("whole", "memory", strategy, memory_model, device)
    if len(capacities) > 1:
        return _plan_ordered(table, cost, capacities, settings, larger_devices)
    capacity = capacities[0]
    oversized = diagnose.oversized_layers(table, cost, capacity)
    if oversized:
        count = cards or 1
        return refused_plan(table, settings, (capacity,) * count, lower_bound=lower_bound(cost, count),
                            diagnosis=_oversized_lines(table, memory_model, cost, capacity, oversized, device,
                                                      larger_devices))
    fewest = fewest_cards(cost, capacity)
    assert fewest is not None  # every layer fits alone, so next-fit places them all
    count = cards if cards is not None else len(fewest.lasts)
    if strategy == "greedy":
        solution = fewest if cards is None else front_fill(cost, capacity, count)
    else:
        solution = min_max(cost, count)
    if solution is None or solution.bottleneck > capacity:
        best = solution.bottleneck if solution is not None else min_max(cost, count).bottleneck
        return refused_plan(table, settings, (capacity,) * count, lower_bound=lower_bound(cost, count),
                            diagnosis=diagnose.explain_too_few_cards(count, capacity, best, len(fewest.lasts)))
    return build_plan(table, settings, stages_of(solution.lasts), (capacity,) * count,
                      lower_bound=lower_bound(cost, count), optimal=strategy == "balanced")


def stages_of(lasts: Sequence[int]) -> list[Stage]:
    """Whole-layer stages from each card's last layer."""
    firsts = (0, *(last + 1 for last in lasts[:-1]))
    return [Stage(first, last) for first, last in zip(firsts, lasts)]


def _oversized_lines(table: LayerTable, memory_model: MemoryModel, cost: IntervalCost, capacity: int,
                     oversized: list[int], device: DeviceRecord | None, larger_devices: Sequence[tuple[str, int]]
                     ) -> list[str]:
    need = cost.footprint(oversized[0], oversized[0])
    lines = diagnose.explain_oversized(table, memory_model, cost, capacity, oversized,
                                       [d for d in larger_devices if d[1] >= need])
    if device is not None and device.on_chip_bytes > capacity:
        lines.insert(1, f"{device.label}'s whole on-chip memory ({device.on_chip_bytes} bytes, of which {capacity} "
                        f"are assumed usable) is {need / device.on_chip_bytes:.1f}x too small for that layer")
    return lines


def _plan_ordered(table: LayerTable, cost: IntervalCost, capacities: tuple[int, ...], settings: Settings,
                  larger_devices: Sequence[tuple[str, int]]) -> Plan:
    oversized = diagnose.oversized_layers(table, cost, max(capacities))
    count = min(len(capacities), cost.layers)
    if oversized:
        lines = diagnose.explain_oversized(table, settings.memory_model, cost, max(capacities), oversized,
                                           larger_devices)
        return refused_plan(table, settings, capacities, lower_bound=lower_bound(cost, count), diagnosis=lines,
                            cards=count)
    balanced = settings.strategy == "balanced"
    solution = ordered_min_max(cost, capacities) if balanced else ordered_fill(cost, capacities)
    if solution is None:
        lines = diagnose.explain_order(table, cost, capacities, _ordered_reach(cost, capacities))
        return refused_plan(table, settings, capacities, lower_bound=lower_bound(cost, count), diagnosis=lines,
                            cards=count)
    # Next-fit in card order may leave a card empty (too small for the next layer) as well as trailing ones: the
    # plan holds the cards that got layers, in order, and says which of the given ones it left out.
    used = [card for card, last in enumerate(solution.lasts) if last > (solution.lasts[card - 1] if card else -1)]
    lasts = [solution.lasts[card] for card in used]
    return build_plan(table, settings, stages_of(lasts), [capacities[card] for card in used],
                      lower_bound=lower_bound(cost, len(used)), optimal=balanced,
                      notes=_unused_cards(used, len(capacities)))


def _unused_cards(used: list[int], given: int) -> tuple[str, ...]:
    if len(used) == given:
        return ()
    if used == list(range(len(used))):
        return (f"cards {len(used)}..{given - 1} are not needed: the first {len(used)} hold every layer",)
    left = [card for card in range(given) if card not in used]
    which = f"card {left[0]} holds" if len(left) == 1 else f"cards {', '.join(map(str, left))} hold"
    return (f"of the {given} cards given, {which} no layer (too small for the layer that came next, or not "
            f"needed): the plan's cards 0..{len(used) - 1} are the given cards {', '.join(map(str, used))}",)


def _ordered_reach(cost: IntervalCost, capacities: tuple[int, ...]) -> int:
    first = 0
    for capacity in capacities:
        first = cost.jump(first, capacity) + 1
    return first


def check_arguments(capacity_bytes: Sequence[int], cards: int | None, memory_model: str, strategy: str
                    ) -> tuple[int, ...]:
    """Bad arguments of a planner raise InputError naming the argument and its value; the capacities back."""
    if memory_model not in MEMORY_MODELS:
        raise InputError(f"memory_model must be one of {', '.join(MEMORY_MODELS)}, got {memory_model!r}",
                         parameters=("memory_model",))
    if strategy not in STRATEGIES:
        raise InputError(f"strategy must be 'balanced' or 'greedy', got {strategy!r}", parameters=("strategy",))
    capacities = tuple(capacity_bytes)
    if not capacities or any(not isinstance(c, int) or isinstance(c, bool) or c <= 0 for c in capacities):
        raise InputError(f"capacity must be one or more positive byte counts, got {list(capacities)!r}",
                         parameters=("capacity",))
    if cards is not None and (not isinstance(cards, int) or isinstance(cards, bool) or cards < 1):
        raise InputError(f"cards must be a positive integer, got {cards!r}", parameters=("cards",))
    if len(capacities) > 1 and cards is not None and cards != len(capacities):
        raise InputError(f"cards ({cards}) must match the {len(capacities)} capacities given (one per card), "
                         "or be left out", parameters=("cards",))
    return capacities


def check_card_count(cards: int, layers: int) -> None:
    if cards > layers:
        raise InputError(f"cards ({cards}) must not exceed the number of layers ({layers}): each card holds at "
                         "least one whole layer", parameters=("cards",))
