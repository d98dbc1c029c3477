"""The plan records: a plan, its partitions, the model and the device it was made for, and their JSON schema.

Plain data. Every planner makes them through one builder (``cachefit.planning.builder``); every reader (predict,
shard, run, export, report) takes them from :meth:`Plan.read`, which validates the file once, here.

A plan keeps three choices apart: its ``layout`` (``whole``: one card per stage, whole layers; ``groups``: stages
may be tensor groups; ``baseline``: the classic TP x PP layout), its ``objective`` (``memory``: the least fullest
card; ``time``: the least slowest predicted stage) and its ``strategy`` (``balanced``: optimal for the objective;
``greedy``: filled in card order; none where the layout fixes the stages). And two facts: whether a plan was
found (``partitions``, :attr:`Plan.found`) and whether it fits on-chip (``feasible``: every card within its
capacity). A baseline is always found; it may not fit.

Schema ``cachefit.plan/v2``; files of ``v1`` (strategy ``baseline`` / ``time`` standing for the layout and the
objective) are read as well (docs/contract-changes.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, GetCoreSchemaHandler, ValidationError
from pydantic_core import core_schema

from cachefit.core.columns import NameRange
from cachefit.core.errors import InputError
from cachefit.core.files import adapter, atomic_write_text, describe_validation_error, json_text, read_json_object
from cachefit.core.hardware import Device
from cachefit.core.layers import LayerTable
from cachefit.core.memory import MemoryModel
from cachefit.core.spec import Phase, SpecRecord

__all__ = ["LAYOUTS", "OBJECTIVES", "SCHEMA", "STRATEGIES", "CardSummary", "DeviceRecord", "LayerCheck", "Layout",
           "ModelInfo", "Objective", "Partition", "Plan", "RunSummary", "Strategy", "Verification"]

SCHEMA = "cachefit.plan/v2"
_V1 = "cachefit.plan/v1"
Layout = Literal["whole", "groups", "baseline"]
Objective = Literal["memory", "time"]
Strategy = Literal["balanced", "greedy"]
LAYOUTS: tuple[Layout, ...] = ("whole", "groups", "baseline")
OBJECTIVES: tuple[Objective, ...] = ("memory", "time")
STRATEGIES: tuple[Strategy, ...] = ("balanced", "greedy")
_Bytes = Annotated[int, Field(ge=0, strict=True)]
_Count = Annotated[int, Field(ge=1, strict=True)]
_Index = Annotated[int, Field(ge=0, strict=True)]
_STRICT = ConfigDict(extra="forbid", strict=True)


class _Names:
    """A partition's layer names: a tuple of strings from JSON; in Python also a NameRange (no copy)."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        names = core_schema.tuple_schema([core_schema.str_schema()], variadic_item_index=0)
        return core_schema.json_or_python_schema(
            json_schema=names,
            python_schema=core_schema.union_schema([core_schema.is_instance_schema(NameRange), names]))


