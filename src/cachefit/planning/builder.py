"""The one builder every planner uses: stages in, a :class:`~cachefit.core.records.Plan` out.

A planner decides where stages end and how wide each is; the builder measures each stage on its cards (one card's
share of a tensor group), decides whether the plan fits on-chip (every card within its capacity), and records the
choices that made it. Plans that found nothing go through :func:`refused_plan`.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

from cachefit.core.columns import NameRange
from cachefit.core.layers import LayerTable
from cachefit.core.memory import Breakdown, MemoryModel, SharedUse, breakdowns, per_card_table, shared_uses
from cachefit.core.records import DeviceRecord, Layout, ModelInfo, Objective, Partition, Plan, Strategy

__all__ = ["Settings", "Stage", "build_plan", "refused_plan"]


@dataclass(frozen=True, slots=True)
class Settings:
    """The choices a plan was made with."""

    layout: Layout
    objective: Objective
    strategy: Strategy | None
    memory_model: MemoryModel
    device: DeviceRecord | None = None


@dataclass(frozen=True, slots=True)
class Stage:
    """Layers ``first..last`` on a group of ``ways`` cards (1: one card holding them whole)."""

    first: int
    last: int
    ways: int = 1


def build_plan(table: LayerTable, settings: Settings, stages: Sequence[Stage], capacities: Sequence[int], *,
               lower_bound: int, optimal: bool, notes: Sequence[str] = ()) -> Plan:
    """The plan of ``stages`` (contiguous, covering every layer, in card order) on cards of ``capacities`` (one
    per card; a group's cards share one size): each stage's per-card footprint by kind, and whether all fit."""
    shares = {ways: per_card_table(table, ways)[0] for ways in {stage.ways for stage in stages}}
    # A shared tensor is held per card as its owner holds it at the stage's width (a vocab-parallel head: its
    # slice of the tied embedding), as the partitioners count it.
    uses = {ways: shared_uses(share) for ways, share in shares.items()}
    parts = _measured(shares, uses, settings.memory_model, stages)
    every = table.columns.names
    names = [NameRange(every, stage.first, stage.last + 1) for stage in stages]
    partitions, card = [], 0
    for stage, part, layers, held in zip(stages, parts, names, _module_lists(table, stages, names)):
        partitions.append(Partition(card, stage.first, stage.last, layers, part.weight_bytes, part.activation_bytes,
                                    part.workspace_bytes, part.kv_cache_bytes, part.footprint_bytes, held,
                                    stage.ways))
        card += stage.ways
    if card != len(capacities):
        raise AssertionError(f"the stages take {card} cards but {len(capacities)} capacities were given")
    fits = all(p.footprint_bytes <= capacities[p.card] for p in partitions)
    return Plan(feasible=fits, layout=settings.layout, objective=settings.objective, strategy=settings.strategy,
                memory_model=settings.memory_model, capacity_bytes=tuple(capacities), cards=card,
                bottleneck_bytes=max(p.footprint_bytes for p in partitions), lower_bound_bytes=lower_bound,
                model=ModelInfo.of(table), partitions=tuple(partitions), diagnosis=tuple(notes), optimal=optimal,
                device=settings.device)


def _measured(shares: dict[int, LayerTable], uses: dict[int, tuple[SharedUse, ...]], model: MemoryModel,
              stages: Sequence[Stage]) -> list[Breakdown]:
    """Each stage's per-card breakdown at its width (every stage measured on each width's table at once)."""
    firsts, lasts = [stage.first for stage in stages], [stage.last for stage in stages]
    measured = {ways: breakdowns(share, model, firsts, lasts, uses[ways]) for ways, share in shares.items()}
    return [measured[stage.ways][i] for i, stage in enumerate(stages)]


def _module_lists(table: LayerTable, stages: Sequence[Stage], names: list[NameRange]) -> list[Sequence[str]]:
    """Each stage's module FQNs: its layers' ``names``, except where a layer lists its modules."""
    columns = table.columns
    listed = sorted(i for i, layer in columns.extras.items() if layer.modules)
    lists: list[Sequence[str]] = []
    for stage, stage_names in zip(stages, names):
        held: Sequence[str] = stage_names
        if listed[bisect_left(listed, stage.first):bisect_right(listed, stage.last)]:
            held = tuple(m for i in range(stage.first, stage.last + 1)
                         for m in (columns.extras[i].modules if i in columns.extras and columns.extras[i].modules
                                   else (columns.names[i],)))
        lists.append(held)
    return lists


def refused_plan(table: LayerTable, settings: Settings, capacities: Sequence[int], *, lower_bound: int,
                 diagnosis: Sequence[str], cards: int | None = None) -> Plan:
    """No plan found: the cards it was asked for (``cards``, default one per capacity), a proven lower bound, and
    why, in words a user can act on."""
    return Plan(feasible=False, layout=settings.layout, objective=settings.objective, strategy=settings.strategy,
                memory_model=settings.memory_model, capacity_bytes=tuple(capacities),
                cards=len(capacities) if cards is None else cards,
                bottleneck_bytes=0, lower_bound_bytes=lower_bound, model=ModelInfo.of(table),
                diagnosis=tuple(diagnosis), device=settings.device)
