"""Exact partitioners over an :class:`~cachefit.core.memory.IntervalCost` (pure: arrays in, layer indices out)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from cachefit.core.errors import InputError
from cachefit.core.memory import IntervalCost
from cachefit.planning.algorithms.probe import Probe, common_cards, fill_exactly, greedy_probe

__all__ = [
    "Solution",
    "fewest_cards",
    "front_fill",
    "lower_bound",
    "min_max",
    "ordered_fill",
    "ordered_min_max",
    "single_layer_footprints",
]


@dataclass(frozen=True, slots=True)
class Solution:
    lasts: tuple[int, ...]       # inclusive last layer of each card, in card order
    footprints: tuple[int, ...]  # footprint per card
    probes: int                  # greedy probes the search ran (a cost measure for the benchmarks)

    @property
    def bottleneck(self) -> int:
        return max(self.footprints)


def single_layer_footprints(cost: IntervalCost) -> np.ndarray:
    """F(l, l) for every layer l, vectorised (read-only: it may be ``cost.additive`` itself)."""
    singles = cost.additive if cost.transient is None else cost.additive + cost.transient
    if not cost.shared:
        return singles
    singles = singles.copy()
    for use in cost.shared:
        singles[list(use.users)] += use.bytes
    return singles


def lower_bound(cost: IntervalCost, cards: int) -> int:
    """A proven lower bound on the best bottleneck over ``cards`` cards: the largest single layer, and the
    averaging bound (the cards hold every additive byte, plus each at least the smallest transient term)."""
    return max(_bounds(cost, cards))


def _bounds(cost: IntervalCost, cards: int) -> tuple[int, int]:
    """(the largest single layer, the averaging bound): the two lower bounds :func:`lower_bound` takes the max of."""
    smallest_transient = int(cost.transient.min()) if cost.transient is not None else 0
    average = -(-(int(cost.prefix[-1]) + cards * smallest_transient) // cards)
    return int(single_layer_footprints(cost).max()), average


def _upper_bound(cost: IntervalCost, cards: int) -> int:
    """A limit at which next-fit surely needs at most ``cards`` cards. Each full card's run could not take the next
    layer, so its additive bytes exceed limit - (largest additive + largest transient + all shared bytes); with
    limit = ceil(total/cards) + that slack, ``cards`` full runs would hold more than the total."""
    slack = int(cost.additive.max()) + sum(use.bytes for use in cost.shared)
    if cost.transient is not None:
        slack += int(cost.transient.max())
    return -(-int(cost.prefix[-1]) // cards) + slack


def fewest_cards(cost: IntervalCost, capacity: int) -> Solution | None:
    """The fewest same-size cards of ``capacity`` (next-fit is optimal; see probe.py); None if a layer is over."""
    probe = greedy_probe(cost, capacity, cost.layers)
    return Solution(probe.lasts, probe.footprints, 1) if probe.covered else None


def front_fill(cost: IntervalCost, capacity: int, cards: int) -> Solution | None:
    """The seed's algorithm 1 on exactly ``cards`` cards: fill each in order, leaving one layer per later card."""
    _check_cards(cost, cards)
    if not greedy_probe(cost, capacity, cards).covered:
        return None
    lasts = fill_exactly(cost, capacity, cards)
    return Solution(lasts, _footprints(cost, lasts), 1)


def min_max(cost: IntervalCost, cards: int) -> Solution:
    """The least bottleneck over exactly ``cards`` non-empty contiguous runs, proven optimal.

    Bisection on the limit with next-fit as the exact feasibility test, moving by values a plan can take: a
    feasible probe lowers ``high`` to the bottleneck it achieved; an infeasible one raises ``low`` to the least
    extension of its runs, since no smaller limit changes any run. ``low`` stays a proven lower bound and
    ``high`` an achieved bottleneck; they meet at the optimum.

    When the largest layer is the lower bound, the first probe is at it: a layer alone on its card (an
    embedding, a head once there are many cards) is often the optimum, and one probe proves it. The averaging
    bound is rarely met exactly (next-fit leaves each card a part of a layer short), so there the search starts
    by bisecting.
    """
    _check_cards(cost, cards)
    single, average = _bounds(cost, cards)
    low, high = max(single, average), _upper_bound(cost, cards)
    best: Probe | None = None
    probes = 0
    below: Probe | None = None      # the probe at the largest limit that failed
    while best is None or low < high:
        limit = low if probes == 0 and single >= average else (low + high) // 2 if low < high else high
        fixed = common_cards(below, best) if below is not None and best is not None else 0
        probe = greedy_probe(cost, limit, cards, known=below, known_cards=fixed)
        probes += 1
        if probe.covered:
            best, high = probe, max(probe.footprints)
        else:
            below, low = probe, max(limit + 1, min(e for e in probe.extensions if e >= 0))
    if len(best.lasts) == cards:
        return Solution(best.lasts, best.footprints, probes)
    lasts = fill_exactly(cost, high, cards)
    return Solution(lasts, _footprints(cost, lasts), probes)


def ordered_fill(cost: IntervalCost, capacities: Sequence[int]) -> Solution | None:
    """Cards of different sizes in a fixed order, each filled in turn (next-fit: exact feasibility); trailing
    cards may stay unused. None when the cards cannot hold every layer."""
    probe = greedy_probe(cost, list(capacities), len(capacities), stop_on_empty=False)
    if not probe.covered:
        return None
    return Solution(_trim(probe.lasts), _trim_footprints(probe), 1)


def ordered_min_max(cost: IntervalCost, capacities: Sequence[int]) -> Solution | None:
    """Cards of different sizes in a fixed order: the least possible maximum fill (footprint / capacity), proven
    optimal by the same value-moving bisection as :func:`min_max`, over the fill ratio as an exact fraction."""
    first = greedy_probe(cost, list(capacities), len(capacities), stop_on_empty=False)
    if not first.covered:
        return None
    best, probes = first, 1
    low, high = Fraction(0), _max_fill(first, capacities)
    while low < high:
        ratio = (low + high) / 2
        limits = [int(ratio * capacity) for capacity in capacities]   # floor: exact for non-negative fractions
        probe = greedy_probe(cost, limits, len(capacities), stop_on_empty=False)
        probes += 1
        if probe.covered:
            best, high = probe, _max_fill(probe, capacities)
        else:
            low = min(Fraction(e, c) for e, c in zip(probe.extensions, capacities) if e >= 0)
    return Solution(_trim(best.lasts), _trim_footprints(best), probes)


def _max_fill(probe: Probe, capacities: Sequence[int]) -> Fraction:
    return max(Fraction(f, c) for f, c in zip(probe.footprints, capacities))


def _trim(lasts: tuple[int, ...]) -> tuple[int, ...]:
    """Drop trailing cards that next-fit left empty once every layer was placed."""
    end = len(lasts)
    while end > 1 and lasts[end - 1] == lasts[end - 2]:
        end -= 1
    return lasts[:end]


def _trim_footprints(probe: Probe) -> tuple[int, ...]:
    return probe.footprints[:len(_trim(probe.lasts))]


def _footprints(cost: IntervalCost, lasts: Sequence[int]) -> tuple[int, ...]:
    firsts = (0, *(last + 1 for last in lasts[:-1]))
    return tuple(cost.footprint(first, last) for first, last in zip(firsts, lasts))


def _check_cards(cost: IntervalCost, cards: int) -> None:
    if cards < 1:
        raise InputError(f"cards must be at least 1, got {cards}")
    if cards > cost.layers:
        raise InputError(f"cards ({cards}) must not exceed the number of layers ({cost.layers}): "
                         "each card holds at least one whole layer")