@dataclass(frozen=True, slots=True)
class Partition:
    """One stage: layers ``first..last`` on cards ``card..card + tensor_parallel - 1`` (a tensor group; 1: a card
    holds the layers whole). Byte columns are per card: every card of a group holds the same share."""

    __pydantic_config__ = _STRICT
    card: _Index
    first: _Index
    last: _Index
    layers: Annotated[Sequence[str], _Names]     # a NameRange over the table's names when a builder made it
    weight_bytes: _Bytes
    activation_bytes: _Bytes
    workspace_bytes: _Bytes
    kv_cache_bytes: _Bytes
    footprint_bytes: _Bytes
    modules: Annotated[Sequence[str], _Names] = ()   # module FQNs / checkpoint prefixes of its layers (exports)
    tensor_parallel: _Count = 1

    @property
    def cards(self) -> tuple[int, ...]:
        return tuple(range(self.card, self.card + self.tensor_parallel))

    def holds(self, name: str) -> bool:
        """Whether the module or tensor ``name`` is the stage's: one of its modules, or inside one."""
        return any(name == prefix or name.startswith(prefix + ".") for prefix in self.modules or self.layers)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The model record: which table a plan was made for (its fingerprint) and what it keeps of it."""

    __pydantic_config__ = _STRICT
    name: str
    fingerprint: str
    layers: _Count
    dtype: str | None = None
    batch: int | None = None
    seq: int | None = None
    phase: Phase | None = None
    spec: SpecRecord | None = None
    prefill_chunk: int | None = None     # a Hugging Face decode profile that also counted a pass of this many
                                         # prompt tokens per sequence (a spec's is in its record)

    @classmethod
    def of(cls, table: LayerTable) -> ModelInfo:
        return cls(table.name, table.fingerprint, len(table.layers), table.dtype, table.batch, table.seq,
                   table.phase, table.spec, table.prefill_chunk)

    @property
    def chunk(self) -> int:
        """Prompt tokens per sequence a pass may carry (1: one token a pass)."""
        return self.prefill_chunk or (self.spec.prefill_chunk if self.spec else None) or 1


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """What a plan keeps of the catalog device it was made for."""

    __pydantic_config__ = _STRICT
    name: str
    label: str
    memory: str
    on_chip_bytes: _Bytes
    usable_fraction: float
    capacity_bytes: _Bytes

    @classmethod
    def of(cls, device: Device) -> DeviceRecord:
        return cls(device.name, device.label, device.memory, device.on_chip_bytes, device.usable_fraction,
                   device.capacity_bytes)


@dataclass(frozen=True, slots=True)
class Plan:
    __pydantic_config__ = _STRICT
    feasible: bool                  # every card holds its partition within its capacity (on-chip)
    layout: Layout
    objective: Objective
    strategy: Strategy | None       # None: the layout fixes the stages (baseline)
    memory_model: MemoryModel
    capacity_bytes: Annotated[tuple[Annotated[int, Field(gt=0)], ...], Field(min_length=1)]
    cards: _Count
    bottleneck_bytes: _Bytes
    lower_bound_bytes: _Bytes
    model: ModelInfo
    partitions: tuple[Partition, ...] = ()
    diagnosis: tuple[str, ...] = ()
    optimal: bool = False           # the bottleneck of its objective proven least for this card count
    device: DeviceRecord | None = None
    peer: Literal["vllm", "accelerate"] | None = None   # planned under that peer's constraint (planning/peers.py)

    @property
    def found(self) -> bool:
        """A plan was found (it has partitions), whether or not it fits on-chip."""
        return bool(self.partitions)

    def to_dict(self) -> dict[str, Any]:
        # Field by field, not asdict(): asdict deep-copies every layer name (25 s for a plan of 1e6 layers).
        document = {"schema": SCHEMA, **{f.name: getattr(self, f.name) for f in fields(self)}}
        document["capacity_bytes"] = list(self.capacity_bytes)
        document["model"] = {**asdict(self.model), "spec": None if self.model.spec is None
                             else self.model.spec.to_dict()}
        if self.model.prefill_chunk is None:
            document["model"].pop("prefill_chunk")      # written only when set: plans without it read as before
        document["partitions"] = [{**{f.name: getattr(p, f.name) for f in fields(p)}, "layers": list(p.layers),
                                   "modules": list(p.modules), "cards": list(p.cards)} for p in self.partitions]
        document["diagnosis"] = list(self.diagnosis)
        document["device"] = None if self.device is None else asdict(self.device)
        if self.peer is None:
            document.pop("peer")        # written only when set: plans without it read as before
        return document

    def to_json(self) -> str:
        return json_text(self.to_dict())

    def write(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json())

    def check_in_layer_order(self, verb: str) -> None:
        """``shard``, ``run`` and ``predict`` take stages of consecutive layers; a plan for accelerate may run a tied
        head on the embedding's card, out of order."""
        if self.peer == "accelerate":
            raise InputError(f"this plan was made for accelerate (a tied head may share the embedding's card, out of "
                             f"layer order): it is for export to accelerate; {verb} needs a plan made without "
                             "peer='accelerate'", parameters=("peer",))

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
        """Validate a plan document (v2, or v1 read as v2) and what a reader may rely on."""
        body = dict(document)
        schema = body.pop("schema", None)
        if schema == _V1:
            body = _from_v1(body)
        elif schema != SCHEMA:
            raise InputError(f"{source}: schema must be '{SCHEMA}' (or '{_V1}'), got {schema!r}")
        spec = _model_spec(body, source)
        _drop_derived_cards(body, source)
        try:
            plan = adapter(Plan).validate_json(json.dumps(body))
        except ValidationError as error:
            raise InputError(describe_validation_error(error, source)) from error
        plan = replace(plan, model=replace(plan.model, spec=spec))
        _check_plan(plan, source)
        return plan


