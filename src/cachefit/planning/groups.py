"""Plans whose stages may be tensor groups (several cards sharing each layer of a stage). Pure, like
:func:`cachefit.planning.whole.make_plan`: arguments checked first, data out."""

from __future__ import annotations

from cachefit.core.layers import LayerTable
from cachefit.core.memory import MemoryModel, interval_cost, per_card_table
from cachefit.core.records import DeviceRecord, Plan
from cachefit.core.units import format_size
from cachefit.planning import diagnose
from cachefit.planning.algorithms.split import (
    SplitOption,
    SplitSolution,
    fewest_split_cards,
    split_card_lower_bound,
    split_lower_bound,
    split_min_max,
)
from cachefit.planning.builder import Settings, Stage, build_plan, refused_plan
from cachefit.planning.whole import check_arguments

__all__ = ["make_split_plan", "split_options", "split_stages"]


def split_options(table: LayerTable, model: MemoryModel) -> list[SplitOption]:
    """Per-card interval costs for every width the table's layers allow (1 first)."""
    options = []
    for ways in table.split_ways:
        card, allowed = per_card_table(table, ways)
        options.append(SplitOption(ways, interval_cost(card, model), allowed))
    return options


def make_split_plan(table: LayerTable, capacity: int, cards: int | None = None, memory_model: MemoryModel = "peak",
                    device: DeviceRecord | None = None) -> Plan:
    """Stages of contiguous layers, each on a tensor group of any width its layers allow: the fewest cards in all
    (``cards`` None), balanced over that count, or the least bottleneck within ``cards`` cards."""
    check_arguments((capacity,), cards, memory_model, "balanced")
    options = split_options(table, memory_model)
    settings = Settings("groups", "memory", "balanced", memory_model, device)
    fewest = fewest_split_cards(options, capacity)
    if fewest is None:
        lines = diagnose.explain_unsplittable(table, memory_model, options, capacity)
        lines.append(f"whatever the split, the cards together hold every weight and KV-cache byte: at least "
                     f"{split_card_lower_bound(options, capacity)} cards of {format_size(capacity)}")
        return _refused(table, settings, capacity, cards or 1, options, lines)
    budget = fewest.cards if cards is None else cards
    best = split_min_max(options, budget)
    if best is None or best.bottleneck > capacity:
        bottleneck = best.bottleneck if best is not None else 0
        lines = diagnose.explain_too_few_cards(budget, capacity, bottleneck, fewest.cards) if best else [
            f"{budget} cards are too few for any split; the fewest that fit are {fewest.cards}"]
        return _refused(table, settings, capacity, budget, options, lines)
    notes = () if best.cards == budget else (
        f"{best.cards} of the {budget} cards suffice: more would not lower the fullest card",)
    return build_plan(table, settings, split_stages(best), (capacity,) * best.cards,
                      lower_bound=split_lower_bound(options, best.cards), optimal=True, notes=notes)


def split_stages(solution: SplitSolution) -> list[Stage]:
    return [Stage(stage.first, stage.last, stage.ways) for stage in solution.stages]


def _refused(table: LayerTable, settings: Settings, capacity: int, cards: int, options: list[SplitOption],
             lines: list[str]) -> Plan:
    return refused_plan(table, settings, (capacity,) * cards, lower_bound=split_lower_bound(options, cards),
                        diagnosis=lines)
