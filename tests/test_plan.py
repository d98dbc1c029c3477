"""make_plan: feasibility first, exact plans, diagnoses with numbers, and the plan file."""

from __future__ import annotations

import json
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cachefit
from cachefit.core.layers import Layer, LayerTable
from cachefit.core.records import Plan
from cachefit.planning import make_plan

import reference
from strategies import tables

# Four layers (bytes): W = 30, 30, 30, 30; A = 2 each; B = 1 each; input 2.
# peak, one layer: 30 + (2 + 2 + 1) = 35; two layers: 60 + 5 = 65; four: 120 + 5 = 125.
FOUR = LayerTable("four", tuple(Layer(f"l{i}", 30, 2, 1) for i in range(4)), input_bytes=2)


def test_fewest_cards_then_balanced() -> None:
    plan = make_plan(FOUR, [70])                       # two layers (65) fit, three (95) do not
    assert plan.feasible and plan.cards == 2 and plan.optimal
    assert [(p.first, p.last, p.footprint_bytes) for p in plan.partitions] == [(0, 1, 65), (2, 3, 65)]
    assert plan.bottleneck_bytes == 65 and plan.lower_bound_bytes == 65   # ceil(120/2) + 5
    part = plan.partitions[0]
    assert (part.weight_bytes, part.activation_bytes, part.workspace_bytes, part.kv_cache_bytes) == (60, 4, 1, 0)


def test_greedy_front_fills_and_balanced_spreads() -> None:
    # sum model: each layer 30 + 2 + 1 = 33. Capacity 100 holds three (99). On exactly 2 cards greedy fills the
    # first card (3 layers, 99) and leaves one (33); balanced splits 2 + 2 (66 each).
    greedy = make_plan(FOUR, [100], cards=2, memory_model="sum", strategy="greedy")
    balanced = make_plan(FOUR, [100], cards=2, memory_model="sum")
    assert [p.footprint_bytes for p in greedy.partitions] == [99, 33] and not greedy.optimal
    assert [p.footprint_bytes for p in balanced.partitions] == [66, 66]


def test_a_layer_over_capacity_is_diagnosed_with_numbers() -> None:
    plan = make_plan(FOUR, [34])
    assert not plan.feasible and plan.partitions == ()
    text = "\n".join(plan.diagnosis)
    assert "layer 0 (l0) needs 35 B" in text and "over by 1 B" in text
    assert "weights 85.7%" in text                     # 30 of 35
    assert "a card holding at least 35 B" in text


def test_too_few_cards_says_how_many_are_needed() -> None:
    plan = make_plan(FOUR, [70], cards=1)
    assert not plan.feasible
    assert "best split over 1 cards puts 125 B" in plan.diagnosis[0]
    assert "use at least 2 cards" in plan.diagnosis[1]


def test_seed_on_h100_does_not_fit_and_says_why() -> None:
    plan = cachefit.plan("seed-dense16", device="h100")
    assert not plan.feasible
    text = "\n".join(plan.diagnosis)
    assert "layer 0 (layers.0)" in text and "KV cache 99.4%" in text
    # 1.61 GB / 37.5 MiB usable = 40.96 cards' worth of memory, but its shapes split it at most 16 ways (16 heads):
    # the diagnosis recommends no width the planner cannot use.
    assert "even at its widest split (16 cards, the most its shapes allow)" in text
    assert "at least 41 cards' worth of memory" in text
    decode_batch_1 = cachefit.plan("seed-dense16", device="h100", batch=1)
    assert "weights alone (1.5 GiB) exceed the card" in "\n".join(decode_batch_1.diagnosis)


def test_smaller_batch_is_suggested_when_weights_fit() -> None:
    # Weights 10, activation 50 per batch-4 layer (input 50): peak = 10 + 50 + 50 + 0 = 110 > 60.
    table = LayerTable("b", (Layer("l0", 10, 50, 0),), input_bytes=50, batch=4, seq=8)
    text = "\n".join(make_plan(table, [60]).diagnosis)
    assert "batch <= 2 (now 4)" in text                 # room 50 of 100 batch-scaled bytes