def _model_spec(body: dict[str, Any], source: str) -> SpecRecord | None:
    """The model's spec record, read by its own reader (its JSON form is flat); the rest is left to validate."""
    model = body.get("model")
    if not isinstance(model, dict) or model.get("spec") is None:
        return None
    model = dict(model)
    spec = SpecRecord.read(model["spec"], f"{source}: model.spec")
    model["spec"] = None
    body["model"] = model
    return spec


def _drop_derived_cards(body: dict[str, Any], source: str) -> None:
    """Each partition's ``cards`` is written for readers; it must be what ``card`` and ``tensor_parallel`` give."""
    partitions = body.get("partitions")
    if not isinstance(partitions, list):
        return
    body["partitions"] = [dict(p) if isinstance(p, dict) else p for p in partitions]
    for index, part in enumerate(body["partitions"]):
        if not isinstance(part, dict) or "cards" not in part:
            continue
        cards, card, ways = part.pop("cards"), part.get("card"), part.get("tensor_parallel", 1)
        if isinstance(card, int) and isinstance(ways, int) and cards != list(range(card, card + ways)):
            raise InputError(f"{source}: partitions[{index}].cards must be {card}..{card + ways - 1} (card and "
                             f"tensor_parallel), got {cards}")


def _from_v1(body: dict[str, Any]) -> dict[str, Any]:
    """A v1 plan in v2 terms: strategy ``baseline`` was the layout, ``time`` the objective."""
    strategy = body.get("strategy")
    grouped = any(isinstance(p, dict) and p.get("tensor_parallel", 1) != 1 for p in body.get("partitions", []))
    layout = "baseline" if strategy == "baseline" else "groups" if grouped else "whole"
    objective = "time" if strategy == "time" else "memory"
    return {**body, "layout": layout, "objective": objective,
            "strategy": None if strategy == "baseline" else "balanced" if strategy == "time" else strategy}


def _check_plan(plan: Plan, source: str) -> None:
    """What a reader may rely on: contiguous partitions in card order, covering every layer, sums that add up,
    and, when the plan says it fits, every card within its capacity."""
    if not plan.partitions:
        if plan.layout == "baseline" or plan.feasible:
            raise InputError(f"{source}: a {'baseline' if plan.layout == 'baseline' else 'feasible'} plan must "
                             "list its partitions")
        return
    expected_first = expected_card = 0
    for index, part in enumerate(plan.partitions):
        where = f"{source}: partitions[{index}]"
        if part.card != expected_card or part.first != expected_first or part.last < part.first:
            raise InputError(f"{where} must start at card {expected_card} and layer {expected_first}, got card "
                             f"{part.card} layers {part.first}..{part.last}")
        if len(part.layers) != part.last - part.first + 1:
            raise InputError(f"{where}.layers must name its {part.last - part.first + 1} layers "
                             f"{part.first}..{part.last}, got {len(part.layers)}")
        if part.footprint_bytes != (part.weight_bytes + part.activation_bytes + part.workspace_bytes
                                    + part.kv_cache_bytes):
            raise InputError(f"{where}.footprint_bytes must equal the sum of its parts, got {part.footprint_bytes}")
        if plan.feasible and part.footprint_bytes > plan.capacity_bytes[min(part.card, len(plan.capacity_bytes) - 1)]:
            raise InputError(f"{where}.footprint_bytes {part.footprint_bytes} exceeds its card's capacity")
        expected_first, expected_card = part.last + 1, part.card + part.tensor_parallel
    if expected_first != plan.model.layers or expected_card != plan.cards:
        raise InputError(f"{source}: partitions must cover layers 0..{plan.model.layers - 1} on {plan.cards} cards")


