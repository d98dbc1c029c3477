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

import numpy as np

from cachefit.core.errors import InputError
from cachefit.core.memory import IntervalCost

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


def greedy_probe(cost: IntervalCost, limits: int | Sequence[int], max_cards: int, stop_on_empty: bool = True,
                 known: Probe | None = None, known_cards: int = 0) -> Probe:
    """Next-fit over at most ``max_cards`` cards; ``limits`` is one limit for all cards or one per card.

    ``stop_on_empty``: stop when the next layer fits no card of this limit (same-size cards: nothing can follow).
    ``known``, ``known_cards``: the first cards' runs are already known to be those of ``known`` (see
    :func:`common_cards`); the probe starts after them.
    """
    if isinstance(limits, int) and not cost.shared:
        fast = _sum_probe if cost.transient is None else _peak_probe
        return fast(cost, limits, max_cards, known, known_cards)
    lasts, footprints, extensions, first = _resume(known, known_cards)
    layers = cost.layers
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


def common_cards(below: Probe, above: Probe) -> int:
    """How many leading cards two probes place identically. Next-fit's run ends only move forward as the limit
    grows (a later-or-equal start with a larger limit reaches at least as far), so every limit between a probe's
    and a larger one's places those cards the same way too: a probe there can start after them."""
    count = 0
    for mine, theirs in zip(below.lasts, above.lasts):
        if mine != theirs:
            break
        count += 1
    return min(count, len(below.lasts) - 1, len(above.lasts) - 1)


def _resume(known: Probe | None, cards: int) -> tuple[list[int], list[int], list[int], int]:
    if known is None or cards <= 0:
        return [], [], [], 0
    return (list(known.lasts[:cards]), list(known.footprints[:cards]), list(known.extensions[:cards]),
            known.lasts[cards - 1] + 1)


def _cut(prefix: memoryview, target: int, first: int, previous: int, hint: int) -> int:
    """The last prefix index <= target from ``first`` on (the end of a run starting at ``first``).

    Runs have similar lengths: look +-64 layers around where the previous run's length says this one ends (a few
    cache lines), then in a window twice the longest run, then everywhere; each window is checked before use.
    A bisection over the whole 8 MB prefix of 1e6 layers misses the cache on every step (~1.5 us a cut).
    """
    end = len(prefix)
    low, high = first + previous - _NEAR, first + previous + _NEAR
    if not (first < low and high < end and prefix[low] <= target < prefix[high]):
        low, high = first, first + 2 * hint + 2
        if not (high < end and prefix[high] > target):
            high = end
    return bisect_right(prefix, target, low, high) - 1


