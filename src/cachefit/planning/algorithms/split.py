"""Exact partitioning with tensor groups: a stage is a contiguous run of layers on t cards, each card holding its
share of every layer of the run (t = 1: whole layers). Pure: per-width interval costs in, stages out.

Fewest cards under a limit X is a DP over stage ends, f[j] = min over t of f[i] + t for stages i..j-1 split t
ways with F_t(i, j-1) <= X. Two facts make it linear in n per width:
- F_t grows with its interval, so the stages ending at j-1 that fit start at i >= lo_t(j), and lo_t(j) never
  decreases with j (a two-pointer sweep);
- f is non-decreasing (cutting the last stage short keeps every card within X), so the best start is lo_t(j).
The least bottleneck for a card budget is the least integer X whose DP needs at most that many cards: footprints
are integers, so bisection on X is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from cachefit.core.memory import IntervalCost

__all__ = ["SplitOption", "SplitSolution", "SplitStage", "fewest_split_cards", "split_card_lower_bound",
           "split_lower_bound", "split_min_max"]


@dataclass(frozen=True, slots=True)
class SplitOption:
    """Layers split ``ways`` ways: per-card costs, and which layers allow that width at all."""

    ways: int
    cost: IntervalCost
    allowed: npt.NDArray[np.bool_]
    last_blocked: npt.NDArray[np.int64] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # last_blocked[l]: the last layer <= l that cannot be split this way (-1: none), for O(1) interval checks.
        blocked = np.where(~self.allowed, np.arange(len(self.allowed)), -1)
        object.__setattr__(self, "last_blocked", np.maximum.accumulate(blocked) if len(blocked) else blocked)

    def earliest_start(self, last: int) -> int:
        """The first layer a stage ending at ``last`` may start at (layers before it cannot take this width)."""
        return int(self.last_blocked[last]) + 1


@dataclass(frozen=True, slots=True)
class SplitStage:
    first: int
    last: int
    ways: int
    footprint: int      # per card


@dataclass(frozen=True, slots=True)
class SplitSolution:
    stages: tuple[SplitStage, ...]

    @property
    def cards(self) -> int:
        return sum(stage.ways for stage in self.stages)

    @property
    def bottleneck(self) -> int:
        return max(stage.footprint for stage in self.stages)


def fewest_split_cards(options: Sequence[SplitOption], limit: int) -> SplitSolution | None:
    """The fewest cards over all stage boundaries and widths with every card within ``limit``; None if some layer
    fits no width. Ties go to the narrower groups (less all-reduce traffic)."""
    n = options[0].cost.layers
    inf = np.iinfo(np.int64).max
    cards = np.full(n + 1, inf, dtype=np.int64)
    cards[0] = 0
    choice: list[tuple[int, int]] = [(0, 0)] * (n + 1)       # (start, option index) of the stage ending at j-1
    starts = [0] * len(options)
    for end in range(1, n + 1):
        for index, option in enumerate(options):
            start = max(starts[index], option.earliest_start(end - 1))
            while start < end and option.cost.footprint(start, end - 1) > limit:
                start += 1
            starts[index] = start
            if start < end and cards[start] != inf and cards[start] + option.ways < cards[end]:
                cards[end] = cards[start] + option.ways
                choice[end] = (start, index)
    if cards[n] == inf:
        return None
    return _trace(options, choice, n)


def split_min_max(options: Sequence[SplitOption], budget: int) -> SplitSolution | None:
    """The least bottleneck with at most ``budget`` cards in all (exact: integer bisection on the limit)."""
    whole = next(option for option in options if option.ways == 1)
    n = whole.cost.layers
    high = whole.cost.footprint(0, n - 1)                   # one card holds everything: always feasible
    low = split_lower_bound(options, budget) - 1            # infeasible by the bound
    best = fewest_split_cards(options, high)
    if best is None or best.cards > budget:
        return None
    while high - low > 1:
        middle = (low + high) // 2
        found = fewest_split_cards(options, middle)
        if found is not None and found.cards <= budget:
            high, best = middle, found
        else:
            low = middle
    return best


def split_lower_bound(options: Sequence[SplitOption], budget: int) -> int:
    """A proven lower bound on the bottleneck with at most ``budget`` cards: every layer needs some card holding
    at least its smallest share (over widths <= budget); and the cards together hold, for every layer, t times its
    per-card weights and KV cache, at least the smallest such total over widths."""
    single = np.full(options[0].cost.layers, np.iinfo(np.int64).max, dtype=np.int64)
    for option in options:
        if option.ways <= budget:
            cost = option.cost
            alone = cost.additive + (cost.transient if cost.transient is not None else 0)
            single = np.where(option.allowed, np.minimum(single, alone), single)
    return max(int(single.max()), -(-int(_held_bytes(options, budget).sum()) // budget))


def _held_bytes(options: Sequence[SplitOption], budget: int) -> npt.NDArray[np.int64]:
    """Per layer, the least bytes a group of any width <= budget holds of its weights and KV cache in all."""
    held = np.full(options[0].cost.layers, np.iinfo(np.int64).max, dtype=np.int64)
    for option in options:
        if option.ways <= budget:
            held = np.where(option.allowed, np.minimum(held, option.cost.additive * option.ways), held)
    return held


def split_card_lower_bound(options: Sequence[SplitOption], capacity: int) -> int:
    """No plan has fewer cards: together they hold every layer's weights and KV cache (at its leanest width)."""
    return max(1, -(-int(_held_bytes(options, np.iinfo(np.int64).max).sum()) // capacity))


def _trace(options: Sequence[SplitOption], choice: list[tuple[int, int]], n: int) -> SplitSolution:
    stages = []
    end = n
    while end > 0:
        start, index = choice[end]
        option = options[index]
        stages.append(SplitStage(start, end - 1, option.ways, option.cost.footprint(start, end - 1)))
        end = start
    return SplitSolution(tuple(reversed(stages)))