# --- what a run measured (runtime.summary makes it from the ranks' reports; --report writes it) ---
@dataclass(frozen=True, slots=True)
class CardSummary:
    """One card of a run: where its time went (seconds) and what it held (bytes) against its plan."""

    card: int
    layers: tuple[int, int]
    tensor_parallel: int
    compute_s: float
    allreduce_s: float
    wait_s: float
    send_s: float
    planned_bytes: int
    measured_bytes: int
    over_plan_bytes: int
    memory: Mapping[str, int]
    residency: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class StepTrace:
    """One pass on one card: seconds computing, waiting in receives, finishing sends, and the rest of its wall
    time (framework: bookkeeping, posting sends, picking tokens)."""

    compute_s: float
    wait_s: float
    send_s: float
    framework_s: float


@dataclass(frozen=True, slots=True)
class CardTrace:
    """A card's decode steps, and the gloo hops into it (seconds; none for one stage, or across hosts)."""

    card: int
    steps: tuple[StepTrace, ...]
    hops_s: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        def median_ms(values: list[float]) -> float | None:
            return sorted(values)[len(values) // 2] * 1e3 if values else None
        kinds = ("compute_s", "wait_s", "send_s", "framework_s")
        return {"card": self.card,
                "decode_step_median_ms": {k[:-2]: median_ms([getattr(s, k) for s in self.steps]) for k in kinds},
                "hop_median_ms": median_ms(list(self.hops_s)),
                "decode_steps_ms": [[round(getattr(s, k) * 1e3, 4) for k in kinds] for s in self.steps],
                "hops_ms": [round(hop * 1e3, 4) for hop in self.hops_s]}


@dataclass(frozen=True, slots=True)
class RunSummary:
    prefill_tokens_per_s: float | None
    decode_tokens_per_s: float | None
    tpot_median_ms: float | None
    tpot_p90_ms: float | None
    total_s: float
    prefill_chunk: int | None
    cards: tuple[CardSummary, ...]
    traces: tuple[CardTrace, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "traces"}
        document["trace"] = [trace.to_dict() for trace in self.traces]
        document["cards"] = [{**asdict(card), "layers": list(card.layers), "memory": dict(card.memory),
                              "residency": None if card.residency is None else dict(card.residency)}
                             for card in self.cards]
        return document


@dataclass(frozen=True, slots=True)
class LayerCheck:
    """One layer's estimate (the profile on meta) against a real forward on this host: its activation plus
    workspace, and whether its weights and KV cache matched to the byte."""

    name: str
    estimate_bytes: int
    measured_bytes: int
    weights_match: bool
    kv_cache_match: bool

    @property
    def ratio(self) -> float:
        """Estimate over measurement (>= 1: never under); inf when nothing was measured."""
        return self.estimate_bytes / self.measured_bytes if self.measured_bytes else float("inf")

    @property
    def under(self) -> bool:
        return self.estimate_bytes < self.measured_bytes or not (self.weights_match and self.kv_cache_match)


@dataclass(frozen=True, slots=True)
class Verification:
    """A profile checked against a real forward of the same model and workload on this host."""

    model: str
    phase: str
    checks: tuple[LayerCheck, ...]

    @property
    def trusted(self) -> bool:
        """No estimate below its measurement (and weights and KV cache exact): plans of it can be trusted."""
        return not any(check.under for check in self.checks)