def _sum_probe(cost: IntervalCost, limit: int, max_cards: int, known: Probe | None, known_cards: int) -> Probe:
    """:func:`greedy_probe` for one limit under ``sum`` with no shared tensors, inlined: the benchmarks' hot loop
    (n = 1e6 layers, 1024 cards) spends its time in Python call overhead otherwise."""
    prefix = cost.prefix.data
    lasts, footprints, extensions, first = _resume(known, known_cards)
    layers = len(prefix) - 1
    previous = hint = max(1, layers // max_cards)
    while first < layers and len(lasts) < max_cards:
        start = prefix[first]
        after = _cut(prefix, start + limit, first, previous, hint)     # prefix index just past the run
        if after <= first:
            footprints.append(0)
            extensions.append(prefix[first + 1] - start)
            lasts.append(first - 1)
            break
        footprints.append(prefix[after] - start)
        extensions.append(prefix[after + 1] - start if after < layers else -1)
        lasts.append(after - 1)
        previous = after - first
        hint = max(hint, previous)
        first = after
    return Probe(tuple(lasts), first >= layers, tuple(footprints), tuple(extensions))


def _peak_probe(cost: IntervalCost, limit: int, max_cards: int, known: Probe | None, known_cards: int) -> Probe:
    """:func:`greedy_probe` for one limit under ``peak`` with no shared tensors.

    A run from ``first`` surely holds the layers whose additive bytes stay within limit - max(transient) (one
    bisection). The layer after them joins only if its additive bytes plus the larger of its own and the first
    layer's transients fit, a lower bound of the run's footprint checked in O(1): where it fails (most cards in
    practice), that is the cut; otherwise :func:`_grow` finds it. Footprints and extensions come vectorised at
    the end.
    """
    assert cost.transient is not None
    prefix, transient = cost.prefix.data, cost.transient.data
    largest = int(cost.transient.max())
    lasts, _, _, first = _resume(known, known_cards)
    layers = len(prefix) - 1
    previous = hint = max(1, layers // max_cards)
    while first < layers and len(lasts) < max_cards:
        start = prefix[first]
        after = max(_cut(prefix, start + limit - largest, first, previous, hint), first)   # prefix index past the run
        if after < layers and prefix[after + 1] - start + max(transient[first], transient[after]) <= limit:
            after = _grow(cost, first, after, limit, previous, hint)
        lasts.append(after - 1)
        if after <= first:
            break
        previous = after - first
        hint = max(hint, previous)
        first = after
    footprints, extensions = _peak_runs(cost, lasts)
    return Probe(tuple(lasts), first >= layers, footprints, extensions)


def _grow(cost: IntervalCost, first: int, sure: int, limit: int, previous: int, hint: int) -> int:
    """Where the run from ``first`` ends (the prefix index past it), given that it holds layers first..sure - 1
    and may hold layer ``sure``. Any such run holds first..sure, so its transient is at least their maximum m:
    it ends no later than where the additive bytes reach limit - m. Just past ``sure``, m is the exact maximum;
    further on, a running maximum over the window decides."""
    assert cost.transient is not None
    prefix, start = cost.prefix.data, cost.prefix.data[first]
    held = int(cost.transient[first:sure + 1].max())
    upper = _cut(prefix, start + limit - held, first, previous, hint)
    if upper <= sure + 1:
        return max(upper, first)
    running = np.maximum.accumulate(cost.transient[first:upper])
    costs = cost.prefix[first + 1:upper + 1] - start + running
    return first + int(np.searchsorted(costs, limit, side="right"))


def _peak_runs(cost: IntervalCost, lasts: list[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Footprints and one-layer extensions of every run, vectorised (``np.maximum.reduceat``: one pass)."""
    assert cost.transient is not None
    ends = np.asarray(lasts, dtype=np.int64)
    starts = np.concatenate(([0], ends[:-1] + 1))
    empty = ends < starts
    covered = int(ends[~empty].max()) + 1 if (~empty).any() else 0
    peaks = np.zeros(len(ends), dtype=np.int64)
    if covered:
        peaks[~empty] = np.maximum.reduceat(cost.transient[:covered], starts[~empty])
    footprints = np.where(empty, 0, cost.prefix[ends + 1] - cost.prefix[starts] + peaks)
    grow = np.minimum(ends + 1, cost.layers - 1)
    extensions = cost.prefix[np.minimum(ends + 2, cost.layers)] - cost.prefix[starts]
    extensions += np.where(empty, cost.transient[grow], np.maximum(peaks, cost.transient[grow]))
    extensions[ends + 1 >= cost.layers] = -1
    return tuple(footprints.tolist()), tuple(extensions.tolist())


_NEAR = 64


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
            raise InputError(f"limit {limit} cannot place layer {first} on card {card}")
        lasts.append(last)
        first = last + 1
    return tuple(lasts)


def part_footprints(cost: IntervalCost, lasts: Sequence[int]) -> tuple[int, ...]:
    firsts = (0, *(last + 1 for last in lasts[:-1]))
    return tuple(cost.footprint(first, last) if last >= first else 0 for first, last in zip(firsts, lasts))
