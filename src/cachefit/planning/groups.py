"""Plans whose stages may be tensor groups (several cards sharing each layer of a stage), and the classic TP x PP
baseline as a plan. Pure functions like :func:`cachefit.planning.plan.make_plan`: arguments checked first, data out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cachefit.core.errors import InputError
from cachefit.core.layers import LayerTable
from cachefit.core.memory import MemoryModel, breakdown, interval_cost, per_card_table
from cachefit.core.units import format_size
from cachefit.planning import diagnose
from cachefit.planning.algorithms.split import (
    SplitOption,
    SplitSolution,
    SplitStage,
    fewest_split_cards,
    split_card_lower_bound,
    split_lower_bound,
    split_min_max,
)
from cachefit.planning.plan import ModelInfo, Partition, Plan, check_arguments

__all__ = ["make_baseline_plan", "make_split_plan", "parse_baseline", "split_options"]


def split_options(table: LayerTable, model: MemoryModel) -> list[SplitOption]:
    """Per-card interval costs for every width the table's layers allow (1 first)."""
    options = []
    for ways in table.split_ways:
        card, allowed = per_card_table(table, ways)
        options.append(SplitOption(ways, interval_cost(card, model), allowed))
    return options


def make_split_plan(table: LayerTable, capacity: int, cards: int | None = None, memory_model: MemoryModel = "peak",
                    device: Mapping[str, Any] | None = None) -> Plan:
    """Stages of contiguous layers, each on a tensor group of any width its layers allow: the fewest cards in all
    (``cards`` None), balanced over that count, or the least bottleneck within ``cards`` cards."""
    check_arguments((capacity,), cards, memory_model, "balanced")
    options = split_options(table, memory_model)
    base: dict[str, Any] = dict(memory_model=memory_model, strategy="balanced", model=ModelInfo.of(table),
                                device=device)
    fewest = fewest_split_cards(options, capacity)
    if fewest is None:
        lines = diagnose.explain_unsplittable(table, memory_model, options, capacity)
        lines.append(f"whatever the split, the cards together hold every weight and KV-cache byte: at least "
                     f"{split_card_lower_bound(options, capacity)} cards of {format_size(capacity)}")
        return _refused(base, capacity, cards or 1, options, lines)
    budget = fewest.cards if cards is None else cards
    best = split_min_max(options, budget)
    if best is None or best.bottleneck > capacity:
        bottleneck = best.bottleneck if best is not None else 0
        lines = diagnose.explain_too_few_cards(budget, capacity, bottleneck, fewest.cards) if best else [
            f"{budget} cards are too few for any split; the fewest that fit are {fewest.cards}"]
        return _refused(base, capacity, budget, options, lines)
    notes = () if best.cards == budget else (
        f"{best.cards} of the {budget} cards suffice: more would not lower the fullest card",)
    return _plan(table, options, best, (capacity,) * best.cards, base, True, notes)


def parse_baseline(text: str) -> tuple[int, int]:
    """``tp=8,pp=2`` -> (8, 2)."""
    values: dict[str, int] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key.strip() not in ("tp", "pp") or not value.strip().isdigit() or int(value) < 1:
            raise InputError(f"--baseline must look like tp=8,pp=2 (positive integers), got {text!r}")
        values[key.strip()] = int(value)
    return values.get("tp", 1), values.get("pp", 1)


def make_baseline_plan(table: LayerTable, capacity: int, tensor_parallel: int, pipeline_stages: int,
                       memory_model: MemoryModel = "peak", device: Mapping[str, Any] | None = None) -> Plan:
    """The classic layout: ``pipeline_stages`` stages of equal layer counts (the first ones one more when they do
    not divide), every layer split ``tensor_parallel`` ways. Built whether or not it fits; ``feasible`` says
    whether every card holds its share on-chip (if not, its weights stream from off-chip memory every pass)."""
    n = len(table.layers)
    if not 1 <= pipeline_stages <= n:
        raise InputError(f"pp must be between 1 and the number of layers ({n}), got {pipeline_stages}")
    options = {option.ways: option for option in split_options(table, memory_model)}
    option = options.get(tensor_parallel)
    if option is None or not option.allowed.all():
        refused = [x.name for x in table.layers if x.split(tensor_parallel) is None]
        allowed = sorted(w for w, o in options.items() if o.allowed.all())
        raise InputError(f"tp={tensor_parallel} is not a split every layer allows ({', '.join(refused[:3])} do "
                         f"not); widths they all allow: {', '.join(map(str, allowed))}")
    size, extra = divmod(n, pipeline_stages)
    stages, first = [], 0
    for stage in range(pipeline_stages):
        last = first + size + (1 if stage < extra else 0) - 1
        stages.append(SplitStage(first, last, tensor_parallel, option.cost.footprint(first, last)))
        first = last + 1
    solution = SplitSolution(tuple(stages))
    fits = solution.bottleneck <= capacity
    verdict = (f"baseline tp={tensor_parallel} x pp={pipeline_stages} on {solution.cards} cards: the fullest card "
               f"holds {format_size(solution.bottleneck)}, {solution.bottleneck / capacity:.2f}x its "
               f"{format_size(capacity)} on-chip capacity: ")
    verdict += "fits on-chip" if fits else "does not fit on-chip, so its weights stream from off-chip memory"
    base: dict[str, Any] = dict(memory_model=memory_model, strategy="baseline", model=ModelInfo.of(table),
                                device=device)
    return _plan(table, list(options.values()), solution, (capacity,) * solution.cards, base, False, (verdict,),
                 feasible=fits)


def _refused(base: dict[str, Any], capacity: int, cards: int, options: Sequence[SplitOption], lines: list[str]
             ) -> Plan:
    return Plan(feasible=False, capacity_bytes=(capacity,) * cards, cards=cards, bottleneck_bytes=0,
                lower_bound_bytes=split_lower_bound(options, cards), diagnosis=tuple(lines), **base)


def _plan(table: LayerTable, options: Sequence[SplitOption], solution: SplitSolution, capacities: tuple[int, ...],
          base: dict[str, Any], optimal: bool, notes: tuple[str, ...], feasible: bool = True) -> Plan:
    by_ways = {option.ways: option for option in options}
    shares = {ways: per_card_table(table, ways)[0] for ways in {stage.ways for stage in solution.stages}}
    partitions, card = [], 0
    for stage in solution.stages:
        parts = breakdown(shares[stage.ways], base["memory_model"], stage.first, stage.last,
                          by_ways[stage.ways].cost.shared)
        layers = table.layers[stage.first:stage.last + 1]
        partitions.append(Partition(card, stage.first, stage.last, tuple(x.name for x in layers), parts.weight_bytes,
                                    parts.activation_bytes, parts.workspace_bytes, parts.kv_cache_bytes,
                                    parts.footprint_bytes, tuple(m for x in layers for m in (x.modules or (x.name,))),
                                    stage.ways))
        card += stage.ways
    return Plan(feasible=feasible, capacity_bytes=capacities, cards=card, bottleneck_bytes=solution.bottleneck,
                lower_bound_bytes=split_lower_bound(options, card), partitions=tuple(partitions), diagnosis=notes,
                optimal=optimal, **base)
