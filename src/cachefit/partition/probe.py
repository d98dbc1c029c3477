"""The greedy probe every exact partitioner is built on.

Next-fit: each card, in order, takes the longest run of layers whose footprint fits its limit. For any footprint
that grows when an interval grows (both memory models do), next-fit places the end of its c-th card at least as far
as any valid plan places the end of its c-th card (induction on c: a longer run starting no later fits whenever a
shorter one starting earlier fits, by monotonicity). So next-fit covers the layers with K cards whenever any plan
can: it answers "does limit L fit in K cards?" exactly, and gives the fewest cards for a capacity.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

from cachefit.memory import IntervalCost

__all__ = ["Probe", "fill_exactly", "greedy_probe", "part_footprints"]


@dataclass(frozen=True, slots=True)
class Probe:
    """What next-fit did at some limits: where each card's run ends, and what a bigger limit would change."""

    lasts: tuple[int, ...]        # inclusive last layer per card used; last == first - 1 is an empty card
    covered: bool                 # every layer placed
    footprints: tuple[int, ...]   # footprint per card (0 for an empty card)
    extensions: tuple[int, ...]   # F(card's run + next layer): the least limit at which that card's run grows

    def firsts(self) -> tuple[int, ...]:
        return (0, *(last + 1 for last in self.lasts[:-1]))


def greedy_probe(cost: IntervalCost, limits: int | Sequence[int], max_cards: int, stop_on_empty: bool = True
                 ) -> Probe:
    """Next-fit over at most ``max_cards`` cards; ``limits`` is one limit for all cards or one per card.

    ``stop_on_empty``: stop when the next layer fits no card of this limit (same-size cards: nothing can follow).
    """
    if isinstance(limits, int) and cost.transient is None and not cost.shared:
        return _sum_probe(cost, limits, max_cards)
    layers, first = cost.layers, 0
    lasts: list[int] = []
    footprints: list[int] = []
    extensions: list[int] = []
    uniform = isinstance(limits, int)
    hint = max(1, layers // max_cards)
    while first < layers and len(lasts) < max_cards:
        limit = limits if isinstance(limits, int) else limits[len(lasts)]
        last, peak = cost.jump_with_peak(first, limit, hint)
        if last < first:
            footprints.append(0)
        else:
            footprints.append(cost.run_footprint(first, last, peak))
        extensions.append(cost.extension(first, last, peak) if last + 1 < layers else -1)
        lasts.append(last)
        if last < first and uniform and stop_on_empty:
            break
        hint = max(hint, last - first + 1)
        first = last + 1
    return Probe(tuple(lasts), first >= layers, tuple(footprints), tuple(extensions))


def _sum_probe(cost: IntervalCost, limit: int, max_cards: int) -> Probe:
    """:func:`greedy_probe` for one limit under ``sum`` with no shared tensors, inlined: the benchmarks' hot loop
    (n = 1e6 layers, 1024 cards) spends its time in Python call overhead otherwise."""
    prefix = cost.prefix.data
    end = len(prefix)
    layers, first, hint = end - 1, 0, max(1, (end - 1) // max_cards)
    lasts: list[int] = []
    footprints: list[int] = []
    extensions: list[int] = []
    while first < layers and len(lasts) < max_cards:
        start = prefix[first]
        target = start + limit
        window_end = first + 2 * hint + 2
        stop = window_end if window_end < end and prefix[window_end] > target else end
        after = bisect_right(prefix, target, first, stop) - 1     # prefix index just past the run
        if after <= first:
            footprints.append(0)
            extensions.append(prefix[first + 1] - start)
            lasts.append(first - 1)
            break
        footprints.append(prefix[after] - start)
        extensions.append(prefix[after + 1] - start if after < layers else -1)
        lasts.append(after - 1)
        hint = max(hint, after - first)
        first = after
    return Probe(tuple(lasts), first >= layers, tuple(footprints), tuple(extensions))


def fill_exactly(cost: IntervalCost, limit: int, cards: int) -> tuple[int, ...]:
    """Next-fit that leaves at least one layer for every later card: exactly ``cards`` non-empty runs.

    If next-fit at ``limit`` covers the layers with at most ``cards`` cards and there are at least ``cards`` layers,
    this covers them with exactly ``cards``: until the reserve binds it *is* next-fit; once it binds, every later
    card takes one layer, and one layer fits (next-fit covering implies every single layer fits).
    """
    layers, first = cost.layers, 0
    lasts: list[int] = []
    hint = max(1, layers // cards)
    for card in range(cards):
        reserve = cards - 1 - card
        last = layers - 1 if reserve == 0 else min(cost.jump(first, limit, hint), layers - 1 - reserve)
        hint = max(hint, last - first + 1)
        if last < first:
            raise ValueError(f"limit {limit} cannot place layer {first} on card {card}")
        lasts.append(last)
        first = last + 1
    return tuple(lasts)


def part_footprints(cost: IntervalCost, lasts: Sequence[int]) -> tuple[int, ...]:
    firsts = (0, *(last + 1 for last in lasts[:-1]))
    return tuple(cost.footprint(first, last) if last >= first else 0 for first, last in zip(firsts, lasts))
