"""Least slowest-stage time over exactly k cards, every card within its capacity (``objective="time"``).

A stage i..j takes T(i, j) = pass(i, j) + cut(j): the stage-time model of :mod:`cachefit.core.cost` (compute and
bytes add up over its layers, read on-chip when the stage's footprint fits the device's on-chip capacity and
off-chip when not) plus the transfer of layer j's output to the next card. The cut term does not grow with the
interval (a longer stage may end at a smaller activation), so bisection with a greedy probe is not exact; a DP over
cut points is: best[m][j] = min over i of max(best[m-1][i], T(i, j-1)) over stages that fit, vectorised over i
(O(k n) numpy passes of length n).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cachefit.core.cost import LayerCosts, memory_seconds, stage_time, work_seconds
from cachefit.core.memory import IntervalCost

__all__ = ["TimedSolution", "least_time"]


@dataclass(frozen=True, slots=True)
class TimedSolution:
    lasts: tuple[int, ...]
    seconds: tuple[float, ...]

    @property
    def bottleneck_seconds(self) -> float:
        return max(self.seconds)


def least_time(cost: IntervalCost, costs: LayerCosts, capacity: int, cards: int) -> TimedSolution | None:
    """Exactly ``cards`` contiguous stages, each within ``capacity``, with the least slowest-stage time; None when
    no such split exists."""
    n = cost.layers
    best = np.full((cards + 1, n + 1), np.inf)
    best[0, 0] = 0.0
    choice = np.zeros((cards + 1, n + 1), dtype=np.int64)
    # Prefix sums of each per-layer term, once: a stage's term is a difference of two of them.
    prefixes = tuple(np.concatenate(([0.0], np.cumsum(term))) for term in (costs.compute, costs.moved,
                                                                              costs.allreduce, costs.fixed))
    for end in range(1, n + 1):
        seconds = _stages_ending_at(cost, costs, prefixes, end - 1, capacity)
        for used in range(1, min(cards, end) + 1):
            candidates = np.maximum(best[used - 1, :end], seconds)
            start = int(np.argmin(candidates))
            best[used, end], choice[used, end] = candidates[start], start
    if not np.isfinite(best[cards, n]):
        return None
    lasts, end = [], n
    for used in range(cards, 0, -1):
        lasts.append(end - 1)
        end = int(choice[used, end])
    lasts.reverse()
    firsts = [0, *[last + 1 for last in lasts[:-1]]]
    times = [stage_time(costs, first, last, cost.footprint(first, last), cost.shared_bytes(first, last))
             for first, last in zip(firsts, lasts)]
    return TimedSolution(tuple(lasts), tuple(t.pass_s + t.transfer_s for t in times))


def _stages_ending_at(cost: IntervalCost, costs: LayerCosts, prefixes: tuple[npt.NDArray[np.float64], ...],
                      last: int, capacity: int) -> npt.NDArray[np.float64]:
    """T(first, last) for every first <= last (inf where the stage does not fit ``capacity``)."""
    footprints = cost.footprints_ending_at(last)
    compute, moved, allreduce, fixed = (prefix[last + 1] - prefix[:last + 1] for prefix in prefixes)
    if cost.shared:
        moved = moved + np.array([cost.shared_bytes(first, last) for first in range(last + 1)], dtype=np.float64)
    seconds = work_seconds(compute, memory_seconds(moved, footprints, costs.rates), costs.rates.overlap)
    seconds = np.asarray(seconds) + allreduce + fixed + costs.rates.pass_seconds + costs.cut[last]
    return np.where(footprints <= capacity, seconds, np.inf)
