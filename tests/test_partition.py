"""The partitioners against brute force on thousands of random tables, and exact plans on hand-sized ones."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachefit.core.layers import Layer, LayerTable
from cachefit.core.memory import IntervalCost, interval_cost
from cachefit.planning.algorithms import (
    fewest_cards,
    front_fill,
    greedy_probe,
    lower_bound,
    min_max,
    ordered_fill,
    ordered_min_max,
)

import reference
from strategies import tables

MODELS = st.sampled_from(["sum", "peak", "pipeline"])


def runs_of(lasts: tuple[int, ...]) -> list[tuple[int, int]]:
    firsts = (0, *(last + 1 for last in lasts[:-1]))
    return list(zip(firsts, lasts))


def check_cover(lasts: tuple[int, ...], layers: int, nonempty: bool = True) -> None:
    assert lasts[-1] == layers - 1
    for first, last in runs_of(lasts):
        assert last >= first - 1
        if nonempty:
            assert last >= first


@given(tables(), MODELS, st.data())
def test_footprint_and_jump_match_the_definition(table: LayerTable, model: str, data: st.DataObject) -> None:
    cost = interval_cost(table, model)
    n = len(table.layers)
    first = data.draw(st.integers(0, n - 1))
    for last in range(first, n):
        assert cost.footprint(first, last) == reference.footprint(table, model, first, last)
    limit = data.draw(st.integers(0, 200))
    fitting = [last for last in range(first, n) if reference.footprint(table, model, first, last) <= limit]
    assert cost.jump(first, limit) == (max(fitting) if fitting else first - 1)
    assert cost.jump(first, limit, hint=data.draw(st.integers(1, 5))) == cost.jump(first, limit)
    last = data.draw(st.integers(0, n - 1))
    assert cost.footprints_ending_at(last).tolist() == [reference.footprint(table, model, start, last)
                                                         for start in range(last + 1)]


@given(tables(), MODELS, st.data())
def test_min_max_is_optimal_over_exactly_k_cards(table: LayerTable, model: str, data: st.DataObject) -> None:
    cards = data.draw(st.integers(1, len(table.layers)))
    solution = min_max(interval_cost(table, model), cards)
    assert len(solution.lasts) == cards
    check_cover(solution.lasts, len(table.layers))
    assert solution.footprints == tuple(reference.footprint(table, model, a, b) for a, b in runs_of(solution.lasts))
    assert solution.bottleneck == reference.best_bottleneck(table, model, cards)
    assert lower_bound(interval_cost(table, model), cards) <= solution.bottleneck


@given(tables(), MODELS, st.integers(0, 150))
def test_fewest_cards_is_optimal(table: LayerTable, model: str, capacity: int) -> None:
    solution = fewest_cards(interval_cost(table, model), capacity)
    expected = reference.fewest_cards(table, model, capacity)
    if expected is None:
        assert solution is None
        return
    assert solution is not None and len(solution.lasts) == expected
    check_cover(solution.lasts, len(table.layers))
    assert max(solution.footprints) <= capacity


@given(tables(), MODELS, st.integers(0, 150), st.data())
def test_front_fill_uses_exactly_k_cards_in_order(table: LayerTable, model: str, capacity: int,
                                                  data: st.DataObject) -> None:
    cards = data.draw(st.integers(1, len(table.layers)))
    solution = front_fill(interval_cost(table, model), capacity, cards)
    if reference.best_bottleneck(table, model, cards) > capacity:
        assert solution is None
        return
    assert solution is not None and len(solution.lasts) == cards
    check_cover(solution.lasts, len(table.layers))
    assert all(f <= capacity for f in solution.footprints)


@given(tables(max_layers=6), MODELS, st.lists(st.integers(1, 120), min_size=1, max_size=4))
def test_cards_of_different_sizes_exact_feasibility_and_fill(table: LayerTable, model: str,
                                                             capacities: list[int]) -> None:
    cost = interval_cost(table, model)
    expected = reference.best_ordered_fill(table, model, capacities)
    filled, balanced = ordered_fill(cost, capacities), ordered_min_max(cost, capacities)
    if expected is None:
        assert filled is None and balanced is None
        return
    assert filled is not None and balanced is not None
    for solution in (filled, balanced):
        check_cover(solution.lasts, len(table.layers), nonempty=False)
        sizes = [reference.footprint(table, model, a, b) for a, b in runs_of(solution.lasts)]
        assert sizes == list(solution.footprints)
        assert all(size <= capacity for size, capacity in zip(sizes, capacities))
    fill = max(Fraction(size, capacity) for size, capacity in zip(balanced.footprints, capacities))
    assert fill == expected


def test_hand_sized_table_exact_plan() -> None:
    # Five layers, sum model, W only: [4, 1, 1, 4, 2] bytes, total 12. Two cards: the best split is
    # [4,1,1] | [4,2] = 6 | 6 (bottleneck 6 = ceil(12/2), so the averaging bound is met).
    # Three cards: [4] | [1,1,4]=6 ... or [4,1] | [1,4]=5 | [2]: bottleneck 5; 4 is impossible (4+1 > 4 forces
    # [4] | [1,1] | [4] | [2], four cards).
    table = LayerTable("hand", tuple(Layer(f"l{i}", w, 0, 0) for i, w in enumerate([4, 1, 1, 4, 2])))
    cost = interval_cost(table, "sum")
    two = min_max(cost, 2)
    assert (two.lasts, two.footprints) == ((2, 4), (6, 6))
    three = min_max(cost, 3)
    assert three.bottleneck == 5 and len(three.lasts) == 3
    assert fewest_cards(cost, 4) is not None and len(fewest_cards(cost, 4).lasts) == 4  # type: ignore[union-attr]
    assert fewest_cards(cost, 3) is None                           # layer l0 (4 bytes) fits no 3-byte card


def test_peak_model_counts_the_largest_transient_once() -> None:
    # Two layers, W = 10 each, A = 3 then 5, B = 1 then 0, input 2.
    # Transients: layer 0: in 2 + A 3 + B 1 = 6; layer 1: in 3 + A 5 + B 0 = 8.
    # peak F(0,1) = 20 + max(6, 8) = 28; sum F(0,1) = 10+3+1 + 10+5+0 = 29.
    table = LayerTable("peak", (Layer("a", 10, 3, 1), Layer("b", 10, 5, 0)), input_bytes=2)
    assert interval_cost(table, "peak").footprint(0, 1) == 28
    assert interval_cost(table, "sum").footprint(0, 1) == 29
    assert interval_cost(table, "peak").footprint(0, 0) == 16


def test_single_layer_and_k_equal_n_and_zero_sizes() -> None:
    one = LayerTable("one", (Layer("only", 7, 0, 0),))
    assert min_max(interval_cost(one, "peak"), 1).lasts == (0,)
    zeros = LayerTable("zeros", tuple(Layer(f"z{i}", 0, 0, 0) for i in range(4)))
    solution = min_max(interval_cost(zeros, "sum"), 4)
    assert solution.lasts == (0, 1, 2, 3) and solution.bottleneck == 0
    assert fewest_cards(interval_cost(zeros, "sum"), 1).lasts == (3,)  # type: ignore[union-attr]


def test_too_many_cards_is_refused_with_numbers() -> None:
    table = LayerTable("two", (Layer("a", 1, 0, 0), Layer("b", 1, 0, 0)))
    with pytest.raises(ValueError, match=r"cards \(3\) must not exceed the number of layers \(2\)"):
        min_max(interval_cost(table, "sum"), 3)


def test_large_random_table_matches_a_slow_scan() -> None:
    # At n = 2000 brute force is out of reach; check min_max against a probe-by-probe linear scan of limits
    # between the optimum's neighbours: optimum fits, optimum - 1 does not.
    rng = np.random.default_rng(7)
    for transient in (None, rng.integers(0, 10**6, 2000)):
        cost = IntervalCost(rng.integers(0, 10**7, 2000), transient)
        solution = min_max(cost, 37)
        assert greedy_probe(cost, solution.bottleneck, 37).covered
        assert not greedy_probe(cost, solution.bottleneck - 1, 37).covered
        assert len(solution.lasts) == 37


def _next_fit_by_definition(cost: IntervalCost, limit: int, cards: int) -> list[int]:
    """Next-fit straight from F: each card takes layers while the footprint of its run stays within the limit."""
    lasts, first = [], 0
    while first < cost.layers and len(lasts) < cards:
        last = first - 1
        while last + 1 < cost.layers and cost.footprint(first, last + 1) <= limit:
            last += 1
        lasts.append(last)
        if last < first:
            break
        first = last + 1
    return lasts


@given(st.integers(1, 300), st.integers(1, 40), st.integers(0, 2**32 - 1), st.sampled_from([1, 10, 10**3, 10**6]),
       st.floats(0.0, 1.0))
def test_fast_probes_place_cuts_as_next_fit_by_definition(layers: int, cards: int, seed: int, spread: int,
                                                          slack: float) -> None:
    # Long runs and transients from near-equal (spread 1) to far larger than the weights (spread 1e6): the peak
    # probe's O(1) check, its one-max bound and its running-max fallback all get taken.
    rng = np.random.default_rng(seed)
    weights, transients = rng.integers(0, 1000, layers), rng.integers(0, spread, layers) * 7
    for transient in (None, transients):
        cost = IntervalCost(weights, transient)
        single = int((weights + (0 if transient is None else transients)).max())
        limit = single + int(slack * (int(weights.sum()) // cards + (0 if transient is None else spread * 7)))
        probe = greedy_probe(cost, limit, cards)
        assert list(probe.lasts) == _next_fit_by_definition(cost, limit, cards)
        assert probe.footprints == tuple(cost.footprint(a, b) if b >= a else 0 for a, b in runs_of(probe.lasts))


def test_a_largest_layer_bottleneck_is_proven_in_one_probe() -> None:
    # W = [100, 1, 1, 1, 1, 1] bytes, sum model, 3 cards: no card can hold less than the 100-byte layer, and
    # [100] | [1, 1, 1] | [1, 1] fits within 100, so the lower bound (100) is the optimum: the first probe, at the
    # lower bound, covers the layers and ends the search.
    cost = IntervalCost(np.array([100, 1, 1, 1, 1, 1]))
    solution = min_max(cost, 3)
    assert (solution.bottleneck, solution.probes, len(solution.lasts)) == (100, 1, 3)