def test_cards_of_different_sizes() -> None:
    plan = make_plan(FOUR, [70, 35, 35])
    assert plan.feasible and [p.footprint_bytes for p in plan.partitions] == [65, 35, 35]
    assert plan.capacity_bytes == (70, 35, 35)
    unused = make_plan(FOUR, [200, 35])
    assert unused.cards == 1 and "not needed" in unused.diagnosis[0]
    short = make_plan(FOUR, [35, 35, 35])
    assert not short.feasible and "layers 3..3" in short.diagnosis[0]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"capacity_bytes": [0]}, "capacity must be one or more positive"),
    ({"capacity_bytes": [10], "cards": 9}, r"cards \(9\) must not exceed the number of layers \(4\)"),
    ({"capacity_bytes": [10, 20], "cards": 3}, r"cards \(3\) must match the 2 capacities"),
    ({"capacity_bytes": [10], "strategy": "best"}, "strategy must be"),
    ({"capacity_bytes": [10], "memory_model": "max"}, "memory_model must be"),
])
def test_bad_arguments_raise_with_the_value(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_plan(FOUR, **kwargs)  # type: ignore[arg-type]


@given(tables(max_layers=6), st.sampled_from(["sum", "peak", "pipeline"]), st.integers(1, 120), st.booleans())
def test_plans_are_consistent_and_round_trip(table: LayerTable, model: str, capacity: int, balanced: bool) -> None:
    plan = make_plan(table, [capacity], memory_model=model, strategy="balanced" if balanced else "greedy")  # type: ignore[arg-type]
    assert Plan.from_dict(json.loads(plan.to_json())) == plan
    fewest = reference.fewest_cards(table, model, capacity)
    assert plan.feasible == (fewest is not None)
    if plan.feasible:
        assert plan.cards == fewest
        for part in plan.partitions:
            assert part.footprint_bytes == reference.footprint(table, model, part.first, part.last)
        if balanced:
            assert plan.bottleneck_bytes == reference.best_bottleneck(table, model, plan.cards)


def test_plan_files_are_validated(tmp_path: Path) -> None:
    plan = make_plan(FOUR, [70])
    plan.write(tmp_path / "plan.json")
    assert Plan.read(tmp_path / "plan.json") == plan
    document = plan.to_dict()
    document["partitions"][1]["first"] = 3
    with pytest.raises(ValueError, match=r"partitions\[1\] must start at card 1 and layer 2"):
        Plan.from_dict(document)
    document = plan.to_dict()
    document["partitions"][0]["footprint_bytes"] = 64
    with pytest.raises(ValueError, match="must equal the sum of its parts"):
        Plan.from_dict(document)
    with pytest.raises(ValueError, match=r"schema must be 'cachefit\.plan/v2' \(or 'cachefit\.plan/v1'\)"):
        Plan.from_dict({**plan.to_dict(), "schema": "cachefit.plan/v0"})


DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize(("name", "made", "layout", "objective", "strategy"), [
    ("plan-v1-baseline.json", lambda: cachefit.plan("tiny-llama", capacity="2GB", baseline="tp=2,pp=2"),
     "baseline", "memory", None),
    ("plan-v1-groups.json", lambda: cachefit.plan("tiny-llama", capacity="300KiB"), "groups", "memory", "balanced"),
    ("plan-v1-time.json", lambda: cachefit.plan("llama-3-8b", device="h100", capacity="2GB", objective="time"),
     "whole", "time", "balanced"),
])
def test_v1_plans_read_as_v2(name: str, made: Any, layout: str, objective: str, strategy: str | None) -> None:
    # Files written by cachefit 0.1 (schema v1: strategy "baseline" / "time" stood for the layout and objective).
    old = Plan.read(DATA / name)
    new = made()
    assert (old.layout, old.objective, old.strategy) == (layout, objective, strategy) == (
        new.layout, new.objective, new.strategy)
    document = json.loads((DATA / name).read_text())          # read as written: every partition, every byte
    assert [(p.card, p.first, p.last, p.tensor_parallel, p.footprint_bytes) for p in old.partitions] == [
        (p["card"], p["first"], p["last"], p.get("tensor_parallel", 1), p["footprint_bytes"])
        for p in document["partitions"]]
    assert old.feasible == document["feasible"] and old.model.spec == new.model.spec
    assert Plan.from_dict(json.loads(old.to_json())) == old          # and it is written back as v2
    assert old.to_dict()["schema"] == "cachefit.plan/v2"


def test_a_card_too_small_for_the_next_layer_is_left_out() -> None:
    # tiny-llama's embedding alone needs about 257 KiB: a first card of 100 B holds nothing, the second all.
    plan = cachefit.plan("tiny-llama", capacity="100,20MB")
    assert plan.feasible and plan.cards == 1 and plan.capacity_bytes == (20_000_000,)
    assert "card 0 holds no layer" in plan.diagnosis[0] and "the given cards 1" in plan.diagnosis[0]
    Plan.from_dict(json.loads(plan.to_json()))                        # and the plan reads back


@given(tables(max_layers=6), st.sampled_from(["sum", "peak"]), st.lists(st.integers(1, 120), min_size=2, max_size=4))
def test_plans_over_cards_of_different_sizes_match_enumeration(table: LayerTable, model: str,
                                                               capacities: list[int]) -> None:
    # Two or more capacities: cards in that order, any of them possibly left empty (one capacity means same-size
    # cards, as many as needed). The plan keeps the cards that got layers and is as good as the best assignment.
    expected = reference.best_ordered_fill(table, model, capacities)
    plan = make_plan(table, capacities, memory_model=model)        # type: ignore[arg-type]
    assert plan.feasible == (expected is not None)
    if plan.feasible:
        assert Plan.from_dict(json.loads(plan.to_json())) == plan
        fills = [Fraction(p.footprint_bytes, plan.capacity_bytes[p.card]) for p in plan.partitions]
        assert max(fills) == expected and all(fill <= 1 for fill in fills)
        assert all(size in capacities for size in plan.capacity_bytes)


@st.composite
def _decoder_tables(draw: st.DrawFn) -> LayerTable:
    """Random tables of decoder blocks (``model.layers.N``) with other layers before and after them (an embedding;
    a norm, a head), as in the models vLLM runs."""
    table = draw(tables(max_layers=7))
    n = len(table.layers)
    first = draw(st.integers(0, n - 1))
    last = draw(st.integers(first, n - 1))
    kinds = [first <= i <= last for i in range(n)]
    names = {x.name: (f"model.layers.{i}" if kind else f"other{i}") for i, (x, kind) in
             enumerate(zip(table.layers, kinds))}
    layers = tuple(replace(x, name=names[x.name], modules=(names[x.name],),
                           shared=tuple(replace(s, owner=names[s.owner]) for s in x.shared)) for x in table.layers)
    return replace(table, layers=layers)


@settings(max_examples=150, deadline=None)
@given(_decoder_tables(), st.sampled_from(["sum", "peak", "pipeline"]), st.integers(1, 4))
def test_plans_for_vllm_are_optimal_with_a_decoder_layer_in_every_stage(table: LayerTable, model: str,
                                                                       cards: int) -> None:
    from cachefit import api
    from cachefit.core.spec import is_decoder_block
    from cachefit.planning.peers import for_peer

    decoders = sum(is_decoder_block(x.name) for x in table.layers)
    if cards > decoders:
        return
    plan = api.plan(table, capacity=1 << 40, cards=cards, memory_model=model, split="never", peer="vllm")
    assert plan.feasible and plan.peer == "vllm" and len(plan.partitions) == cards
    assert all(any(is_decoder_block(name) for name in p.layers) for p in plan.partitions)
    allowed = [runs for runs in reference.compositions(len(table.layers), cards)
               if all(any(is_decoder_block(table.layers[i].name) for i in range(a, b + 1)) for a, b in runs)]
    best = min(max(reference.footprint(table, model, a, b) for a, b in runs) for runs in allowed)
    # Each stage's bytes are the original table's, exactly.
    for p in plan.partitions:
        assert p.footprint_bytes == reference.footprint(table, model, p.first, p.last)
    assert plan.bottleneck_bytes >= best
    if for_peer(table, "vllm", model).exact:      # no unit's workspace had to be clipped at 0
        assert plan.optimal and plan.bottleneck_bytes == best


def _set_footprint(table: LayerTable, model: str, held: list[int]) -> int:
    """DESIGN.md's footprints for a card holding any set of layers (each run at its own time)."""
    layers = table.layers
    names = {layers[i].name for i in held}
    shared = {(s.owner, s.tensor): s.bytes for i in held for s in layers[i].shared if s.owner not in names}
    total = sum(layers[i].weight_bytes + layers[i].kv_cache_bytes for i in held) + sum(shared.values())
    if model == "sum":
        return total + sum(layers[i].activation_bytes + layers[i].workspace_bytes for i in held)
    receive = max((x.activation_bytes for x in layers[:-1]), default=0) if model == "pipeline" else 0
    incoming = [table.input_bytes, *(x.activation_bytes for x in layers[:-1])]
    return total + receive + max(incoming[i] + layers[i].activation_bytes + layers[i].workspace_bytes for i in held)


@settings(max_examples=150, deadline=None)
@given(tables(max_layers=6), st.sampled_from(["sum", "peak", "pipeline"]), st.integers(1, 4))
def test_plans_for_accelerate_are_optimal_with_tied_layers_on_their_owners_card(table: LayerTable, model: str,
                                                                               cards: int) -> None:
    from cachefit import api
    from cachefit.planning.peers import for_peer

    units = for_peer(table, "accelerate", model)
    if cards > len(units.members):
        return
    plan = api.plan(table, capacity=1 << 40, cards=cards, memory_model=model, split="never", peer="accelerate")
    assert plan.feasible and len(plan.partitions) == cards
    # Units of consecutive layers come back on the original layers; a tied layer out of order keeps the units'.
    held = [list(range(p.first, p.last + 1)) if units.contiguous else
            [i for u in range(p.first, p.last + 1) for i in units.members[u]] for p in plan.partitions]
    assert sorted(i for card in held for i in card) == list(range(len(table.layers)))
    for p, card in zip(plan.partitions, held):               # a user of a shared tensor sits with its owner
        names = {table.layers[i].name for i in card}
        assert all(s.owner in names for i in card for s in table.layers[i].shared)
        assert p.footprint_bytes >= _set_footprint(table, model, card)
        assert p.footprint_bytes == _set_footprint(table, model, card) or not units.exact
    best = min(max(_set_footprint(table, model, [i for u in range(a, b + 1) for i in units.members[u]])
                   for a, b in runs) for runs in reference.compositions(len(units.members), cards))
    assert plan.bottleneck_bytes >= best
    if units.exact:
        assert plan.optimal and plan.bottleneck_bytes == best
