"""A plan: which contiguous layers go on which card. Plain data, made by one pure function, stored as JSON.

``make_plan`` checks feasibility first; when nothing fits it returns a Plan with ``feasible=False`` and a diagnosis
(a user question, not an error). Bad arguments raise ``ValueError`` naming the argument and its value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cachefit.core.errors import InputError
from cachefit.core.files import atomic_write_text, describe_validation_error, read_json_object
from cachefit.core.layers import LayerTable
from cachefit.core.memory import MEMORY_MODELS, IntervalCost, MemoryModel, breakdown, interval_cost
from cachefit.planning import diagnose
from cachefit.planning.algorithms import (
    Solution,
    fewest_cards,
    front_fill,
    lower_bound,
    min_max,
    ordered_fill,
    ordered_min_max,
)

__all__ = ["SCHEMA", "STRATEGIES", "ModelInfo", "Partition", "Plan", "Strategy", "build_plan", "check_arguments",
           "make_plan"]

SCHEMA = "cachefit.plan/v1"
Strategy = Literal["balanced", "greedy", "baseline", "time"]
STRATEGIES: tuple[Strategy, ...] = ("balanced", "greedy")  # make_plan's; "baseline": split_plan, "time": timed_plan


@dataclass(frozen=True, slots=True)
class Partition:
    """One stage: layers ``first..last`` on cards ``card..card + tensor_parallel - 1`` (a tensor group; 1: a card
    holds the layers whole). Byte columns are per card: every card of a group holds the same share."""

    card: int
    first: int
    last: int
    layers: tuple[str, ...]
    weight_bytes: int
    activation_bytes: int
    workspace_bytes: int
    kv_cache_bytes: int
    footprint_bytes: int
    modules: tuple[str, ...] = ()   # module FQNs / checkpoint prefixes of its layers (for exports)
    tensor_parallel: int = 1

    @property
    def cards(self) -> tuple[int, ...]:
        return tuple(range(self.card, self.card + self.tensor_parallel))


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    fingerprint: str
    layers: int
    dtype: str | None = None
    batch: int | None = None
    seq: int | None = None
    phase: str | None = None
    spec: Mapping[str, Any] | None = None

    @classmethod
    def of(cls, table: LayerTable) -> ModelInfo:
        return cls(table.name, table.fingerprint, len(table.layers), table.dtype, table.batch, table.seq,
                   table.phase, None if table.spec is None else dict(table.spec))


@dataclass(frozen=True, slots=True)
class Plan:
    feasible: bool
    memory_model: MemoryModel
    strategy: Strategy
    capacity_bytes: tuple[int, ...]
    cards: int
    bottleneck_bytes: int
    lower_bound_bytes: int
    model: ModelInfo
    partitions: tuple[Partition, ...] = ()
    diagnosis: tuple[str, ...] = ()
    optimal: bool = False           # bottleneck proven minimal for this card count (balanced strategy)
    device: Mapping[str, Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        document = {"schema": SCHEMA, **asdict(self)}
        document["capacity_bytes"] = list(self.capacity_bytes)
        document["model"] = asdict(self.model)
        document["partitions"] = [{**asdict(p), "layers": list(p.layers), "modules": list(p.modules),
                                   "cards": list(p.cards)} for p in self.partitions]
        document["diagnosis"] = list(self.diagnosis)
        return document

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def write(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json())

    def partition_of(self, card: int) -> Partition:
        """The stage card ``card`` works on."""
        found = next((p for p in self.partitions if card in p.cards), None)
        if found is None:
            raise InputError(f"card {card} is not in this plan (cards 0..{self.cards - 1})")
        return found

    @classmethod
    def read(cls, path: str | Path) -> Plan:
        return cls.from_dict(read_json_object(Path(path), "plan"), source=str(path))

    @classmethod
    def from_dict(cls, document: Mapping[str, Any], source: str = "plan") -> Plan:
        try:
            model = _PlanModel.model_validate(document)
        except ValidationError as error:
            raise InputError(describe_validation_error(error, source)) from error
        for index, p in enumerate(model.partitions):
            if p.cards is not None and p.cards != list(range(p.card, p.card + p.tensor_parallel)):
                last = p.card + p.tensor_parallel - 1
                raise InputError(f"{source}: partitions[{index}].cards must be {p.card}..{last} (card and "
                                 f"tensor_parallel), got {p.cards}")
        partitions = tuple(Partition(**{**p.model_dump(exclude={"cards"}), "layers": tuple(p.layers),
                                        "modules": tuple(p.modules)}) for p in model.partitions)
        plan = cls(feasible=model.feasible, memory_model=model.memory_model, strategy=model.strategy,
                   capacity_bytes=tuple(model.capacity_bytes), cards=model.cards,
                   bottleneck_bytes=model.bottleneck_bytes, lower_bound_bytes=model.lower_bound_bytes,
                   model=ModelInfo(**model.model.model_dump()), partitions=partitions,
                   diagnosis=tuple(model.diagnosis), optimal=model.optimal, device=model.device)
        _check_plan(plan, source)
        return plan


def make_plan(table: LayerTable, capacity_bytes: Sequence[int], cards: int | None = None,
              memory_model: MemoryModel = "peak", strategy: Strategy = "balanced",
              device: Mapping[str, Any] | None = None,
              larger_devices: Sequence[tuple[str, int]] = ()) -> Plan:
    """Partition ``table`` over cards of ``capacity_bytes`` (one entry: same-size cards; several: one per card,
    in order). ``cards``: exactly that many same-size cards; None: the fewest that fit."""
    capacities = check_arguments(capacity_bytes, cards, memory_model, strategy)
    if cards is not None:
        _check_card_count(cards, len(table.layers))
    cost = interval_cost(table, memory_model)
    base = dict(memory_model=memory_model, strategy=strategy, model=ModelInfo.of(table), device=device)
    if len(capacities) > 1:
        return _plan_ordered(table, cost, capacities, base, larger_devices)
    capacity = capacities[0]
    oversized = diagnose.oversized_layers(table, cost, capacity)
    if oversized:
        need = cost.footprint(oversized[0], oversized[0])
        lines = diagnose.explain_oversized(table, memory_model, cost, capacity, oversized,
                                           [d for d in larger_devices if d[1] >= need])
        if device is not None and device.get("on_chip_bytes", capacity) > capacity:
            on_chip = int(device["on_chip_bytes"])
            lines.insert(1, f"{device.get('label', 'the device')}'s whole on-chip memory ({on_chip} bytes, of which "
                            f"{capacity} are assumed usable) is {need / on_chip:.1f}x too small for that layer")
        count = cards or 1
        return _infeasible(base, (capacity,) * count, count, cost, lines)
    fewest = fewest_cards(cost, capacity)
    assert fewest is not None  # every layer fits alone, so next-fit places them all
    count = cards if cards is not None else len(fewest.lasts)
    if strategy == "greedy":
        solution = fewest if cards is None else front_fill(cost, capacity, count)
        optimal = False
    else:
        solution = min_max(cost, count)
        optimal = True
    if solution is None or solution.bottleneck > capacity:
        best = solution.bottleneck if solution is not None else min_max(cost, count).bottleneck
        lines = diagnose.explain_too_few_cards(count, capacity, best, len(fewest.lasts))
        return _infeasible(base, (capacity,) * count, count, cost, lines)
    return build_plan(table, base, (capacity,) * count, cost, solution, optimal, ())


def _plan_ordered(table: LayerTable, cost: IntervalCost, capacities: tuple[int, ...], base: dict[str, Any],
                  larger_devices: Sequence[tuple[str, int]]) -> Plan:
    model: MemoryModel = base["memory_model"]
    oversized = diagnose.oversized_layers(table, cost, max(capacities))
    if oversized:
        lines = diagnose.explain_oversized(table, model, cost, max(capacities), oversized, larger_devices)
        return _infeasible(base, capacities, len(capacities), cost, lines)
    balanced = base["strategy"] == "balanced"
    solution = ordered_min_max(cost, capacities) if balanced else ordered_fill(cost, capacities)
    if solution is None:
        probe_reach = _ordered_reach(cost, capacities)
        return _infeasible(base, capacities, len(capacities), cost,
                           diagnose.explain_order(table, cost, capacities, probe_reach))
    used = len(solution.lasts)
    notes = () if used == len(capacities) else (
        f"cards {used}..{len(capacities) - 1} are not needed: the first {used} hold every layer",)
    return build_plan(table, base, capacities[:used], cost, solution, balanced, notes)


def _ordered_reach(cost: IntervalCost, capacities: tuple[int, ...]) -> int:
    first = 0
    for capacity in capacities:
        first = cost.jump(first, capacity) + 1
    return first


def build_plan(table: LayerTable, base: dict[str, Any], capacities: tuple[int, ...], cost: IntervalCost,
               solution: Solution, optimal: bool, notes: tuple[str, ...]) -> Plan:
    """The plan of ``solution`` (each card's last layer) over ``table``: partitions with their footprints."""
    partitions = []
    first = 0
    for card, last in enumerate(solution.lasts):
        parts = breakdown(table, base["memory_model"], first, last, cost.shared)
        layers = table.layers[first:last + 1]
        partitions.append(Partition(card, first, last, tuple(x.name for x in layers), parts.weight_bytes,
                                    parts.activation_bytes, parts.workspace_bytes, parts.kv_cache_bytes,
                                    parts.footprint_bytes, tuple(m for x in layers for m in (x.modules or (x.name,)))))
        first = last + 1
    return Plan(feasible=True, capacity_bytes=capacities, cards=len(partitions),
                bottleneck_bytes=solution.bottleneck, lower_bound_bytes=lower_bound(cost, len(partitions)),
                partitions=tuple(partitions), diagnosis=notes, optimal=optimal, **base)


def _infeasible(base: dict[str, Any], capacities: tuple[int, ...], count: int, cost: IntervalCost,
                lines: list[str]) -> Plan:
    count = min(count, cost.layers)
    return Plan(feasible=False, capacity_bytes=capacities, cards=count, bottleneck_bytes=0,
                lower_bound_bytes=lower_bound(cost, count), diagnosis=tuple(lines), **base)


def check_arguments(capacity_bytes: Sequence[int], cards: int | None, memory_model: str, strategy: str
                    ) -> tuple[int, ...]:
    """Bad arguments of a planner raise ValueError naming the argument and its value; the capacities back."""
    if memory_model not in MEMORY_MODELS:
        raise InputError(f"memory_model must be one of {', '.join(MEMORY_MODELS)}, got {memory_model!r}")
    if strategy not in STRATEGIES:
        raise InputError(f"strategy must be 'balanced' or 'greedy', got {strategy!r}")
    capacities = tuple(capacity_bytes)
    if not capacities or any(not isinstance(c, int) or isinstance(c, bool) or c <= 0 for c in capacities):
        raise InputError(f"capacity must be one or more positive byte counts, got {list(capacities)!r}")
    if cards is not None and (not isinstance(cards, int) or isinstance(cards, bool) or cards < 1):
        raise InputError(f"cards must be a positive integer, got {cards!r}")
    if len(capacities) > 1 and cards is not None and cards != len(capacities):
        raise InputError(f"cards ({cards}) must match the {len(capacities)} capacities given (one per card), "
                         "or be left out")
    return capacities


def _check_card_count(cards: int, layers: int) -> None:
    if cards > layers:
        raise InputError(f"cards ({cards}) must not exceed the number of layers ({layers}): each card holds at "
                         "least one whole layer")


def _check_plan(plan: Plan, source: str) -> None:
    """What a reader may rely on: contiguous partitions in card order, covering every layer, sums that add up.
    A baseline plan is the classic layout whatever it holds: its cards may be over capacity (it then streams)."""
    if not plan.feasible and not plan.partitions:
        return
    expected_first = expected_card = 0
    for index, part in enumerate(plan.partitions):
        where = f"{source}: partitions[{index}]"
        if part.card != expected_card or part.first != expected_first or part.last < part.first:
            raise InputError(f"{where} must start at card {expected_card} and layer {expected_first}, got card "
                             f"{part.card} layers {part.first}..{part.last}")
        if part.footprint_bytes != (part.weight_bytes + part.activation_bytes + part.workspace_bytes
                                    + part.kv_cache_bytes):
            raise InputError(f"{where}.footprint_bytes must equal the sum of its parts, got {part.footprint_bytes}")
        if plan.strategy != "baseline" and part.footprint_bytes > plan.capacity_bytes[
                min(part.card, len(plan.capacity_bytes) - 1)]:
            raise InputError(f"{where}.footprint_bytes {part.footprint_bytes} exceeds its card's capacity")
        expected_first, expected_card = part.last + 1, part.card + part.tensor_parallel
    if expected_first != plan.model.layers or expected_card != plan.cards:
        raise InputError(f"{source}: partitions must cover layers 0..{plan.model.layers - 1} on {plan.cards} cards")


# --- validated JSON shape ---
_Bytes = Annotated[int, Field(ge=0, strict=True)]


class _PartitionModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    card: Annotated[int, Field(ge=0)]
    first: Annotated[int, Field(ge=0)]
    last: Annotated[int, Field(ge=0)]
    layers: list[str]
    weight_bytes: _Bytes
    activation_bytes: _Bytes
    workspace_bytes: _Bytes
    kv_cache_bytes: _Bytes
    footprint_bytes: _Bytes
    modules: list[str] = []
    tensor_parallel: Annotated[int, Field(ge=1)] = 1
    cards: list[int] | None = None     # written for readers; always card..card + tensor_parallel - 1


class _ModelInfoModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    fingerprint: str
    layers: Annotated[int, Field(ge=1)]
    dtype: str | None = None
    batch: int | None = None
    seq: int | None = None
    phase: str | None = None
    spec: dict[str, Any] | None = None


class _PlanModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    schema_: Annotated[Literal["cachefit.plan/v1"], Field(alias="schema")]
    feasible: bool
    memory_model: MemoryModel
    strategy: Strategy
    capacity_bytes: Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=1)]
    device: dict[str, Any] | None = None
    cards: Annotated[int, Field(ge=1)]
    bottleneck_bytes: _Bytes
    lower_bound_bytes: _Bytes
    optimal: bool = False
    model: _ModelInfoModel
    partitions: list[_PartitionModel] = []
    diagnosis: list[str] = []
